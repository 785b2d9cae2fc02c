"""`kiln serve` and `kiln generate` with `--tensor-parallel-size 2` on the CPU: two ranks on
gloo (rank 0 starts the other itself), answering real OpenAI requests with the tokens one
rank gives; and the flag's errors."""
from __future__ import annotations

import subprocess
import time

import httpx
import openai
import pytest

from serving_helpers import KILN, kiln_env
from test_server_smollm2 import free_port

PROMPT = "the cat sat on"


def _generate(model_dir, *extra, env=None) -> str:
    r = subprocess.run(KILN + ["generate", str(model_dir), "--prompt", PROMPT, "--max-tokens", "12",
                               "--ignore-eos", "--no-chat", "--threads", "1", *extra],
                       env={**kiln_env(), **(env or {})}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def one_rank(tiny_dir) -> str:
    """What `kiln generate` prints on one rank: the tokens both tests hold two ranks to."""
    return _generate(tiny_dir[0])


def test_generate_on_two_ranks_equals_one(tiny_dir, one_rank, tmp_path):
    d, _ = tiny_dir
    dump = tmp_path / "dump"
    assert _generate(d, "--tensor-parallel-size", "2", env={"KILN_DUMP_DIR": str(dump)}) == one_rank
    # really sharded: the ranks' serving graphs reduce partial sums
    final = sorted(dump.glob("*/*_schedule.kir"))
    assert final and "kiln.all_reduce" in final[-1].read_text()


def test_serve_on_two_ranks_answers_openai_requests(tiny_dir, one_rank, tmp_path):
    d, _ = tiny_dir
    expected = one_rank.strip()
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(KILN + ["serve", str(d), "--port", str(port), "--tensor-parallel-size", "2",
                                    "--threads", "1", "--max-model-len", "128", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=kiln_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (log.seek(0), log.read()[-4000:])[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "kiln serve --tensor-parallel-size 2 did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text.strip() == expected
        assert out.usage.completion_tokens == 12
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        assert streamed.strip() == expected
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # rank 1 went away with rank 0
    time.sleep(1)
    ps = subprocess.run(["pgrep", "-f", "kiln.tensor_parallel"], capture_output=True, text=True)
    assert not ps.stdout.strip(), ps.stdout


@pytest.mark.parametrize("args, message", [
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--tensor-parallel-size", "2", "--backend", "eager"], "kiln engine"),
    (["--tensor-parallel-size", "2", "-t", "cuda"], "GPUs"),
])
def test_bad_tensor_parallel_flags(tiny_dir, args, message):
    d, _ = tiny_dir
    r = subprocess.run(KILN + ["generate", str(d), "--prompt", "x", *args], env=kiln_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
