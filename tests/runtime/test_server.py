"""The OpenAI-compatible server, for real: uvicorn on a free loopback port, driven by the
official `openai` client (and httpx for raw error cases), answers checked against the toy
model's closed form."""
import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from toy_server import MODEL, Server


@pytest.fixture(scope="module")
def srv():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded():
    """A server with an API key and room for one running and one waiting request."""
    s = Server(api_key="sekret", max_num_seqs=1, max_waiting=1)
    yield s
    s.stop()


def test_completion(srv):
    r = srv.client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=9, temperature=0)
    ids, text = srv.expected(srv.tok.encode("the cat sat"), 9)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == MODEL
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(srv.tok.encode("the cat sat")), 9)


def test_completion_from_token_ids_with_stop(srv):
    prompt = srv.tok.encode("hello world")
    _, text = srv.expected(prompt, 12)
    stop = text[4:7]
    r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat(srv):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, temperature=0)
    _, text = srv.expected(srv.chat_ids(msgs), 7)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.object == "chat.completion" and r.usage.completion_tokens == 7


def test_streaming_completion_and_chat_with_usage(srv):
    chunks = list(srv.client.completions.create(model=MODEL, prompt="one two", max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    _, text = srv.expected(srv.tok.encode("one two"), 10)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    msgs = [{"role": "user", "content": "the quick brown fox"}]
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                                     temperature=0, stream=True))
    _, text = srv.expected(srv.chat_ids(msgs), 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_raw_sse_format(srv):
    body = {"model": MODEL, "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_sixteen_concurrent_streams(srv):
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    words = ["the cat", "hello world", "one two three", "paged attention reads"]

    async def one(i):
        prompt = words[i % 4] + " " + words[(i // 4) % 4]
        n = 6 + i % 7
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                 temperature=0, stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        return text, srv.expected(srv.tok.encode(prompt), n)[1]

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    for got, want in asyncio.run(main()):
        assert got == want
    srv.wait_metric("kiln_kv_blocks_used", 0.0)


def test_streams_preempted_for_kv_space_finish_intact():
    """A KV cache too small for the running streams forces preemption by recompute; every
    stream still gets exactly the closed-form text, token ids and usage, none is lost, and
    the cache ends empty."""
    # 32 blocks of 4 tokens (one sequence of the toy's 128) for 12 streams of ~30 tokens.
    s = Server(num_blocks=32, max_num_seqs=12, max_num_batched_tokens=16)
    client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    words = ["the cat", "hello world", "one two three", "paged attention reads"]

    async def one(i):
        prompt = " ".join(words[(i + k) % 4] for k in range(1 + i % 3))
        n = 20 + i % 5
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        chunks = [c async for c in stream]
        ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {}).get("token_ids", [])]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        want_ids, want_text = s.expected(s.tok.encode(prompt), n)
        return text == want_text, ids == want_ids, chunks[-1].usage.completion_tokens == n

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(12)))
        finally:
            await client.close()
    try:
        results = asyncio.run(main())
        assert results == [(True, True, True)] * 12, results
        assert s.metric("kiln_preemptions_total") > 0
        s.wait_metric("kiln_kv_blocks_used", 0.0)
    finally:
        s.stop()


def test_prefix_cache_hits_in_usage(srv):
    prompt = "paged attention reads the cache block by block and the cat sat on the mat"
    first = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = srv.client.completions.create(model=MODEL, prompt=prompt + " again", max_tokens=2, temperature=0)
    n = len(srv.tok.encode(prompt))
    assert second.usage.prompt_tokens_details.cached_tokens >= (n - 1) // 4 * 4 > 0
    assert first.usage.prompt_tokens_details.cached_tokens <= second.usage.prompt_tokens_details.cached_tokens


def test_models_health_metrics(srv):
    assert [m.id for m in srv.client.models.list().data] == [MODEL]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    text = httpx.get(srv.url + "/metrics").text
    for name in ("kiln_requests_total", "kiln_time_to_first_token_seconds_bucket", "kiln_kv_cache_usage",
                 "kiln_inter_token_latency_seconds_count", "kiln_requests_running", "kiln_requests_waiting",
                 "kiln_prompt_tokens_total", "kiln_generation_tokens_total"):
        assert name in text, name


