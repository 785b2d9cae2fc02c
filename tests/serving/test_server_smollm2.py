"""A real `kiln serve` process serving the SmolLM2 artifact on the CPU, driven by the official
openai client: greedy outputs equal HF eager generate token for token, streaming and not,
16 concurrent streams, KV blocks all freed afterwards, errors with the right status and
body, a killed client's blocks freed, prefix-cache hits reported in usage."""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import pytest
import torch

from serving_helpers import KILN, kiln_env

API_KEY = "test-key"
MODEL = "smollm2"
MAX_MODEL_LEN = 512
MAX_BODY = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, artifact):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(artifact.parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            KILN + ["serve", str(artifact), "--port", str(self.port), "--api-key", API_KEY,
                    "--max-model-len", str(MAX_MODEL_LEN), "--num-blocks", "256", "--threads", "1",
                    "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=kiln_env())
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"kiln serve did not come up:\n{self.output()}"
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0,
                                    timeout=120)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed at {self.metric(name)}, wanted {value}"
            time.sleep(0.1)

    def post(self, path: str, body, key: str | None = API_KEY, raw: bool = False) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if raw:
            headers["Content-Type"] = "application/json"
            return httpx.post(self.url + path, content=body, headers=headers, timeout=60)
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    s = ServerProcess(smollm2_artifact)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hf(smollm2):
    model, tok = smollm2

    @torch.no_grad()
    def greedy(ids: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        return out[0, len(ids):].tolist()
    return greedy, tok


def chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_loaded_artifact_without_compiling(server):
    assert "kiln: artifact" in server.output() and "capture" not in server.output()
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_equals_hf(server, hf, prompt):
    greedy, tok = hf
    ids = tok.encode(prompt)
    want = greedy(ids, 16)
    r = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0,
                                         extra_body={"return_token_ids": True})
    got = r.choices[0].model_extra["token_ids"]
    assert got == want
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    # The same prompt as text, streamed: the same text.
    chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(want)


def test_chat_greedy_equals_hf(server, hf):
    greedy, tok = hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = greedy(chat_ids(tok, messages), 24)
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                              temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want
    text = r.choices[0].message.content
    assert text == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                   temperature=0, stream=True,
                                                   extra_body={"return_token_ids": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])] == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


TOPICS = ["the sea", "a robot", "winter", "coffee", "a dragon", "the moon", "music", "a city",
          "friendship", "rain", "a library", "the desert", "a train", "autumn", "a garden", "time"]


def test_concurrent_streams(server, hf):
    """16 streaming requests at once: each one's text is its own greedy answer."""
    greedy, tok = hf
    prompts = [f"Write one sentence about {t}:" for t in TOPICS]
    n = 10
    want = [tok.decode(greedy(tok.encode(p), n), skip_special_tokens=True) for p in prompts]

    async def one(client, p):
        stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                                 stream=True)
        text, finish = "", None
        async for c in stream:
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                                    timeout=300)
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()
    t0 = time.monotonic()
    results = asyncio.run(main())
    took = time.monotonic() - t0
    assert [t for t, _ in results] == want
    assert all(f in ("stop", "length") for _, f in results)
    server.wait_metric("kiln_kv_blocks_used", 0)
    server.wait_metric("kiln_requests_running", 0)
    print(f"16 concurrent streams x {n} tokens: {took:.1f} s")


