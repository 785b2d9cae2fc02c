"""`kiln rules trace FILE:FUNC`: a Python function as kiln captures it (dynamo, canonicalize,
canonical forms), printed as a .kiln fragment that parses and matches that capture. The
golden file shows when a torch release changes what the function decomposes to."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from kiln.cli import TRACED_PASSES, main
from kiln.passes.rules import apply_rules

GOLDEN = Path(__file__).parent / "golden" / "traced_rms_norm.kiln"


def rms_norm(x, w):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def two_outputs(x):
    return x + 1, x * 2


INPUTS = ["--input", "x=f32[2, 8]", "--input", "w=f32[8]"]


@pytest.fixture
def source(tmp_path):
    f = tmp_path / "norms.py"   # the functions above, as a user's file
    f.write_text("import torch\n\n\n" + inspect.getsource(rms_norm) + "\n\n" + inspect.getsource(two_outputs))
    return str(f)


def test_trace_prints_the_golden_fragment_and_it_matches_the_capture(source, capsys):
    assert main(["rules", "trace", f"{source}:rms_norm", *INPUTS]) == 0
    text = capsys.readouterr().out
    assert text == GOLDEN.read_text()   # (x * x became pow(x, 2): the canonical form)
    rule = text + """
rule norm_to_sigmoid {
  match (%x, %w) {
    %y = rms_norm(%x, %w)
    yield %y
  }
  replace { %r = aten.sigmoid(%x) yield %r }
}
"""
    graphs = []   # the same function captured again, with the passes trace runs
    torch._dynamo.reset()
    torch.compile(rms_norm, backend="kiln", options={"passes": TRACED_PASSES, "observer": graphs.append})(
        torch.randn(2, 8), torch.randn(8))
    torch._dynamo.reset()
    g = graphs[0].graph
    assert apply_rules(g, rule) == 1 and [n.op for n in g.nodes] == ["aten.sigmoid"]


@pytest.mark.parametrize("args,message", [
    (["{src}:rms_norm", "--input", "x=f32[2, 8]"], "rms_norm needs --input for w (name=dtype[dims])"),
    (["{src}:rms_norm", "--input", "x=float[2]", "--input", "w=f32[8]"],
     "bad --input 'x=float[2]': write name=dtype[dims], like x=f32[2, 8, 64]"),
    (["{src}:nope", *INPUTS], "has no function nope"),
    (["{src}", *INPUTS], "expected FILE:FUNC"),
    (["{src}:two_outputs", "--input", "x=f32[4]"], "two_outputs returns 2 values; a fragment yields one"),
])
def test_trace_errors_name_the_problem(source, args, message, capsys):
    assert main(["rules", "trace", *[a.format(src=source) for a in args]]) == 2
    assert message in capsys.readouterr().err
