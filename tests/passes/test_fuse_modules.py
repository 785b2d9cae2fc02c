"""The fusion passes on small nn.Modules compiled with kiln: every spelling of RMSNorm,
attention (SDPA and by hand, with and without GQA), RoPE and the gated activation ends
in one fused op, and the compiled module computes what eager does."""
from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F

H = 32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_run(mod, *inputs):
    """(fused graph, compiled outputs, eager outputs)."""
    graphs = []
    fn = torch.compile(mod, backend="kiln", options={"observer": graphs.append, "verify": True})
    with torch.no_grad():
        out = fn(*inputs)
        ref = mod(*inputs)
    assert len(graphs) == 1
    return graphs[0].graph, out, ref


def rel(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err
    return err


def counts(g):
    return collections.Counter(n.op for n in g.nodes)


def check(mod, inputs, fused: dict, gone=(), tol=1e-5):
    g, out, ref = compile_run(mod, *inputs)
    c = counts(g)
    for op, n in fused.items():
        assert c[op] == n, (op, c[op], str(g))
    for op in gone:
        assert c[op] == 0, (op, str(g))
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for a, b in zip(outs, refs):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) < tol, rel(a, b)
    return g


# ---------------------------------------------------------------- RMSNorm

class Norm(torch.nn.Module):
    def __init__(self, style: str, dtype=torch.float32, eps=1e-6):
        super().__init__()
        self.style, self.eps = style, eps
        self.w = torch.nn.Parameter(torch.rand(H, dtype=dtype) + 0.5, requires_grad=False)

    def forward(self, x):
        w, eps = self.w, self.eps
        if self.style == "llama":          # transformers' LlamaRMSNorm
            xf = x.to(torch.float32)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return w * xf.to(x.dtype)
        if self.style == "normed_times_w":
            return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w
        if self.style == "rsqrt_first":
            return w * (torch.rsqrt(eps + x.pow(2).mean(dim=-1, keepdim=True)) * x)
        if self.style == "F.rms_norm":
            return F.rms_norm(x, (H,), w, eps)
        if self.style == "torch.rms_norm":
            return torch.rms_norm(x, (H,), w)
        if self.style == "div_sqrt":
            return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        if self.style == "x_times_x":      # canonical form: x * x is pow(x, 2)
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w
        if self.style == "sum_over_n":     # canonical form: sum / n is mean
            return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / H + eps) * w
        raise ValueError(self.style)


NORM_LEFTOVERS = ("aten.pow", "aten.mean", "aten.rsqrt", "aten.sqrt", "aten.div", "aten.sum")


