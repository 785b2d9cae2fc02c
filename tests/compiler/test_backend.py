"""torch.compile(backend="kiln"): dynamic shapes, options, dumps, opaque ops and the
torch.export frontend. Its numerics against eager on the tiny models (a prefill and 16
decode steps) are checked with their fusions, in tests/passes/test_fuse_models.py."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import kiln
from capture import fresh_dynamo, greedy_inputs, load_model, rel_err, run_steps

def test_new_batch_size_and_prompt_length_do_not_recompile():
    model = load_model("llama")
    compiled = []
    fresh_dynamo()
    fn = torch.compile(model, backend="kiln", options={"observer": compiled.append})
    for batch, plen in [(2, 5), (3, 5), (5, 11)]:
        ids = torch.randint(0, model.config.vocab_size, (batch, plen))
        ref = run_steps(model, model, ids.clone(), 2, max_cache_len=32)
        dynamic_len = ids.clone()
        torch._dynamo.mark_dynamic(dynamic_len, 1)
        out = run_steps(fn, model, dynamic_len, 2, teacher=greedy_inputs(ref), max_cache_len=32)
        assert max(rel_err(o, r) for o, r in zip(out, ref)) < 1e-5
    assert len(compiled) == 2, [c.graph.inputs[:3] for c in compiled]
    assert compiled[0].graph.sym_ranges  # batch (and length) are symbols, not constants


def test_backend_is_found_through_the_entry_point():
    from torch._dynamo.backends.registry import lookup_backend
    from kiln.backend import kiln_backend
    assert lookup_backend("kiln") is kiln_backend


def test_bad_options_name_the_option_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown kiln option.*bogus.*valid options"):
        kiln.compile(torch.nn.Linear(2, 2), bogus=1)
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        kiln.compile(torch.nn.Linear(2, 2), target="tpu")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return torch.nn.functional.silu(self.lin(h)) + x


def test_dump_dir_holds_every_pass_and_a_standalone_wrapper(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_DUMP_DIR", str(tmp_path))
    m = _Block()
    x = torch.randn(4, 16)
    out = kiln.compile(m)(x)
    torch.testing.assert_close(out, m(x))
    (graph_dir,) = list(tmp_path.iterdir())
    names = sorted(p.name for p in graph_dir.iterdir())
    assert "000_input.kir" in names and "001_canonicalize.kir" in names and "wrapper.py" in names
    # The wrapper runs on its own, given its inputs.
    src = (graph_dir / "000_input.kir").read_text()
    g = kiln.ir.parse(src)
    args = [dict(m.named_parameters())[n] if n in dict(m.named_parameters()) else None
            for n in (v.name for v in g.inputs)]
    args = [a if a is not None else x for a in args]
    torch.save([a.detach() for a in args], tmp_path / "inputs.pt")
    res = subprocess.run([sys.executable, str(graph_dir / "wrapper.py"), str(tmp_path / "inputs.pt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("0 (4, 16)")


def test_disable_passes_env(monkeypatch):
    monkeypatch.setenv("KILN_DISABLE_PASSES", "canonicalize")
    compiled = []
    m = _Block()
    x = torch.randn(3, 16)
    torch.testing.assert_close(kiln.compile(m, observer=compiled.append)(x), m(x))
    passes = [line.split(":")[0] for line in compiled[0].stats.splitlines() if not line.startswith(" ")]
    assert "canonicalize" not in passes and "canonicalize.forms" in passes


@torch.library.custom_op("kilntest::scale_rows", mutates_args=())
def _scale_rows(x: torch.Tensor, s: float) -> torch.Tensor:
    return x * s


@_scale_rows.register_fake
def _(x, s):
    return torch.empty_like(x)


def test_unknown_ops_stay_opaque_with_one_warning():
    def f(x):
        return torch.ops.kilntest.scale_rows(x, 3.0).sin()

    compiled = []
    x = torch.randn(4, 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = kiln.compile(f, observer=compiled.append)(x)
    torch.testing.assert_close(out, (x * 3.0).sin())
    msgs = [str(m.message) for m in w if "kilntest" in str(m.message)]
    assert len(msgs) == 1 and "torch.kilntest.scale_rows.default" in msgs[0]
    assert "torch.kilntest.scale_rows.default" in str(compiled[0].graph)


def test_compile_a_graph_directly():
    g = kiln.ir.parse("""func @f(%x: f32[s0, 4]) -> f32[s0, 4]
    where s0 in [1, 16] {
  %0 = aten.exp(%x) : f32[s0, 4]
  %1 = aten.view(%0, size=[-1, 4]) : f32[s0, 4]
  return %1
}
""")
    cg = kiln.compile(g)
    x = torch.randn(3, 4)
    torch.testing.assert_close(cg(x)[0], x.exp())
    assert "def forward(x):" in cg.source


def test_torch_export_frontend():
    from kiln.driver import compile_graph
    from kiln.frontends.dynamo import export_capture
    m = _Block().eval()
    x = torch.randn(6, 16)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("tokens", max=512)},))
    graph, consts = export_capture(ep)
    assert graph.sym_ranges, "the token dim is symbolic"
    cg = compile_graph(graph)
    for n in (3, 7):
        x = torch.randn(n, 16)
        args = [c if c is not None else x for c in consts]
        torch.testing.assert_close(cg(*args)[0], m(x))