BAD = [  # (body changes, status, param or None, message fragment)
    ({"max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"max_tokens": -5}, 400, "max_tokens", "at least 1"),
    ({"max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"temperature": "hot"}, 400, "temperature", "number"),
    ({"top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"n": 3}, 400, "n", "n = 1"),
    ({"stop": [1, 2]}, 400, "stop", "stop"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": {"a": 1}}, 400, "prompt", "prompt"),
    ({"prompt": [1, 10 ** 9]}, 400, "prompt", "token ids"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ({"prompt": "bad \ud800 text"}, 400, "prompt", "lone UTF-16 surrogate"),
    ({"logprobs": 5}, 400, "logprobs", "not supported"),
    ({"seed": 2 ** 80}, 400, "seed", "64-bit"),
    ({"stream": "yes"}, 400, "stream", "boolean"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, 400, "include_usage", "boolean"),
    ({"max_tokens": 127, "prompt": "the cat sat on the mat"}, 400, "max_tokens", "maximum context length is 128"),
    ({"model": "gpt-9"}, 404, "model", "does not exist"),
    ({"model": None}, 400, "model", "required"),
]


@pytest.mark.parametrize("change,status,param,fragment", BAD)
def test_bad_completion_requests(srv, change, status, param, fragment):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **change}
    r = httpx.post(srv.url + "/v1/completions", content=json.dumps(body),   # ASCII-escaped JSON
                   headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == status and fragment in err["message"], err
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert srv.engine.num_waiting() == 0 and not srv.engine.engine.seqs   # nothing left running


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json(srv, raw):
    r = httpx.post(srv.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": 5}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]])
def test_bad_chat_messages(srv, messages):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_openai_client_error_classes(srv):
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=500)
    assert httpx.get(srv.url + "/nowhere").json()["error"]["message"] == "Not Found"


def test_client_disconnect_mid_stream_frees_blocks(srv):
    srv.runner.delay = 0.02
    try:
        aborted = srv.metric('kiln_requests_total{finish_reason="abort"}')
        body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 100, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()      # kept alive: closing it early closes the connection
            while not next(lines).startswith("data: "):
                pass
            assert srv.metric("kiln_kv_blocks_used") > 0
            assert srv.metric('kiln_requests_total{finish_reason="abort"}') == aborted
        srv.wait_metric("kiln_kv_blocks_used", 0.0, timeout=3)     # well before 100 tokens x 20 ms
        srv.wait_metric('kiln_requests_total{finish_reason="abort"}', aborted + 1)
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        srv.wait_metric('kiln_requests_total{finish_reason="abort"}', aborted + 2, timeout=3)
        srv.wait_metric("kiln_kv_blocks_used", 0.0)
    finally:
        srv.runner.delay = 0.0


def test_api_key_and_back_pressure(guarded):
    g = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(g.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=g.url + "/v1", api_key="wrong", max_retries=0).models.list()

    results = {}

    def call(name):
        results[name] = g.client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)

    g.runner.entered.clear()
    g.runner.gate.clear()                      # hold the engine inside its next step
    try:
        a = threading.Thread(target=call, args=("a",))
        a.start()
        assert g.runner.entered.wait(5)        # a is running
        b = threading.Thread(target=call, args=("b",))
        b.start()
        deadline = time.monotonic() + 5
        while g.engine.num_waiting() < 1:      # b is queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as exc:
            g.client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
        assert exc.value.status_code == 429 and exc.value.body["code"] == "queue_full"
    finally:
        g.runner.gate.set()
    a.join(10), b.join(10)
    assert results["a"].choices[0].text == results["b"].choices[0].text == g.expected(g.tok.encode("hello"), 3)[1]


def test_fuzzed_requests_never_500(srv):
    """Random values for every field: always a well-formed 2xx or 4xx, never a crash."""
    import random
    rng = random.Random(0)
    values = [None, True, False, 0, 1, -1, 3, 2 ** 70, 0.5, 1.5, -0.1, float("nan"), "", "x", "the",
              [], [1, 2], ["a"], [[3]], {}, {"include_usage": True}, {"type": "text"},
              [{"role": "user", "content": "hi"}], [{"role": "user"}]]
    fields = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
              "n", "seed", "stop", "stream", "stream_options", "logprobs", "echo", "response_format",
              "ignore_eos", "presence_penalty", "model"]
    for i in range(60):
        body = {"model": MODEL, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3}
        for f in rng.sample(fields, 3):
            body[f] = rng.choice(values)
        path = "/v1/completions" if i % 2 else "/v1/chat/completions"
        raw = json.dumps(body)                     # NaN goes out as the JSON extension `NaN`
        r = httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 404), (body, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    srv.wait_metric("kiln_kv_blocks_used", 0.0)
