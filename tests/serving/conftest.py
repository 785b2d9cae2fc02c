"""SmolLM2 compiled once per session into a temporary artifact, by the real `kiln compile`
with float32 weights (`--quant none`: these tests hold the engine to HF's greedy tokens; the
CPU's default int4 weights are tested in tests/compiler/test_quant_default.py);
a tiny Llama saved as an HF directory (with a small tokenizer) and compiled once per
session, for the artifact tests that need no real weights."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import KILN, kiln_env  # noqa: E402
from run_shared import built_once_per_run  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """Never modified by tests (shared by every worker of the run)."""
    def build(out: Path):
        r = subprocess.run(KILN + ["compile", "smollm2", "-t", "cpu", "--quant", "none", "-o", str(out)],
                           env=kiln_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "manifest.json").is_file()
    return built_once_per_run(tmp_path_factory, "smollm2.kiln", build)


def tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained in memory, ids below `vocab_size`, with the tiny
    models' special tokens (<unk> 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the cat sat on the mat", "one two three four"] * 4,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """(directory, model): a tiny random-weight Llama (GQA) saved with a tokenizer."""
    import models
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = models.tiny_llama_gqa()
    model.save_pretrained(d)
    tok = tiny_tokenizer(model.config.vocab_size)
    assert len(tok) <= model.config.vocab_size
    tok.save_pretrained(d)
    return d, model


@pytest.fixture(scope="session")
def tiny_artifact(tiny_dir, tmp_path_factory) -> Path:
    """tiny_dir compiled for the CPU (block size 8) by this machine's kiln. Never modified:
    tests copy it first."""
    from kiln.artifact import compile_artifact
    out = tmp_path_factory.mktemp("art") / "tiny.kiln"
    compile_artifact(str(tiny_dir[0]), "cpu", out, block_size=8)
    return out
