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


def served_completion(artifact, spec: str, ids: list[int], metrics: list[str]):
    """A real `kiln serve ARTIFACT --speculative SPEC`: its greedy completion of `ids` (48
    tokens), its /metrics text then and the values of `metrics` in it."""
    server = SpecServer(artifact, spec)
    try:
        r = server.client.completions.create(model="smollm2", prompt=ids, max_tokens=48,
                                             temperature=0)
        return (r.choices[0].text, httpx.get(server.url + "/metrics").text,
                [server.metric(m) for m in metrics])
    except BaseException:
        print(server.output())
        raise
    finally:
        server.stop()


def test_server_with_ngram_speculation_gives_the_plain_tokens_and_its_metrics(smollm2_artifact, plain_tokens):
    ids, want = plain_tokens
    text, tok, (drafted, accepted, mean) = served_completion(
        smollm2_artifact, "ngram:4", ids, ["kiln_spec_draft_tokens_total",
                                           "kiln_spec_accepted_tokens_total",
                                           "kiln_spec_mean_accepted_length"])
    assert text == want
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


# -- draft:PATH:K: a second model drafts ------------------------------------------------------------
def test_server_with_a_draft_model_gives_the_plain_tokens(smollm2_artifact, plain_tokens):
    """SmolLM2 drafting for itself (the artifact loaded a second time, a KV pool of its own):
    the plain tokens, and every draft stands."""
    ids, want = plain_tokens
    text, _, (drafted, accepted) = served_completion(
        smollm2_artifact, f"draft:{smollm2_artifact}:4", ids,
        ["kiln_spec_draft_tokens_total", "kiln_spec_accepted_tokens_total"])
    assert text == want
    assert drafted > 0 and accepted == drafted, (drafted, accepted)


def test_generate_with_a_draft_model_compiled_beside_the_artifact(tiny_artifact, tiny_dir, capsys):
    """The tiny artifact drafted for by the HF directory it was compiled from (compiled here,
    block size 16 against the artifact's 8): every draft stands, so 24 tokens at K = 3 take
    6 verify steps, 17 drafts standing (the last step has room for 2)."""
    spec = f"draft:{tiny_dir[0]}:3"
    assert main(["generate", str(tiny_artifact), "--prompt", "one two three", "--no-chat",
                 "--max-tokens", "24", "--ignore-eos", "--speculative", spec]) == 0
    err = capsys.readouterr().err
    assert f"{spec}: mean accepted length {1 + 17 / 6:.2f}" in err, err[-2000:]


def test_a_draft_model_of_another_tokenizer_is_refused(tiny_artifact, tmp_path, capsys):
    from models import tiny_llama_dir
    other = tiny_llama_dir(tmp_path / "other-tokenizer")
    assert main(["generate", str(tiny_artifact), "--prompt", "hi", "--max-tokens", "2",
                 "--speculative", f"draft:{other}:2"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and str(other) in err and str(tiny_artifact) in err
    assert "--speculative ngram:K" in err


def test_dump_shows_the_draft_models_graph(tiny_artifact, capsys):
    spec = f"draft:{tiny_artifact}:2"
    assert main(["dump", "--graph", "draft", "--speculative", spec]) == 0
    out, err = capsys.readouterr()
    assert out == (tiny_artifact / "serving.kir").read_text() and spec in err
    assert main(["dump", "--graph", "draft", "--speculative", spec, "--after", "input"]) == 0
    out, _ = capsys.readouterr()
    assert out == next((tiny_artifact / "ir").glob("*_input.kir")).read_text() != ""


def test_the_draft_runner_holds_the_targets_tokens_in_buckets_drafting_needs(tiny_artifact):
    from kiln.runtime.spec_decode import MAX_VERIFY_ROWS, SpeculativeConfig
    served = build_served(str(tiny_artifact), ServingConfig(
        num_blocks=40, speculative=SpeculativeConfig.parse(f"draft:{tiny_artifact}:2")))
    target, draft = served.engine.runner, served.engine.spec.proposer.runner
    assert draft is not target and draft.caches.keys() == target.caches.keys()
    assert all(d is not t for d, t in zip(draft.caches.values(), target.caches.values()))
    assert draft.num_blocks * draft.block_size >= target.num_blocks * target.block_size
    assert max(draft.seq_buckets) == MAX_VERIFY_ROWS // 2 < max(target.seq_buckets)
