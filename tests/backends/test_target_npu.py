"""The npu target without an NPU: every torch_npu call kiln.backends.npu makes is checked
against torch-npu's own operator schemas (read from its wheel by `make setup`) and run on
the CPU by the test-only reference operators (tests/npu_reference_ops.py), against kiln's
reference semantics; and `kiln compile -t npu` of a tiny Llama gives an artifact whose
wrapper, run on the CPU over a paged KV cache, gives HF eager's logits.

What this cannot tell: whether torch_npu's kernels compute what its documentation (and so
the references here) says, and whether the operators accept kiln's shapes on the device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import npu_reference_ops
from kiln.backends import npu
from kiln.backends.targets import get_target
from kiln.ir import kiln_ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


@pytest.fixture(scope="module", autouse=True)
def reference_ops():
    if not npu_reference_ops.SCHEMA_FILE.is_file():
        pytest.fail(f"{npu_reference_ops.SCHEMA_FILE} is missing: `make setup` fetches "
                    f"torch-npu's operator schemas")
    return npu_reference_ops.register()


def test_targets_table_routes_npu_ops_here():
    target = get_target("npu")
    for op, where in target.kernels.items():
        module, fn = where.split(":")
        assert module == "kiln.backends.npu" and callable(getattr(npu, fn)), op
    assert target.triton_backend is None   # schedule's groups run as torch ops (see npu.py)


def test_schemas_are_torch_npus():
    """The definitions come from the wheel's declarations, verbatim."""
    declared = npu_reference_ops.schemas()
    for name in npu_reference_ops.REFERENCES:
        registered = getattr(torch.ops.npu, name).default._schema
        assert registered == torch._C.parse_schema(f"npu::{declared[name]}"), name


def _rand(*shape):
    return torch.randn(*shape)


def test_norms_rope_swiglu_quant_match_kiln_reference():
    x, res, w = _rand(5, 64), _rand(5, 64), _rand(64)
    assert rel_err(npu.rms_norm(x, w, 1e-6), kiln_ref.rms_norm(x, w, 1e-6)) < 1e-6
    for a, b in zip(npu.fused_add_rms_norm(x, res, w, 1e-5),
                    kiln_ref.fused_add_rms_norm(x, res, w, 1e-5)):
        assert rel_err(a, b) < 1e-6
    q, k, cos, sin = _rand(2, 4, 7, 16), _rand(2, 2, 7, 16), _rand(2, 7, 16), _rand(2, 7, 16)
    assert rel_err(npu.rope(q, cos, sin), kiln_ref.rope(q, cos, sin)) < 1e-6
    for a, b in zip(npu.rope_pair(q, k, cos, sin), kiln_ref.rope_pair(q, k, cos, sin)):
        assert rel_err(a, b) < 1e-6
    gate, up = _rand(3, 5, 32), _rand(3, 5, 32)
    assert rel_err(npu.silu_mul(gate, up), kiln_ref.silu_mul(gate, up)) < 1e-6
    (q8, s8), (r8, rs) = npu.quant_int8(x), kiln_ref.quant_int8(x)
    assert s8.shape == rs.shape and rel_err(s8, rs) < 1e-6
    assert (q8.int() - r8.int()).abs().max() <= 1   # rounding of ties may differ


@pytest.mark.parametrize("sq,skv,causal,window,mask", [
    (7, 7, True, None, None),        # prefill
    (1, 9, True, None, None),        # incremental decode
    (3, 9, True, 4, None),           # chunk with a sliding window
    (6, 6, False, None, "bool"),     # padding mask
    (6, 6, True, None, "additive"),  # additive mask: pse_shift
])
def test_attention_matches_kiln_reference(sq, skv, causal, window, mask):
    q, k, v = _rand(2, 4, sq, 16), _rand(2, 2, skv, 16), _rand(2, 2, skv, 16)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, sq, skv) > 0.3
        m[..., 0] = True
    elif mask == "additive":
        m = _rand(2, 1, sq, skv)
    got = npu.attention(q, k, v, m, 0.25, causal, window)
    assert rel_err(got, kiln_ref.attention(q, k, v, m, 0.25, causal, window)) < 1e-5