@pytest.mark.parametrize("style", ["llama", "normed_times_w", "rsqrt_first", "F.rms_norm",
                                   "torch.rms_norm", "div_sqrt", "x_times_x", "sum_over_n"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_styles_fuse(style, dtype):
    x = torch.randn(2, 5, H, dtype=dtype) * 3
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    g = check(Norm(style, dtype), [x], {"kiln.rms_norm": 1},
              NORM_LEFTOVERS + ("aten._to_copy", "prims.convert_element_type"), tol)
    assert g.nodes[-1].op == "kiln.rms_norm" or counts(g)["kiln.rms_norm"] == 1


def test_rms_norm_eps_is_carried():
    g = check(Norm("llama", eps=1e-3), [torch.randn(3, H)], {"kiln.rms_norm": 1})
    (n,) = [n for n in g.nodes if n.op == "kiln.rms_norm"]
    assert n.attrs["eps"] == 1e-3


class AddNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Norm("llama")

    def forward(self, x, residual):
        h = residual + x
        return self.norm(h), h * 2


def test_residual_add_and_rms_norm_fuse_with_two_outputs():
    check(AddNorm(), [torch.randn(2, 4, H), torch.randn(2, 4, H)],
          {"kiln.fused_add_rms_norm": 1, "kiln.rms_norm": 0}, NORM_LEFTOVERS + ("aten.add",))


class NormAndStats(torch.nn.Module):
    """The variance is also returned: an interior value with an outside use."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(H), requires_grad=False)

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.w * (x * torch.rsqrt(var + 1e-6)), var


def test_norm_whose_interior_is_used_elsewhere_is_left_alone():
    check(NormAndStats(), [torch.randn(3, H)], {"kiln.rms_norm": 0})


# ---------------------------------------------------------------- attention

def repeat_kv(x, n):
    """transformers' repeat_kv."""
    b, h, s, d = x.shape
    if n == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Sdpa(torch.nn.Module):
    def __init__(self, mode: str, n_rep: int = 1):
        super().__init__()
        self.mode, self.n_rep = mode, n_rep

    def forward(self, q, k, v, mask=None):
        if self.mode == "gqa_flag":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mode == "mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        raise ValueError(self.mode)


class Eager(torch.nn.Module):
    """Hand-written attention, as transformers' eager_attention_forward."""
    def __init__(self, n_rep: int = 1, scale: str = "mul", f32_softmax: bool = False):
        super().__init__()
        self.n_rep, self.scale, self.f32_softmax = n_rep, scale, f32_softmax

    def forward(self, q, k, v, mask=None):
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        if self.scale == "mul":
            s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s + mask
        if self.f32_softmax:
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            p = torch.softmax(s, dim=-1)
        return torch.matmul(p, v)


class Spelled(torch.nn.Module):
    """Hand-written GQA attention in other ordinary spellings: K/V repeated with
    repeat_interleave or expand, a causal mask by triu (added, or filled in with -inf), the
    softmax written out."""
    def __init__(self, repeat: str, mask: str, softmax: str):
        super().__init__()
        self.repeat, self.mask, self.softmax = repeat, mask, softmax

    def forward(self, q, k, v):
        n, s = q.shape[1] // k.shape[1], q.shape[2]
        if self.repeat == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        else:
            k, v = repeat_kv(k, n), repeat_kv(v, n)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if self.mask == "additive_triu":
            scores = scores + torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
        else:
            scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        if self.softmax == "spelled_out":
            e = torch.exp(scores - scores.amax(-1, keepdim=True))
            p = e / e.sum(-1, keepdim=True)
        else:
            p = torch.softmax(scores, dim=-1)
        return p @ v


@pytest.mark.parametrize("repeat", ["repeat_interleave", "expand"])
@pytest.mark.parametrize("mask", ["additive_triu", "masked_fill_triu"])
@pytest.mark.parametrize("softmax", ["torch", "spelled_out"])
def test_hand_written_gqa_attention_spellings_fuse(repeat, mask, softmax):
    g = check(Spelled(repeat, mask, softmax), list(qkv(hq=8, hkv=2)), {"kiln.attention": 1},
              ATTN_LEFTOVERS + ("aten.exp", "aten.amax", "aten.masked_fill", "aten.where"))
    n = attention_node(g)
    assert n.args[1].type.shape[1] == 2                # K is never repeated
    assert n.attrs["causal"] is True and n.args[3] is None   # the triu mask read as causal


def qkv(hq=4, hkv=4, sq=6, skv=6, d=16, dtype=torch.float32):
    return (torch.randn(2, hq, sq, d, dtype=dtype), torch.randn(2, hkv, skv, d, dtype=dtype),
            torch.randn(2, hkv, skv, d, dtype=dtype))


ATTN_LEFTOVERS = ("aten._softmax", "aten.bmm", "aten.expand",
                  "aten._scaled_dot_product_flash_attention_for_cpu")


def attention_node(g):
    (n,) = [n for n in g.nodes if n.op == "kiln.attention"]
    return n


def float_mask(sq, skv):
    return torch.where(torch.rand(1, 1, sq, skv) > 0.3, 0.0, -1e9)


@pytest.mark.parametrize("n_rep", [1, 2])
def test_sdpa_causal(n_rep):
    q, k, v = qkv(hkv=4 // n_rep)
    g = check(Sdpa("causal", n_rep), [q, k, v], {"kiln.attention": 1}, ATTN_LEFTOVERS)
    n = attention_node(g)
    assert n.attrs["causal"] is True and n.attrs["scale"] == pytest.approx(0.25)
    assert n.args[1].type.shape[1] == 4 // n_rep      # K is never repeated


@pytest.mark.parametrize("n_rep", [1, 2])
def test_sdpa_with_float_mask(n_rep):
    q, k, v = qkv(hkv=4 // n_rep, sq=1, skv=9)
    g = check(Sdpa("mask", n_rep), [q, k, v, float_mask(1, 9)], {"kiln.attention": 1},
              ATTN_LEFTOVERS)
    n = attention_node(g)
    assert n.attrs == {"scale": 0.3, "causal": False} and n.args[3] is not None


def test_sdpa_with_bool_mask():
    q, k, v = qkv(sq=3, skv=5)
    mask = torch.rand(2, 1, 3, 5) > 0.2
    mask[..., 0] = True
    check(Sdpa("mask"), [q, k, v, mask], {"kiln.attention": 1}, ATTN_LEFTOVERS)


def test_sdpa_enable_gqa():
    check(Sdpa("gqa_flag"), list(qkv(hkv=2)), {"kiln.attention": 1}, ATTN_LEFTOVERS)


def test_sdpa_causal_with_unequal_lengths_is_not_fused():
    # torch's is_causal is top-left aligned, kiln's bottom-right: different semantics
    check(Sdpa("causal"), list(qkv(sq=3, skv=6)), {"kiln.attention": 0})


@pytest.mark.parametrize("mod", [Sdpa("causal"), Eager(1)], ids=["sdpa", "hand_written"])
def test_values_narrower_than_keys_are_not_fused(mod):
    # Multi-head latent attention (DeepSeek): no attention kernel takes two head dims.
    q, k, v = qkv()
    check(mod, [q, k, v[..., :8].contiguous()], {"kiln.attention": 0})


@pytest.mark.parametrize("n_rep", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_hand_written_attention(n_rep, masked):
    q, k, v = qkv(hkv=4 // n_rep, sq=5, skv=7)
    args = [q, k, v] + ([float_mask(5, 7)] if masked else [])
    g = check(Eager(n_rep), args, {"kiln.attention": 1}, ATTN_LEFTOVERS + ("aten.mul",))
    n = attention_node(g)
    assert n.attrs == {"scale": 0.25, "causal": False}
    assert (n.args[3] is not None) == masked
    assert n.args[1].type.shape[1] == 4 // n_rep


def test_hand_written_attention_divided_by_sqrt_d():
    g = check(Eager(2, scale="div"), list(qkv(hkv=2)), {"kiln.attention": 1},
              ATTN_LEFTOVERS + ("aten.div",))
    assert attention_node(g).attrs["scale"] == pytest.approx(0.25)


def test_hand_written_attention_bf16_with_float32_softmax():
    q, k, v = qkv(hkv=2, dtype=torch.bfloat16)
    check(Eager(2, f32_softmax=True), [q, k, v, float_mask(6, 6).bfloat16()],
          {"kiln.attention": 1}, ATTN_LEFTOVERS + ("aten._to_copy",), tol=1e-2)


# ---------------------------------------------------------------- RoPE, activation

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rope(torch.nn.Module):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1)."""
    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_rope_one_per_q_and_k():
    q, k, _ = qkv(hkv=2)
    ang = torch.randn(2, 6, 8)
    emb = torch.cat([ang, ang], dim=-1)
    g = check(Rope(), [q, k, emb.cos(), emb.sin()], {"kiln.rope": 2},
              ("aten.cat", "aten.neg", "aten.slice", "aten.unsqueeze"))
    assert all(n.args[1].type.rank == 3 for n in g.nodes if n.op == "kiln.rope")


class Mlp(torch.nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.act = act

    def forward(self, gate, up):
        if self.act == "F.silu":
            return F.silu(gate) * up
        return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("act", ["F.silu", "x*sigmoid(x)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(act, dtype):
    gate, up = torch.randn(3, 5, 64, dtype=dtype), torch.randn(3, 5, 64, dtype=dtype)
    check(Mlp(act), [gate, up], {"kiln.silu_mul": 1}, ("aten.sigmoid", "aten.mul"),
          tol=1e-5 if dtype == torch.float32 else 1e-2)
