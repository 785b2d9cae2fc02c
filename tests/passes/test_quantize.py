"""quantize (opt-in fp8 / int8 W8A8) and fuse.quant: what gets quantised, that the ops
in the graph implement `kiln_ref.quantize_weight` + per-token activation quantisation,
and how close the quantised models stay to the unquantised ones."""
from __future__ import annotations

import pytest
import torch

import models
from fusion import compile_and_compare, counts, rel_err
from kiln.ir import kiln_ref, parse, run, verify
from kiln.passes import PassManager

LINEAR = """func @f(%x: f32[s0, 5, 32], %w: f32[48, 32], %b: f32[48], %v: f32[16, 48]) -> f32[s0, 5, 16]
    where s0 in [1, 64] {
  %0 = aten.reshape(%x, shape=[-1, 32]) : f32[5*s0, 32]
  %1 = aten.permute(%w, dims=[1, 0]) : f32[32, 48]
  %2 = aten.addmm(%b, %0, %1) : f32[5*s0, 48]
  %3 = aten.permute(%v, dims=[1, 0]) : f32[48, 16]
  %4 = aten.mm(%2, %3) : f32[5*s0, 16]
  %5 = aten.reshape(%4, shape=[-1, 5, 16]) : f32[s0, 5, 16]
  %6 = aten.neg(%5) : f32[s0, 5, 16]
  return %6
}
"""


def _quantize(text, quant):
    g = parse(text)
    pm = PassManager(passes=["quantize"], verify_each=True, options={"quant": quant})
    pm.run(g)
    return g, pm.stats[0].rewrites


def test_off_by_default():
    g, n = _quantize(LINEAR, None)
    assert n == 0 and "kiln.scaled_mm" not in counts(g)


@pytest.mark.parametrize("quant, qdtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_linear_layers_become_scaled_mm_with_reference_semantics(quant, qdtype):
    g, n = _quantize(LINEAR, quant)
    assert n == 2
    c = counts(g)
    assert c["kiln.scaled_mm"] == 2 and c["aten.mm"] == c["aten.addmm"] == 0
    qop = "kiln.quant_int8" if quant == "int8" else "kiln.quant_fp8"
    assert c[qop] == 4                               # 2 weights + 2 activations
    x, w, b, v = torch.randn(3, 5, 32), torch.randn(48, 32), torch.randn(48), torch.randn(16, 48)
    (out,) = run(g, [x, w, b, v])
    # the same computation from the reference definitions
    wq, ws = kiln_ref.quantize_weight(w, qdtype)
    aq, as_ = kiln_ref.quantize(x.reshape(-1, 32), qdtype)
    h = kiln_ref.scaled_mm(aq, as_, wq, ws, b, torch.float32)
    vq, vs = kiln_ref.quantize_weight(v, qdtype)
    hq, hs = kiln_ref.quantize(h, qdtype)
    want = -kiln_ref.scaled_mm(hq, hs, vq, vs, None, torch.float32).reshape(3, 5, 16)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    exact = -(torch.nn.functional.linear(torch.nn.functional.linear(x, w, b), v))
    print(f"{quant}: one linear pair, relative error {rel_err(out, exact):.3e}")
    assert rel_err(out, exact) < (0.1 if quant == "fp8" else 0.03)


def test_lm_head_is_not_quantised():
    head = LINEAR.replace("%6 = aten.neg(%5) : f32[s0, 5, 16]\n", "").replace("return %6", "return %5")
    g, n = _quantize(head, "int8")
    assert n == 1                                    # the second linear only feeds the output
    verify(g)


def _per_token_errors(outs, ref):
    """Relative error of each token's logits row, over every call."""
    errs = []
    for a, b in zip(outs, ref):
        a = a.double().reshape(-1, a.shape[-1])
        b = b.double().reshape(-1, b.shape[-1])
        errs.append((a - b).norm(dim=-1) / b.norm(dim=-1))
    return torch.cat(errs)


def expected_tiny(layers, moe):
    linears = layers * (4 if moe else 7)             # q k v o (+ gate up down); experts and
    return linears                                   # the router stay, the LM head too


@pytest.mark.parametrize("quant, bound", [("fp8", 0.2), ("int8", 0.08)])
@pytest.mark.parametrize("name", ["llama_gqa", "mixtral"])
def test_tiny_models_quantised(name, quant, bound):
    moe = name == "mixtral"
    model = models.TINY_MODELS[name]()
    graphs, outs, ref = compile_and_compare(model, options={"quant": quant})
    errs = [rel_err(a, b) for a, b in zip(outs, ref)]
    print(f"{name} {quant}: logits relative error per call", ["%.3f" % e for e in errs])
    if moe:
        # Quantisation noise upstream of the (unquantised) router flips near-tied expert
        # choices of a few tokens in some runs, and those tokens then differ by a whole
        # expert (seen: a fifth to a quarter of 20 tokens); so the bound is per token and
        # half the tokens must meet it. A wrong scale or layout misses it on every token.
        per_token = _per_token_errors(outs, ref)
        print(f"{name} {quant}: per-token error quartiles",
              [f"{q:.3f}" for q in per_token.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=per_token.dtype)).tolist()])
        assert per_token.median() < bound
    else:
        assert max(errs) < bound
    for g in graphs:
        c = counts(g)
        assert c["kiln.scaled_mm"] == expected_tiny(2, moe), str(g)
        assert c["aten.mm"] == (3 if moe else 1)     # LM head (+ one router per layer)
        assert c["kiln.attention"] == 2 and c["kiln.rope"] == 4
        assert c["kiln.fused_moe"] == (2 if moe else 0)
        # fuse.quant: every quantised activation that follows a norm or silu_mul joins it
        assert c["kiln.rms_norm_quant"] == 1
        assert c["kiln.fused_add_rms_norm_quant"] == (1 if moe else 3)
        assert c["kiln.silu_mul_quant"] == (0 if moe else 2)
        assert c["kiln.rms_norm"] == 0 and c["kiln.silu_mul"] == 0
        assert c["kiln.fused_add_rms_norm"] == (3 if moe else 1)   # before MoE / LM head


