"""The engine in a process of its own (runtime.engine_process), behind the real server: the
same answers as the toy model's closed form, metrics from the child, errors of the
factory raised in the caller, and a child that dies ends every stream and turns /health
to 503."""
import asyncio
import os
import pickle
import signal
import time

import httpx
import openai
import pytest

from kiln.runtime.engine import EngineStepError, RequestError
from kiln.runtime.engine_process import EngineProcess, EngineStartError
from kiln.runtime.sequence import SamplingParams
from toy import failing_factory, unpicklable_failure
from toy_server import MODEL, Server


@pytest.fixture(scope="module")
def srv():
    s = Server(engine_process=True, max_num_batched_tokens=16)
    yield s
    s.stop()


def test_concurrent_streams_match_the_closed_form(srv):
    assert srv.runner is None and srv.engine.pid != os.getpid()
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    words = ["the cat", "hello world", "one two three", "paged attention reads"]

    async def one(i):
        prompt = words[i % 4] + " " + words[(i // 4) % 4]
        n = 6 + i % 7
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, srv.expected(srv.tok.encode(prompt), n)[1], chunks[-1].usage.completion_tokens, n

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    for got, want, tokens, n in asyncio.run(main()):
        assert got == want and tokens == n
    srv.wait_metric("kiln_kv_blocks_used", 0.0)             # /metrics comes from the child
    assert srv.metric("kiln_generation_tokens_total") >= sum(6 + i % 7 for i in range(16))


def test_request_errors_cross_the_pipe_whole():
    err = RequestError("too long", "max_tokens", "context_length_exceeded")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.param, back.code) == ("too long", "max_tokens", "context_length_exceeded")


def test_the_factorys_error_reaches_the_caller():
    with pytest.raises(ValueError, match="no such model 'x'"):
        EngineProcess(failing_factory, "no such model 'x'")
    with pytest.raises(EngineStartError, match="built inside a function"):
        EngineProcess(unpicklable_failure)


def test_a_dead_engine_ends_streams_and_health():
    s = Server(engine_process=True, step_delay=0.01)
    try:
        async def main():
            stream = s.engine.add_request(s.tok.encode("hello"),
                                          SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
            await stream.__anext__()
            os.kill(s.engine.pid, signal.SIGKILL)
            with pytest.raises(EngineStepError, match="exited unexpectedly"):
                await stream.collect()
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while s.engine.failure is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "exited unexpectedly" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
    finally:
        s.stop()


def test_shutdown_stops_the_child():
    s = Server(engine_process=True)
    pid = s.engine.pid
    s.stop()   # the app's lifespan shuts the engine down
    assert s.engine.failure == "the engine was shut down"
    with pytest.raises(ProcessLookupError):   # exited and reaped
        os.kill(pid, 0)