def _paged_inputs(new_tokens: list[int], context: list[int], block_size=4, hq=4, hkv=2, d=16):
    t = sum(new_tokens)
    blocks_per_seq = max(-(-c // block_size) for c in context)
    num_blocks = len(context) * blocks_per_seq + 1
    k_cache, v_cache = _rand(num_blocks, block_size, hkv, d), _rand(num_blocks, block_size, hkv, d)
    tables = torch.randperm(num_blocks - 1)[:len(context) * blocks_per_seq].view(len(context), -1)
    slots = []
    for i, (n, c) in enumerate(zip(new_tokens, context)):
        for pos in range(c - n, c):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    query_start = torch.tensor([0] + list(torch.tensor(new_tokens).cumsum(0)), dtype=torch.int32)
    return (_rand(t, hq, d), _rand(t, hkv, d), _rand(t, hkv, d), k_cache, v_cache,
            torch.tensor(slots), tables.to(torch.int32), torch.tensor(context, dtype=torch.int32),
            query_start)


@pytest.mark.parametrize("new_tokens,context", [([1, 1, 1], [5, 9, 2]),       # decode batch
                                                ([6, 1, 3], [6, 11, 8])])     # mixed batch
def test_paged_attention_matches_kiln_reference(new_tokens, context):
    args = _paged_inputs(new_tokens, context)
    ref_args = [a.clone() for a in args]
    got = npu.paged_attention(*args, scale=0.25)
    want = kiln_ref.paged_attention(*ref_args, scale=0.25)
    assert rel_err(got, want) < 1e-5
    assert torch.equal(args[3], ref_args[3]) and torch.equal(args[4], ref_args[4])   # caches


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_matches_kiln_reference(renormalize):
    x, logits = _rand(9, 32), _rand(9, 4)
    w_gate_up, w_down = _rand(4, 2 * 24, 32) * 0.2, _rand(4, 32, 24) * 0.2
    got = npu.fused_moe(x, logits, w_gate_up, w_down, 2, renormalize)
    assert rel_err(got, kiln_ref.fused_moe(x, logits, w_gate_up, w_down, 2, renormalize)) < 1e-5


def test_every_reference_operator_was_called():
    """Run last in this file: the tests above reached every operator the npu target emits."""
    missing = set(npu_reference_ops.REFERENCES) - set(npu_reference_ops.calls)
    assert not missing, f"no test called {sorted(missing)}"


# The CLI in a child process: giving torch the device name "npu" without torch_npu (what
# `kiln compile -t npu` does on a machine without an NPU) makes torch take it for the
# process's accelerator, which the rest of the suite must not see.
_COMPILE_AND_RUN = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    import models, npu_reference_ops
    from target_device_map import map_device_to_cpu
    from transformers import AutoModelForCausalLM
    from kiln.cli import main
    from kiln.artifact import load_artifact
    from kiln.backends import wrapper
    from kiln.runtime.batch import build_batch
    from kiln.runtime.model_runner import PagedModelRunner

    out = {tmp!r}
    models.tiny_llama_dir(out + "/model")
    assert main(["compile", out + "/model", "-t", "npu", "-o", out + "/npu.kiln",
                 "--block-size", "4"]) == 0
    try:   # running needs torch_npu: one error that says so
        load_artifact(out + "/npu.kiln")
        raise SystemExit("an npu artifact loaded without torch_npu")
    except ImportError as e:
        assert "torch_npu" in str(e) and "CANN" in str(e), e
    npu_reference_ops.register()
    art = load_artifact(out + "/npu.kiln")
    forward = wrapper.load(map_device_to_cpu((art.path / "wrapper.py").read_text(), "npu"))
    runner = PagedModelRunner(forward, art.graph, art.load_weights(), num_blocks=32,
                              max_model_len=64, vocab_size=art.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(out + "/model").eval()
    prompts = [torch.randint(0, art.vocab_size, (n,)).tolist() for n in (7, 3, 10)]
    tables = [[3 * i + j for j in range(3)] for i in range(3)]
    errs = []
    with torch.no_grad():
        logits = runner.execute(build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], 4))
        for i, p in enumerate(prompts):
            want = model(torch.tensor([p])).logits[0, -1]
            errs.append(((logits[i] - want).norm() / want.norm()).item())
            p.append(int(want.argmax()))
        logits = runner.execute(build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], 4))
        for i, p in enumerate(prompts):
            want = model(torch.tensor([p])).logits[0, -1]
            errs.append(((logits[i] - want).norm() / want.norm()).item())
    wrapper_text = (art.path / "wrapper.py").read_text()
    print("RESULT" + json.dumps({{"errs": errs, "calls": dict(npu_reference_ops.calls),
                                  "imports": [l for l in wrapper_text.splitlines()
                                              if l.startswith("from kiln.backends")]}}))
""")


def test_kiln_compile_npu_artifact_runs_on_cpu_reference_ops(tmp_path):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _COMPILE_AND_RUN.format(tests=tests, tmp=str(tmp_path))
    env = {**os.environ, "KILN_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert max(result["errs"]) < 1e-5, result["errs"]
    assert any("kiln.backends.npu import paged_attention" in l for l in result["imports"])
    assert {"npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul", "npu_swiglu",
            "npu_fused_infer_attention_score"} <= set(result["calls"]), result["calls"]