# A fixed text in four 64-token parts (prose, science, a recipe, code); positions are
# teacher-forced, so every position is compared on identical inputs.
TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
    "wine making. Within fifty years printers had spread to more than two hundred cities "
    "across Europe, and the price of books fell so far that reading became common among "
    "merchants and craftsmen.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn "
    "light energy into chemical energy. Inside the chloroplasts, chlorophyll absorbs "
    "sunlight, and the energy is used to split water molecules, releasing oxygen and "
    "producing sugars from carbon dioxide taken from the air. Almost all life on Earth "
    "depends on it, directly or indirectly, because plants form the base of nearly every "
    "food chain.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan over medium "
    "heat. Add a chopped onion and cook it slowly until it is soft and golden, then stir in "
    "two cloves of garlic. Pour in a can of crushed tomatoes, season with salt and pepper, "
    "and let the sauce simmer for twenty minutes.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
    "        return n\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n"
    "    return b\n\n\nfor i in range(10):\n    print(i, fibonacci(i))\n",
]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2, module_compile_cache):
    model, tok = smollm2
    ids = torch.stack([tok(t, return_tensors="pt")["input_ids"][0, :64] for t in TEXTS])
    assert ids.shape == (4, 64)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    return model, ids, ref


@pytest.mark.slow
@pytest.mark.parametrize("quant, bound", [("fp8", 0.2), ("int8", 0.2)])
def test_smollm2_teacher_forced_top1(smollm2_reference, quant, bound):
    model, ids, ref = smollm2_reference
    torch._dynamo.reset()
    graphs = []
    fn = torch.compile(model, backend="kiln", options={"quant": quant, "observer": graphs.append})
    with torch.no_grad():
        out = fn(input_ids=ids, use_cache=False).logits
    torch._dynamo.reset()
    c = counts(graphs[0].graph)
    # 30 layers x 7 linears, less the first and last layer (full precision), less the head
    assert c["kiln.scaled_mm"] == 28 * 7
    agree = (out.argmax(-1) == ref.argmax(-1)).float()
    err = rel_err(out, ref)
    per_text = [f"{a:.3f}" for a in agree.mean(-1).tolist()]
    print(f"SmolLM2 {quant}: logits relative error {err:.3f}; teacher-forced top-1 agreement "
          f"{agree.mean().item():.3f} over {agree.numel()} positions (per part: {per_text})")
    assert err < bound
    # Near-tied tokens decide this: the cpu target's TVM norms (prepare.align), whose outputs
    # differ from torch's by ~2e-7, move int8 from 91.8% to 89.5% (fp8: 93.4% to 92.6%)
    # while the logits' error falls (0.125 to 0.121). A broken quantisation agrees on
    # almost nothing.
    assert agree.mean().item() >= 0.87


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            ids[:, 1:].reshape(-1))
    return nll.exp().item()


