"""The hip target without an AMD GPU: a tiny Llama's serving graph compiled for hip, every
Triton kernel its wrapper launches compiled to hsaco for gfx942 and gfx950 (a child
process without TRITON_INTERPRET) within each one's LDS, and the hip wrapper itself run
end to end on the CPU under Triton's interpreter (its host code and kernel launches, with
the hip tile tables a ROCm build of torch selects), against HF eager; the kernels whose
hip tiles differ from cuda's, run with them against kiln's references.

Every shipped AOT variant of every kernel compiles for gfx942 in test_triton_aot; here
each kernel function the model uses compiles for gfx950 too, in one bf16 variant (all of
them took 48 s on CI's two cores; the variants differ in constexprs and types), and the
schedule pass's generated kernels (specific to the model) for both architectures."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import models
from kiln.artifact import aot_specs
from kiln.backends.targets import get_target
from kiln.ir import print_graph
from kiln.runtime.batch import build_batch
from kiln.runtime.model_runner import PagedModelRunner
from kiln.serving import compile_serving, model_weights

BLOCK = 4


@pytest.fixture(scope="module")
def compiled():
    model = models.tiny_llama_gqa()
    return model, compile_serving(model, target="hip", block_size=BLOCK)


def test_hip_target_row():
    t = get_target("hip")
    assert t.device_type == "cuda"   # ROCm builds of torch call the GPU "cuda"
    assert t.fp8_dtype == torch.float8_e4m3fnuz and t.warp_size == 64
    assert t.archs == ("gfx942", "gfx950") and t.graph_capture == "torch.cuda.CUDAGraph"


ROCM = "6.4 (test: launches pick the hip tile tables, as on a ROCm build of torch)"


def interpreter_only():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs Triton kernels on the CPU under TRITON_INTERPRET=1")


def rel_err(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


def test_hip_tile_tables_compute_the_reference(monkeypatch):
    """The kernels whose hip tiles differ from cuda's (attention at d=128, masked decode,
    MoE, large-M scaled GEMM), launched with the hip tables, against kiln's references."""
    interpreter_only()
    from kiln.backends.triton import attention, gemm, moe
    from kiln.backends.triton.tiles import on_hip
    from kiln.ir import kiln_ref
    monkeypatch.setattr(torch.version, "hip", ROCM)
    assert on_hip()
    q, k, v = torch.randn(1, 4, 80, 128), torch.randn(1, 2, 80, 128), torch.randn(1, 2, 80, 128)
    got = attention.attention_prefill(q, k, v, None, 0.1, True)
    assert rel_err(got, kiln_ref.attention(q, k, v, None, 0.1, True)) < 1e-5
    qd, mask = torch.randn(2, 4, 1, 64), torch.rand(2, 1, 1, 40) > 0.2
    kd, vd = torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    got = attention.attention_decode(qd, kd, vd, mask, 0.1, False)
    assert rel_err(got, kiln_ref.attention(qd, kd, vd, mask, 0.1, False)) < 1e-5
    x, logits = torch.randn(40, 64), torch.randn(40, 4)
    w_gate_up, w_down = torch.randn(4, 96, 64) * 0.1, torch.randn(4, 64, 48) * 0.1
    got = moe.fused_moe(x, logits, w_gate_up, w_down, 2, True)
    assert rel_err(got, kiln_ref.fused_moe(x, logits, w_gate_up, w_down, 2, True)) < 1e-5
    a = torch.randint(-127, 128, (300, 128), dtype=torch.int8)
    b = torch.randint(-127, 128, (96, 128), dtype=torch.int8)
    a_s, b_s = torch.rand(300, 1) + 0.5, torch.rand(96, 1) + 0.5
    got = gemm.scaled_mm(a, a_s, b, b_s, None, torch.float32)
    assert gemm.gemm_config(300) == gemm.HIP_GEMM_CONFIGS[-1][1]
    assert rel_err(got, kiln_ref.scaled_mm(a, a_s, b, b_s, None, torch.float32)) < 1e-5


def test_hip_wrapper_runs_on_cpu_under_the_interpreter(compiled, monkeypatch):
    interpreter_only()
    monkeypatch.setattr(torch.version, "hip", ROCM)
    model, cg = compiled
    assert "from kiln.backends.triton" in cg.source
    runner = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), num_blocks=16,
                              max_model_len=32, vocab_size=model.config.vocab_size)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (6, 3)]
    tables = [[0, 1], [2, 3]]
    with torch.no_grad():
        logits = runner.execute(build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK))
        wants = [model(torch.tensor([p])).logits[0, -1] for p in prompts]
        for p, w in zip(prompts, wants):
            p.append(int(w.argmax()))
        logits2 = runner.execute(build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], BLOCK))
        wants2 = [model(torch.tensor([p])).logits[0, -1] for p in prompts]
    for got, want in zip(list(logits) + list(logits2), wants + wants2):
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < 1e-5, err


_COMPILE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tmp!r})
    import hip_wrapper
    from kiln.backends.triton import aot
    from kiln.backends.triton.codegen import aot_spec
    from kiln.ir import parse
    g = parse(open({kir!r}).read())
    specs = [aot_spec(f, name, getattr(hip_wrapper, name + "_kernel")) for name, f in g.functions.items()]
    jobs = [(s, t) for s in specs for t in ("hip", "hip:gfx950")]
    by_fn = {{}}
    for s in aot.all_specs():
        if s.name in {shipped!r}:
            by_fn.setdefault(s.fn.fn, s)   # one variant per kernel function: CI's time
    jobs += [(s, "hip:gfx950") for s in by_fn.values()]
    print("FUNCTIONS", len(by_fn))
    for spec, target in jobs:
        b = aot.compile_spec(spec, target)
        assert b.binary.startswith(aot.ELF_MAGIC)
        print("OK", spec.name, target, b.metadata.get("arch"), b.metadata.get("shared"))
""")


def test_every_kernel_the_model_uses_compiles_for_gfx942_and_gfx950(compiled, tmp_path):
    _, cg = compiled
    (tmp_path / "hip_wrapper.py").write_text(cg.source)
    (tmp_path / "serving.kir").write_text(print_graph(cg.graph))
    # The bf16 variants (what an MI300 serves in; the f16 ones differ only in types).
    shipped = sorted(s.name for s in aot_specs(cg.graph, "hip") if "bf16" in s.name)
    assert shipped, "the serving graph uses no Triton kernel module"
    script = _COMPILE.format(tmp=str(tmp_path), kir=str(tmp_path / "serving.kir"), shipped=shipped)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("OK")]
    archs = {(name, arch) for _, name, _, arch, _ in lines}
    from kiln.backends.triton.tiles import HIP_LDS_BYTES
    over = [(name, arch, shared) for _, name, _, arch, shared in lines
            if int(shared) > (HIP_LDS_BYTES if arch == "gfx942" else 160 * 1024)]
    assert not over, f"past the LDS of gfx942 (64 KiB) / gfx950 (160 KiB): {over}"
    generated = list(cg.graph.functions)
    for name in generated:
        assert {(name, "gfx942"), (name, "gfx950")} <= archs, name
    functions = int(done.stdout.split("FUNCTIONS")[1].split()[0])
    assert sum(arch == "gfx950" for _, arch in archs) == len(generated) + functions >= 5