def test_errors(server):
    def err(r, status, param=None, code=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        if param:
            assert e["param"] == param
        if code:
            assert e["code"] == code
        return e
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    err(server.post("/v1/completions", b'{"model": "smollm2", "prompt": ', raw=True), 400)
    err(server.post("/v1/completions", {**ok, "max_tokens": -3}), 400, "max_tokens")
    err(server.post("/v1/completions", {**ok, "model": "gpt-9"}), 404, "model", "model_not_found")
    e = err(server.post("/v1/completions", {**ok, "prompt": [1000] * (MAX_MODEL_LEN + 5)}), 400,
            "max_tokens", "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in e["message"]
    err(server.post("/v1/completions", ok, key=None), 401, code="invalid_api_key")
    err(server.post("/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert server.post("/v1/completions", ok).status_code == 200   # still serving


def test_cli_limits(server):
    """`kiln serve --max-body-bytes`, the default prompt limit (64 characters per token of
    --max-model-len) and the documentation off by default, through the real CLI."""
    r = server.post("/v1/completions", b'{"model": "smollm2", "prompt": "' + b"a" * (MAX_BODY + 10) + b'"}',
                    raw=True)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert f"limit of {MAX_BODY} bytes" in r.json()["error"]["message"]
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "a" * (64 * MAX_MODEL_LEN + 1)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200   # open, no key


def test_killed_client_frees_its_blocks(server):
    """A client process SIGKILLed mid-stream: the server notices, aborts, frees the blocks."""
    aborted = server.metric('kiln_requests_total{finish_reason="abort"}')
    script = textwrap.dedent(f"""
        import httpx, sys
        body = {{"model": "{MODEL}", "prompt": "Tell me a very long story about a dragon.",
                 "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}}
        with httpx.stream("POST", "{server.url}/v1/completions", json=body, timeout=120,
                          headers={{"Authorization": "Bearer {API_KEY}"}}) as r:
            for n, line in enumerate(r.iter_lines()):
                if n == 6:
                    print("streaming", flush=True)
    """)
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "streaming"
        assert server.metric("kiln_kv_blocks_used") > 0
        client.kill()
        client.wait()
    finally:
        if client.poll() is None:
            client.kill()
    server.wait_metric("kiln_kv_blocks_used", 0)
    server.wait_metric("kiln_requests_running", 0)
    assert server.metric('kiln_requests_total{finish_reason="abort"}') == aborted + 1


def test_prefix_cache_hit_in_usage(server, hf):
    _, tok = hf
    shared = ("You are a careful assistant. Answer briefly and precisely, citing facts only. "
              "The following is a conversation about geography, history and science. ") * 3
    first = server.client.completions.create(model=MODEL, prompt=shared + "Question: what is water?",
                                             max_tokens=2, temperature=0)
    second = server.client.completions.create(model=MODEL, prompt=shared + "Question: why is the sky blue?",
                                              max_tokens=2, temperature=0)
    n_shared = len(tok.encode(shared))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= n_shared - 16 and cached % 16 == 0 and cached > 0, (cached, n_shared)


def test_bench_serve(server):
    from kiln.bench import BenchConfig, format_report, make_requests, run
    cfg = BenchConfig(url=server.url, api_key=API_KEY, concurrency=2, num_requests=4, seed=3,
                      input_len=16, output_len=4, profile=True)
    assert make_requests(cfg) == make_requests(cfg)   # seeded: the same requests every run
    rep = run(cfg)
    assert rep["failed"] == 0, rep["errors"]
    assert rep["output_tokens"] == sum(n for _, n in make_requests(cfg))   # ignore_eos: all of them
    assert rep["ttft_s"]["p50"] > 0 and rep["output_throughput"] > 0
    # The step profile covers exactly this run: a prompt runs its uncached tokens once, and
    # every output token but the last runs as a later step's input.
    sp = rep["step_profile"]
    prompt_and_decodes = (rep["prompt_tokens"] - rep["cached_tokens"] + rep["output_tokens"]
                          - rep["requests"])
    assert sp["tokens_per_step"] * sp["steps"] == pytest.approx(prompt_and_decodes)
    assert 1 <= sp["sequences_per_step"] <= 2 and sp["device_s"] is None   # a CPU server
    phases = sum(v for k, v in sp["phase_s"].items() if k != "deliver")
    assert 0 < phases <= sp["step_s"] * 1.001 and sp["phase_s"]["forward"] > 0
    report = format_report(rep)
    assert "TTFT" in report and f"engine steps {sp['steps']}" in report
    server.wait_metric("kiln_kv_blocks_used", 0)


def test_bench_shared_prefix_requests():
    """--shared-prefix-len: seeded, one prefix per contiguous run of requests, suffixes differ;
    without it the requests are those of earlier versions (same draws)."""
    from kiln.bench import BenchConfig, make_requests
    cfg = BenchConfig(num_requests=7, seed=5, input_len=24, output_len=8, shared_prefix_len=100,
                      num_prefixes=2)
    reqs = make_requests(cfg)
    assert reqs == make_requests(cfg) and reqs != make_requests(BenchConfig(**{**vars(cfg), "seed": 6}))
    groups = [reqs[:4], reqs[4:]]   # 7 requests over 2 prefixes: runs of 4 and 3
    for g in groups:
        assert all(p[:100] == g[0][0][:100] for p, _ in g)
        assert all(12 <= len(p) - 100 <= 36 and 4 <= n <= 12 for p, n in g)
        suffixes = [tuple(p[100:116]) for p, _ in g]
        assert len(set(suffixes)) == len(suffixes)   # no two share a 16-token block past the prefix
    assert groups[0][0][0][:100] != groups[1][0][0][:100]
    plain = BenchConfig(num_requests=3, seed=5, input_len=24)
    assert [len(p) for p, _ in make_requests(plain)] == [31, 17, 21]   # the draws of earlier versions


def test_bench_serve_shared_prefix(server):
    """Sequential requests over one shared prefix: the first is cold, the rest report the
    prefix's full blocks as cached (counts only; nothing is timed)."""
    from kiln.bench import BenchConfig, format_report, run
    cfg = BenchConfig(url=server.url, api_key=API_KEY, concurrency=1, num_requests=3, seed=11,
                      input_len=8, output_len=2, shared_prefix_len=70)
    rep = run(cfg)
    assert rep["failed"] == 0, rep["errors"]
    pc = rep["prefix_cache"]
    assert pc["cold"]["requests"] == 1 and pc["cold"]["cached_tokens"]["max"] == 0
    assert pc["warm"]["requests"] == 2 and pc["warm"]["cached_tokens"]["min"] == 64   # 4 full blocks
    assert rep["cached_tokens"] == 128 and pc["warm"]["ttft_s"]["p50"] > 0
    assert "warm (2 requests, cached tokens 64)" in format_report(rep)
    server.wait_metric("kiln_kv_blocks_used", 0)


def test_generate_and_chat_cli(smollm2_artifact, hf):
    """`kiln generate DIR` and `kiln chat DIR` answer through the engine, greedy == HF."""
    greedy, tok = hf
    prompt = "The capital of France is"
    want = tok.decode(greedy(tok.encode(prompt), 8), skip_special_tokens=True).strip()
    r = subprocess.run(KILN + ["generate", str(smollm2_artifact), "--prompt", prompt, "--no-chat",
                               "--max-tokens", "8", "--threads", "1"],
                       capture_output=True, text=True, timeout=300, env=kiln_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == want
    assert "tokens/s" in r.stderr
    question = "What is the capital of France?"
    want = tok.decode(greedy(chat_ids(tok, [{"role": "user", "content": question}]), 12),
                      skip_special_tokens=True)
    r = subprocess.run(KILN + ["chat", str(smollm2_artifact), "--max-tokens", "12", "--threads", "1"],
                       input=f"{question}\n/exit\n", capture_output=True, text=True, timeout=300,
                       env=kiln_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"kiln> {want}" in r.stdout