def _weight_only(model, ids, quant):
    torch._dynamo.reset()
    graphs = []
    fn = torch.compile(model, backend="kiln", options={"quant": quant, "observer": graphs.append})
    with torch.no_grad():
        out = fn(input_ids=ids, use_cache=False).logits
    torch._dynamo.reset()
    return out, counts(graphs[0].graph)


@pytest.mark.slow
def test_smollm2_int8_weight_only_keeps_top1(smollm2_reference):
    """Weight-only int8 (every linear, the LM head included, whose 16 best logits are then
    recomputed in fp32; activations fed to the CPU kernel as bf16): teacher-forced top-1
    agreement with fp32 over the texts above: 96.1% measured (per-channel scales over
    weights that were Q4_1 in 32-element blocks; 94.5% before the head's refinement); a
    broken quantisation agrees on almost nothing."""
    model, ids, ref = smollm2_reference
    out, c = _weight_only(model, ids, "int8_weight_only")
    # q/k/v and gate/up merged (fuse.parallel_linear merges on the cpu under weight-only quant)
    assert c["kiln.weight_int8_mm"] == 30 * 4 + 1 and c["kiln.refine_top_logits"] == 1
    assert c["aten.mm"] == 0 and c["kiln.scaled_mm"] == 0
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    err = rel_err(out, ref)
    print(f"SmolLM2 int8_weight_only: logits relative error {err:.4f}; teacher-forced top-1 "
          f"agreement {agree:.4f}; perplexity {_perplexity(out, ids):.3f} (fp32 "
          f"{_perplexity(ref, ids):.3f})")
    assert err < 0.07 and agree >= 0.93


@pytest.mark.slow
def test_smollm2_grouped_int8_keeps_top1(smollm2_reference):
    """Grouped int8 (asymmetric, groups of 32, every linear and the LM head, whose top logits
    are then refined) on the cpu target, where TVM's GEMV and torch's GEMM both keep the
    activations in float32: issue #14's >= 99% teacher-forced top-1 agreement with fp32.
    SmolLM2's Q4_1 blocks come back exactly in int8's 255 steps (17 to each of Q4_1's 15),
    and its LM head's Q8_0 blocks on their own grid (amax / 127), so what is left is fp32
    rounding: measured 100% (0 of 256 differ), logits' relative error 1.7e-6, perplexity
    equal to 4 decimals. Per-channel scales over the same weights agree on 96.1% (above)."""
    model, ids, ref = smollm2_reference
    out, c = _weight_only(model, ids, "int8_weight_only_g32")
    assert c["kiln.weight_int8_grouped_mm"] == 30 * 4 + 1 and c["kiln.refine_top_logits"] == 1
    assert c["kiln.quant_int8_grouped"] == 30 * 4 + 1
    assert c["aten.mm"] == 0 and c["kiln.weight_int8_mm"] == 0
    agree = (out.argmax(-1) == ref.argmax(-1)).float()
    err = rel_err(out, ref)
    ppl, ppl_ref = _perplexity(out, ids), _perplexity(ref, ids)
    print(f"SmolLM2 int8_weight_only_g32: logits relative error {err:.2e}; teacher-forced "
          f"top-1 agreement {agree.mean().item():.4f} ({int((1 - agree).sum())} of "
          f"{agree.numel()} differ); perplexity {ppl:.4f} (fp32 {ppl_ref:.4f})")
    assert agree.mean().item() >= 0.99
    assert err < 1e-4 and abs(ppl / ppl_ref - 1) < 1e-4


