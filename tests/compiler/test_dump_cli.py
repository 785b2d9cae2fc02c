"""`kiln dump` on a model directory says how many graphs compiled and how many fell back to
eager (zero here, on stderr, so stdout stays IR text), and writes the fallbacks beside a dump."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import models
from kiln.cli import main
from kiln.ir import parse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from toy import toy_tokenizer  # noqa: E402  (a tokenizer trained in memory)


def tiny_model_dir(tmp_path) -> Path:
    tok = toy_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(models.SEED)
        config = LlamaConfig(**{**models.COMMON, "vocab_size": len(tok)})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_dump_counts_fallbacks(tmp_path, capsys):
    d = tiny_model_dir(tmp_path)
    torch._dynamo.reset()
    assert main(["dump", str(d), "-o", str(tmp_path / "dump")]) == 0
    out, err = capsys.readouterr()
    assert "2 graph(s) compiled, 0 fallback(s) to eager" in err
    assert (tmp_path / "dump" / "fallbacks.txt").read_text() == ""
    final = sorted((tmp_path / "dump" / "graph_0").glob("[0-9]*.kir"))[-1]
    assert any(n.op == "kiln.attention" for n in parse(final.read_text()).nodes)
