"""Speculative decoding on SmolLM2 (real weights) and through the command line: a real
`kiln serve --speculative ngram:4` answers a repetition-heavy prompt with exactly the
greedy tokens of the engine without speculation, and /metrics carries the kiln_spec_*
series; `kiln generate --speculative` prints the mean accepted length, and a wrong
--speculative is one clear error before anything loads."""
from __future__ import annotations

import re

import httpx
import pytest

from kiln.cli import main
from kiln.runtime.sequence import SamplingParams
from kiln.serving import ServingConfig, build_served
from test_server_smollm2 import ServerProcess

REWRITE = ("red apple, green pear, yellow banana, red apple, green pear, yellow banana, red "
           "apple, green pear, yellow banana, red apple,")   # SmolLM2 goes on with the list


class SpecServer(ServerProcess):
    """ServerProcess with --speculative (its command line gains the flag)."""

    def __init__(self, artifact, spec: str):
        import subprocess
        real = subprocess.Popen

        def popen(cmd, *a, **kw):
            return real(cmd + ["--speculative", spec], *a, **kw)
        subprocess.Popen = popen
        try:
            super().__init__(artifact)
        finally:
            subprocess.Popen = real


@pytest.fixture(scope="module")
def plain_tokens(smollm2_artifact):
    """The greedy tokens of the engine without speculation, and the prompt's ids."""
    served = build_served(str(smollm2_artifact), ServingConfig(max_model_len=512, num_blocks=64))
    ids = served.tokenizer(REWRITE)["input_ids"]
    out = served.engine.generate([ids], SamplingParams(max_tokens=48, temperature=0))[0]
    return ids, out.text


def test_server_with_ngram_speculation_gives_the_plain_tokens_and_its_metrics(smollm2_artifact, plain_tokens):
    ids, want = plain_tokens
    server = SpecServer(smollm2_artifact, "ngram:4")
    try:
        r = server.client.completions.create(model="smollm2", prompt=ids, max_tokens=48,
                                             temperature=0, logprobs=None)
        tok = httpx.get(server.url + "/metrics").text
        drafted = server.metric("kiln_spec_draft_tokens_total")
        accepted = server.metric("kiln_spec_accepted_tokens_total")
        mean = server.metric("kiln_spec_mean_accepted_length")
    except BaseException:
        print(server.output())
        raise
    finally:
        server.stop()
    assert r.choices[0].text == want
    assert "kiln_spec_verify_steps" in tok
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)
    assert mean > 2.5   # the list repeats: most drafts stand


def test_generate_prints_the_mean_accepted_length(tiny_artifact, capsys):
    assert main(["generate", str(tiny_artifact), "--prompt", "one two three one two three one two",
                 "--no-chat", "--max-tokens", "24", "--ignore-eos", "--speculative", "ngram:3"]) == 0
    assert re.search(r"ngram:3: mean accepted length \d+\.\d\d", capsys.readouterr().err)


@pytest.mark.parametrize("value, says", [("medusa:4", "unknown method 'medusa'"),
                                         ("ngram:99", "K must be a whole number")])
def test_a_wrong_speculative_value_is_one_error_before_loading(value, says, capsys, tmp_path):
    missing = tmp_path / "no-such-model"   # never reached: the flag is checked first
    assert main(["generate", str(missing), "--prompt", "hi", "--speculative", value]) == 2
    err = capsys.readouterr().err
    assert says in err and "ngram:K" in err and "no-such-model" not in err