@pytest.mark.slow
def test_smollm2_int4_weight_only_keeps_top1(smollm2_reference):
    """The CPU's default path. SmolLM2's GGUF stores its linears as Q4_1 blocks of 32, which
    kiln's int4 takes back exactly (in fp32 scales); on the cpu target what is left is bf16
    scale and zero, bf16 arithmetic on activations fed as two bf16 halves, and the int8 LM
    head refined at the top. Teacher-forced top-1 agreement with fp32 over the texts above:
    issue #14's goal is >= 99%. Measured: 99.6% (1 of 256) with torch's norms, 98.0% (5 of
    256) with the cpu target's TVM norms, whose outputs differ from torch's by ~2e-7: torch's
    int4 kernel rounds its inputs to bf16 halves, a 1e-7 change moves its output by ~6e-5,
    and 30 layers of that move the logits by ~1e-2 and flip near-tied tokens. The same
    weights through TVM's int4 GEMV (float32 x) agree on 99.6% (bench/cpu_kernels.py
    --accuracy). Perplexity within 1%. q/k/v and gate/up run merged
    (fuse.parallel_linear), each merged weight still exact."""
    from kiln.quant_choice import int4_inexact
    model, ids, ref = smollm2_reference
    assert int4_inexact(model) is None            # every Q4_1 block comes back exactly
    out, c = _weight_only(model, ids, "int4_weight_only")
    assert c["kiln.weight_int4_mm"] == 30 * 4 and c["kiln.quant_int4"] == 30 * 4   # merged
    assert c["kiln.weight_int8_mm"] == 1 and c["kiln.refine_top_logits"] == 1
    assert c["aten.mm"] == 0
    agree = (out.argmax(-1) == ref.argmax(-1)).float()
    err = rel_err(out, ref)
    ppl, ppl_ref = _perplexity(out, ids), _perplexity(ref, ids)
    print(f"SmolLM2 int4_weight_only: logits relative error {err:.4f}; teacher-forced top-1 "
          f"agreement {agree.mean().item():.4f} ({int((1 - agree).sum())} of {agree.numel()} "
          f"differ); perplexity {ppl:.3f} (fp32 {ppl_ref:.3f})")
    assert agree.mean().item() >= 0.98
    assert err < 0.03 and abs(ppl / ppl_ref - 1) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_weight_int8_mm_matches_the_reference(dtype, bias):
    """The cpu target's kiln.weight_int8_mm (torch's int8-weight GEMM, bf16 activations)
    against kiln_ref's (fp32 activations): bf16's bound."""
    from kiln.backends import cpu_kernels
    torch.manual_seed(0)
    x = torch.randn(5, 96, dtype=dtype)
    q, s = kiln_ref.quant_int8(torch.randn(40, 96) * 0.1)
    b = torch.randn(40, dtype=dtype) if bias else None
    got, want = cpu_kernels.weight_int8_mm(x, q, s, b), kiln_ref.weight_int8_mm(x, q, s, b)
    assert got.dtype == want.dtype == dtype and got.shape == (5, 40)
    assert rel_err(got, want) < 1e-2


# -- weight-only int4 ------------------------------------------------------------------------------
def _q4_1_blocks(n: int, k: int, codes_lo: int = 0, codes_hi: int = 15) -> torch.Tensor:
    """An [n, k] weight as a GGUF Q4_1 file stores it, dequantised to fp32 the way gguf-py
    does: blocks of 32 along k, w = d * q + m with d and m float16 and q in codes_lo..codes_hi
    (each block using both ends, as llama.cpp's quantiser makes them)."""
    blocks = k // 32
    d = (torch.rand(n, blocks, 1) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, blocks, 1) * 0.1).half().float()
    q = torch.randint(codes_lo, codes_hi + 1, (n, blocks, 32)).float()
    q[..., 0], q[..., 1] = codes_lo, codes_hi
    return (d * q + m).reshape(n, k)


