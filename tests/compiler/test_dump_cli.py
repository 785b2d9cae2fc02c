"""`kiln dump` on a model directory says how many graphs compiled and how many fell back to
eager (zero here, on stderr, so stdout stays IR text), and writes the fallbacks beside a dump."""
from __future__ import annotations

import torch

from kiln.cli import main
from kiln.ir import parse
from models import tiny_llama_dir


def test_dump_counts_fallbacks(tmp_path, capsys):
    d = tiny_llama_dir(tmp_path / "tiny")
    torch._dynamo.reset()
    assert main(["dump", str(d), "-o", str(tmp_path / "dump")]) == 0
    out, err = capsys.readouterr()
    assert "2 graph(s) compiled, 0 fallback(s) to eager" in err
    assert (tmp_path / "dump" / "fallbacks.txt").read_text() == ""
    final = sorted((tmp_path / "dump" / "graph_0").glob("[0-9]*.kir"))[-1]
    assert any(n.op == "kiln.attention" for n in parse(final.read_text()).nodes)