def test_int4_layout_is_what_torch_cpu_gemm_reads_after_repacking():
    """kiln's int4 layout, written in plain torch by kiln_ref, unpacks back; it is byte
    for byte what torch's CPU int4 GEMM reads on AVX-512, and elsewhere (AVX2, plain C++)
    the cpu target's repacking gives exactly torch's own packing (a torch upgrade that
    changes either fails here)."""
    from kiln.backends import cpu_kernels
    for n, k in [(64, 64), (192, 96), (128, 576)]:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        packed = kiln_ref.int4_pack(codes)
        assert torch.equal(kiln_ref.int4_unpack(packed), codes)
        torchs = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
        assert torch.equal(cpu_kernels.torch_int4_layout(packed), torchs)
        assert torch.equal(packed, torchs) == cpu_kernels.torch_packs_kiln_int4_layout()
    w = torch.randn(128, 96)
    for scale_dtype in (torch.float32, torch.bfloat16):
        got = cpu_kernels.quant_int4(w, 32, scale_dtype)
        want = kiln_ref.quant_int4(w, 32, scale_dtype)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert got[1].dtype == scale_dtype and got[1].shape == (3, 128, 2)


@pytest.mark.parametrize("codes", [(0, 15), (1, 13), (3, 9)])
def test_q4_blocks_come_back_exactly(codes):
    """A group of 32 that a 4-bit GGUF stored (Q4_1: d * q + m; codes that need not reach
    0 or 15, as in Q4_0) is on a grid of at most 16 evenly spaced levels, and kiln's int4
    (scale = d, zero = m + 8 d, in float32) gives every weight back bit for bit; in bf16
    scales (torch's CPU kernel) only to bf16's 8 significant bits."""
    w = _q4_1_blocks(128, 96, *codes)
    w_q, w_sz = kiln_ref.quant_int4(w, 32)
    back = kiln_ref.int4_dequantize(w_q, w_sz, 32)
    assert torch.equal(back, w), (back - w).abs().max()
    w_q, w_sz = kiln_ref.quant_int4(w, 32, torch.bfloat16)
    assert 0 < rel_err(kiln_ref.int4_dequantize(w_q, w_sz, 32), w) < 4e-3


def test_int4_of_weights_that_were_never_4_bit():
    """Ordinary weights: 16 levels from each group's min to its max (the usual asymmetric
    int4 error, a step of (max - min) / 15), and a group of one value exactly."""
    w = torch.randn(64, 64)
    w[3, :32] = 0.25
    w_q, w_sz = kiln_ref.quant_int4(w, 32)
    back = kiln_ref.int4_dequantize(w_q, w_sz, 32)
    assert torch.equal(back[3, :32], w[3, :32])
    step = w_sz[..., 0].t().repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert 0.03 < rel_err(back, w) < 0.12


def test_quant_int4_names_a_shape_it_cannot_take():
    with pytest.raises(ValueError, match=r"output features 40 are not a multiple of 64"):
        kiln_ref.quant_int4(torch.randn(40, 64), 32)
    with pytest.raises(ValueError, match=r"input features 96 are not a multiple of the group size 64"):
        kiln_ref.quant_int4(torch.randn(64, 96), 64)
    with pytest.raises(ValueError, match=r"group_size must be one of 32, 64, 128, 256"):
        kiln_ref.quant_int4(torch.randn(64, 96), 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group_size", [32, 64])
def test_cpu_weight_int4_mm_matches_the_reference(dtype, bias, group_size):
    """The cpu target's kiln.weight_int4_mm (torch's int4 GEMM on bf16 activations) against
    kiln_ref's float32 one: bf16's bound. An fp32 x goes in as two bf16 halves, which must
    beat feeding it as one bf16 row (the point of the split)."""
    from kiln.backends import cpu_kernels
    w_q, w_sz = cpu_kernels.quant_int4(torch.randn(128, 192) * 0.1, group_size, torch.bfloat16)
    x = torch.randn(5, 192, dtype=dtype)
    b = torch.randn(128, dtype=dtype) if bias else None
    got = cpu_kernels.weight_int4_mm(x, w_q, w_sz, b, group_size=group_size)
    want = kiln_ref.weight_int4_mm(x, w_q, w_sz, b, group_size=group_size)
    assert got.dtype == want.dtype == dtype and got.shape == (5, 128)
    assert rel_err(got, want) < 1e-2
    if dtype == torch.float32:
        one_row = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16),
                                                  cpu_kernels.torch_int4_layout(w_q), group_size, w_sz)
        one_row = one_row.float() + (b if bias else 0)
        assert rel_err(got, want) < 0.9 * rel_err(one_row, want)


def test_refine_top_logits_recomputes_the_best_entries():
    x, w, b = torch.randn(3, 32), torch.randn(100, 32), torch.randn(100)
    exact = x @ w.t() + b
    approx = exact + 0.05 * torch.randn(3, 100)
    out = kiln_ref.refine_top_logits(approx, x, w, b, k=5)
    top = approx.topk(5, dim=-1).indices
    torch.testing.assert_close(out.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
    rest = torch.ones_like(out, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(out[rest], approx[rest])
    assert torch.equal(out.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("quant, group", [("int4_weight_only", 32), ("int4_weight_only_g64", 64)])
def test_int4_rule_on_the_tiny_llama(quant, group):
    """On the cpu, weight-only quantisation merges q/k/v and gate/up (fuse.parallel_linear),
    so each layer runs 4 kiln.weight_int4_mm (q/k/v 128 outputs, o 64, gate/up 256, down
    64: shapes kiln's int4 layout takes); the LM head is int8, its top logits refined."""
    torch.manual_seed(0)   # unseeded, the error below ranged 0.18-0.38 over runs
    model = models.TINY_MODELS["llama_gqa"]()
    graphs, outs, ref = compile_and_compare(model, options={"quant": quant})
    errs = [rel_err(a, b) for a, b in zip(outs, ref)]
    print(f"llama_gqa {quant}: logits relative error per call", ["%.3f" % e for e in errs])
    # Random weights are not 4-bit: 16 levels a group cost them ~8% (0.20-0.32 on the
    # logits at this seed); a wrong layout or scale gives ~1.
    assert max(errs) < 0.35
    for g in graphs:
        c = counts(g)
        assert c["kiln.weight_int4_mm"] == 2 * 4 and c["kiln.quant_int4"] == 2 * 4
        assert c["kiln.weight_int8_mm"] == 1 and c["kiln.refine_top_logits"] == 1
        assert c["aten.mm"] == c["aten.addmm"] == c["kiln.scaled_mm"] == 0
        sizes = {n.attrs.get("group_size", 32) for n in g.nodes if n.op == "kiln.weight_int4_mm"}
        assert sizes == {group}
        assert all(n.attrs["scale_dtype"] == torch.bfloat16 for n in g.nodes
                   if n.op == "kiln.quant_int4")


def test_int4_leaves_to_int8_the_shapes_its_layout_does_not_take():
    """Unmerged, k and v have 32 outputs (not a multiple of 64): they run as int8; q, o,
    gate, up and down as int4."""
    from capture import captured
    from kiln.backends.targets import get_target
    _, compiled = captured("llama_gqa")
    g = parse(dict(compiled[-1].snapshots)["input"])
    PassManager(options={"target": get_target("cpu"), "quant": "int4_weight_only"},
                disabled={"fuse.parallel_linear"}, verify_each=True).run(g)
    c = counts(g)
    assert c["kiln.weight_int4_mm"] == 2 * 5 and c["kiln.weight_int8_mm"] == 2 * 2 + 1
    assert c["aten.mm"] == 0
