"""serve.kv_cache on tiny models (Llama-GQA, Qwen3, Mistral with a sliding window, Mixtral
MoE): the serving graph, run by the PagedModelRunner over real paged KV blocks for several
interleaved sequences (chunked prefill, prefix-cache hits and decode in the same steps), gives HF eager's logits (fp32 rel
err < 1e-5), and greedy through the engine gives HF eager's tokens."""
import random

import pytest
import torch

import models
from kiln.ir import parse, print_graph, verify
from kiln.passes import PassContext
from kiln.passes.serve_kv_cache import NotAServingCapture, serve_kv_cache
from kiln.runtime.batch import build_batch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.kv_cache import BlockManager
from kiln.ir.roles import BATCH_INPUTS
from kiln.runtime.model_runner import PagedModelRunner, decode_buckets, mixed_seq_buckets, pick_bucket
from kiln.runtime.scheduler import Scheduler, SchedulerConfig
from kiln.runtime.sequence import SamplingParams, Sequence
from kiln.serving import compile_serving, model_weights

BLOCK = 4   # small blocks: every sequence spans several, prefix hits are common


def rel_err(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


@pytest.fixture(scope="module", params=["llama_gqa", "qwen3", "mistral_sw", "mixtral"])
def paged(request):
    model = models.TINY_MODELS[request.param]()
    compiled = compile_serving(model, block_size=BLOCK, verify=True)
    return model, compiled


def runner_for(model, compiled, num_blocks=64, **kw):
    return PagedModelRunner(compiled.fn, compiled.graph, model_weights(model, compiled.graph), num_blocks=num_blocks,
                            max_model_len=128, vocab_size=model.config.vocab_size, **kw)


@torch.no_grad()
def eager_last_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1]


def test_signature(paged):
    model, compiled = paged
    g = compiled.graph
    layers = model.config.num_hidden_layers
    names = [v.name for v in g.inputs]
    assert names[:6] == list(BATCH_INPUTS)
    assert names[6:6 + 2 * layers] == [f"kv_cache.{i}.{kv}" for i in range(layers) for kv in "kv"]
    ops = [n.op for n in g.nodes]
    assert "kiln.attention" not in ops and ops.count("kiln.paged_attention") == layers
    cache = g.inputs[6].type
    assert cache.shape[1:] == (BLOCK, model.config.num_key_value_heads, model.config.head_dim)
    (out,) = g.outputs
    assert out.type.shape == (g.inputs[4].type.shape[0], model.config.vocab_size)   # [N, vocab]
    assert not any(v.type.__class__.__name__ == "SymIntType" for v in g.inputs)
    text = print_graph(g)
    assert print_graph(parse(text)) == text
    verify(parse(text))


def test_interleaved_sequences_match_eager(paged):
    """The real scheduler (chunked prefill, prefix caching) drives the runner; after every
    step each sequence's logits equal eager's on its whole context."""
    model, compiled = paged
    vocab = model.config.vocab_size
    runner = runner_for(model, compiled)
    blocks = BlockManager(runner.num_blocks, BLOCK, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), blocks)
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    shared = [rng.randrange(vocab) for _ in range(9)]
    prompts = [[rng.randrange(vocab) for _ in range(23)], shared + [rng.randrange(vocab) for _ in range(5)],
               [rng.randrange(vocab) for _ in range(3)], shared + [rng.randrange(vocab) for _ in range(8)]]
    arrivals = {0: [0, 1], 2: [2], 5: [3]}   # step -> prompts arriving
    seqs, errs, mixed_steps = [], [], 0
    for step in range(40):
        for p in arrivals.get(step, []):
            seqs.append(Sequence(prompts[p], SamplingParams(max_tokens=6)))
            sched.add(seqs[-1])
        st = sched.schedule()
        if st is None:
            break
        mixed_steps += len(set(n > 1 for n in st.num_new)) > 1
        logits = runner.execute(st.batch)
        ready = sched.advance(st)
        for i, (seq, ok) in enumerate(zip(st.seqs, ready)):
            if not ok:
                continue
            errs.append(rel_err(logits[i], eager_last_logits(model, seq.token_ids[:seq.num_computed])))
            seq.append(rng.randrange(vocab))   # teacher-forced: random next tokens
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    assert all(s.finished for s in seqs) and len(errs) == 4 * 6
    assert mixed_steps > 0, "no step mixed prefill chunks and decodes"
    assert blocks.hit_tokens > 0, "no prefix-cache hit"
    assert max(errs) < 1e-5, max(errs)
    assert blocks.num_used_blocks() == 0


class IdsTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def test_engine_greedy_equals_eager(paged):
    model, compiled = paged
    vocab = model.config.vocab_size
    runner = runner_for(model, compiled)
    engine = LLMEngine(runner, IdsTokenizer(), EngineConfig(max_num_batched_tokens=8))
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (11, 5, 17)]
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for p, o in zip(prompts, outs):
        want, _ = models.eager_greedy(model, torch.tensor([p]), 7)
        assert o.token_ids == want[0].tolist()


@pytest.mark.parametrize("pad_batches", [False, True], ids=["eager", "buckets"])
def test_async_scheduling_greedy_equals_eager(paged, pad_batches):
    """Step N+1 planned before step N's tokens are read: its decode inputs are placeholders
    the runner fills from step N's sampled tokens (in the bucket buffers, or the eager
    batch), with chunked prefills and prefix hits in the same steps."""
    model, compiled = paged
    vocab = model.config.vocab_size
    runner = runner_for(model, compiled, pad_batches=pad_batches, seq_buckets=(1, 2, 4, 8),
                        max_num_batched_tokens=8)
    engine = LLMEngine(runner, IdsTokenizer(), EngineConfig(max_num_batched_tokens=8, async_scheduling=True))
    shared = torch.randint(0, vocab, (9,)).tolist()
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (11, 5)] + [shared + [1, 2], shared + [3]]
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    prompts.append(shared + [4])   # its prefix blocks, hashed once their tokens were read
    outs += engine.generate(prompts[-1:], params)
    for p, o in zip(prompts, outs):
        want, _ = models.eager_greedy(model, torch.tensor([p]), 7)
        assert o.token_ids == want[0].tolist()
    assert engine.blocks.hit_tokens > 0 and engine.blocks.num_used_blocks() == 0


def test_padded_decode_buckets_match_unpadded(paged):
    """What CUDA graph replay runs (decode batches padded to a bucket, scratch rows writing
    the scratch block) gives the same logits and leaves the engine's blocks as unpadded."""
    model, compiled = paged
    vocab = model.config.vocab_size
    plain = runner_for(model, compiled, num_blocks=16)
    padded = runner_for(model, compiled, num_blocks=16, pad_batches=True, seq_buckets=(1, 2, 4, 8))
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (6, 3, 9)]
    tables = [[0, 1, 6], [2, 7], [3, 4, 5]]
    for r in (plain, padded):
        r.execute(build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK))
    for step in range(3):
        for p in prompts:
            p.append(random.randrange(vocab))
        live = [0, 1, 2] if step < 2 else [0, 2]   # the bucket shrinks from 4 to 2
        batch = build_batch([(prompts[i], len(prompts[i]) - 1, 1, tables[i]) for i in live], BLOCK)
        a, b = plain.execute(batch), padded.execute(batch)
        assert b.shape == a.shape and rel_err(b, a) < 1e-6
    assert sorted(padded._buffers) == [(2, 2), (4, 4), (32, 4)]   # the prefill: 18 tokens, 3 sequences
    for name, cache in plain.caches.items():   # (a batch of 4 rounds a little differently)
        torch.testing.assert_close(padded.caches[name][:16], cache[:16], rtol=1e-5, atol=1e-5)
        assert padded.caches[name][8:16].abs().sum() == 0, "padding wrote an engine block"


@pytest.mark.parametrize("max_seqs", [1, 7, 64, 100, 256])
def test_buckets_cover_every_batch_size_with_little_padding(max_seqs):
    decode = decode_buckets(max_seqs)
    assert decode[-1] == max_seqs and list(decode) == sorted(set(decode))
    for n in range(1, max_seqs + 1):
        b = min(x for x in decode if x >= n)
        assert b - n <= min(n - 1, 31), (n, b)        # at most double, at most 31 scratch rows
    mixed = mixed_seq_buckets(decode)
    assert set(mixed) <= set(decode) and mixed[-1] == max_seqs and len(mixed) <= 7
    for n in range(65, max_seqs + 1):   # past 64 sequences, fewer than 64 scratch ones
        assert min(x for x in mixed if x >= n) - n < 64, n


def test_decode_batches_past_64_sequences_replay_their_bucket(paged):
    """A 70-sequence decode batch pads to the 96 bucket of max_num_seqs 96 and gives the
    unpadded logits."""
    model, compiled = paged
    vocab = model.config.vocab_size
    plain = runner_for(model, compiled, num_blocks=210)
    padded = runner_for(model, compiled, num_blocks=210, pad_batches=True, seq_buckets=decode_buckets(96))
    prompts = [torch.randint(0, vocab, (random.randrange(2, 12),)).tolist() for _ in range(70)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(70)]   # 12 tokens each
    for p in prompts:
        p.append(random.randrange(vocab))
    batch = build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], BLOCK)
    # The prompts' K/V first (a mixed step: 70 sequences pad to the 96 of the mixed buckets).
    prefill = build_batch([(p, 0, len(p) - 1, t) for p, t in zip(prompts, tables)], BLOCK)
    for r in (plain, padded):
        r.execute(prefill)
    a, b = plain.execute(batch), padded.execute(batch)
    assert b.shape == a.shape == (70, vocab) and rel_err(b, a) < 1e-6
    assert padded.bucket_of(batch) == (96, 96) and padded.bucket_of(prefill)[1] == 96


@pytest.mark.parametrize("max_seqs,max_tokens", [(16, 64), (256, 2048), (8, 100)])
def test_mixed_buckets_are_every_bucket_a_batch_can_meet(max_seqs, max_tokens):
    """What `kiln serve` captures at start-up is exactly the set of buckets that batches with
    prefill chunks (t > n tokens in n sequences) run in: none missed, none wasted."""
    model = models.TINY_MODELS["llama_gqa"]()
    compiled = compile_serving(model, block_size=16)
    runner = PagedModelRunner(compiled.fn, compiled.graph, model_weights(model, compiled.graph),
                              num_blocks=8, max_model_len=128, vocab_size=model.config.vocab_size,
                              seq_buckets=decode_buckets(max_seqs), max_num_batched_tokens=max_tokens)
    met = set()
    for n in range(1, max_seqs + 1):
        seqs = pick_bucket(n, runner.mixed_seq_buckets)
        for t in range(n + 1, max_tokens + 1):
            tokens = pick_bucket(t + seqs - n, runner.token_buckets)
            if tokens is not None:
                met.add((tokens, seqs))
    assert set(runner.mixed_buckets()) == met and len(met) == len(runner.mixed_buckets())


def test_padded_mixed_buckets_match_unpadded(paged):
    """Batches with prefill chunks, padded to a (T tokens, N sequences) bucket as CUDA graph
    replay runs them (scratch sequences, tokens owned by no sequence), give the unpadded
    logits and write no engine block beyond the batch's own slots."""
    model, compiled = paged
    vocab = model.config.vocab_size
    plain = runner_for(model, compiled, num_blocks=24)
    padded = runner_for(model, compiled, num_blocks=24, pad_batches=True,
                        seq_buckets=(1, 2, 4, 8), max_num_batched_tokens=24)
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (6, 3, 9, 7, 5)]
    tables = [[0, 1, 6], [2, 7], [3, 4, 5], [8, 9], [10, 11]]
    done = [0] * len(prompts)
    # (sequence, new tokens) per step: whole prefills, then chunks beside decodes.
    steps = [[(0, 6), (1, 3), (2, 9)], [(0, 1), (3, 4), (1, 1)], [(2, 1), (3, 3), (4, 5)]]
    for step in steps:
        for i, new in step:
            if done[i] == len(prompts[i]):
                prompts[i].append(random.randrange(vocab))
        batch = build_batch([(prompts[i], done[i], new, tables[i]) for i, new in step], BLOCK)
        assert not batch.is_decode
        a, b = plain.execute(batch), padded.execute(batch)
        assert b.shape == a.shape and rel_err(b, a) < 1e-6
        for i, new in step:
            done[i] += new
    assert sorted(padded._buffers) == [(16, 4), (32, 4)]
    for name, cache in plain.caches.items():
        torch.testing.assert_close(padded.caches[name][:24], cache[:24], rtol=1e-5, atol=1e-5)
        assert padded.caches[name][12:24].abs().sum() == 0, "padding wrote an engine block"


def _ctx():
    return PassContext({"block_size": 16})


def test_refuses_graphs_it_cannot_serve():
    not_flat = parse("""func @forward(%x: f32[s0, 8]) -> f32[s0, 8]
    where s0 in [2, 100] {
  %0 = aten.relu(%x) : f32[s0, 8]
  return %0
}
""")
    with pytest.raises(NotAServingCapture, match="input_ids"):
        serve_kv_cache(not_flat, _ctx())
    padding_mask = parse("""func @forward(%input_ids: i64[1, s0], %position_ids: i64[1, s0], %attention_mask: bool[1, 1, s0, s0], %w: f32[10, 16]) -> f32[1, s0, 10]
    where s0 in [2, 100] {
  %0 = aten.embedding(%w, %input_ids) : f32[1, s0, 16]
  %1 = aten.reshape(%0, shape=[1, -1, 1, 16]) : f32[1, s0, 1, 16]
  %2 = aten.permute(%1, dims=[0, 2, 1, 3]) : f32[1, 1, s0, 16]
  %3 = kiln.attention(%2, %2, %2, %attention_mask, scale=0.25, causal=false) : f32[1, 1, s0, 16]
  %4 = aten.reshape(%3, shape=[1, -1, 16]) : f32[1, s0, 16]
  %5 = aten.permute(%w, dims=[1, 0]) : f32[16, 10]
  %6 = aten.matmul(%4, %5) : f32[1, s0, 10]
  return %6
}
""")
    with pytest.raises(NotAServingCapture, match="mask depends on more than the positions"):
        serve_kv_cache(padding_mask, _ctx())


def _positions_mask_graph(mask_body: str) -> str:
    """A flat-batch capture whose one attention's mask is built from position_ids by
    `mask_body` (which defines %m: bool[1, 1, s0, s0] from %position_ids)."""
    return f"""func @forward(%s9: sym(s0), %input_ids: i64[1, s0], %position_ids: i64[1, s0], %w: f32[10, 16]) -> f32[1, s0, 10]
    where s0 in [2, 100] {{
{mask_body}
  %0 = aten.embedding(%w, %input_ids) : f32[1, s0, 16]
  %1 = aten.reshape(%0, shape=[1, %s9, 1, 16]) : f32[1, s0, 1, 16]
  %2 = aten.permute(%1, dims=[0, 2, 1, 3]) : f32[1, 1, s0, 16]
  %3 = kiln.attention(%2, %2, %2, %m, scale=0.25, causal=false) : f32[1, 1, s0, 16]
  %4 = aten.permute(%3, dims=[0, 2, 1, 3]) : f32[1, s0, 1, 16]
  %5 = aten.reshape(%4, shape=[%s9, 16]) : f32[s0, 16]
  %6 = aten.permute(%w, dims=[1, 0]) : f32[16, 10]
  %7 = aten.mm(%5, %6) : f32[s0, 10]
  %8 = aten.reshape(%7, shape=[1, %s9, 10]) : f32[1, s0, 10]
  return %8
}}
"""


_QK_POSITIONS = """  %q = aten.unsqueeze(%position_ids, dim=2) : i64[1, s0, 1]
  %qp = aten.unsqueeze(%q, dim=1) : i64[1, 1, s0, 1]
  %k = aten.unsqueeze(%position_ids, dim=1) : i64[1, 1, s0]
  %kp = aten.unsqueeze(%k, dim=1) : i64[1, 1, 1, s0]
  %causal = aten.le(%kp, %qp) : bool[1, 1, s0, s0]"""


def test_sliding_window_read_from_the_mask():
    """A window written over positions (kv > q - W) becomes paged attention's window."""
    g = parse(_positions_mask_graph(_QK_POSITIONS + """
  %lo = aten.sub(%qp, 6) : i64[1, 1, s0, 1]
  %win = aten.gt(%kp, %lo) : bool[1, 1, s0, s0]
  %m = aten.bitwise_and(%win, %causal) : bool[1, 1, s0, s0]"""))
    serve_kv_cache(g, _ctx())
    (paged,) = [n for n in g.nodes if n.op == "kiln.paged_attention"]
    assert paged.attrs.get("window") == 6


def test_probes_a_mask_captured_for_another_device():
    """The probe runs the mask's producers on the host, even when the capture put its
    aranges on a GPU (serving on CUDA captures there)."""
    g = parse(_positions_mask_graph(_QK_POSITIONS + """
  %n = sym.size(%position_ids, dim=1) : sym(s0)
  %r = aten.arange(0, %n, device=device("cuda")) : i64[s0]
  %z = aten.mul(%r, 0) : i64[s0]
  %kz = aten.add(%kp, %z) : i64[1, 1, 1, s0]
  %m = aten.le(%kz, %qp) : bool[1, 1, s0, s0]"""))
    serve_kv_cache(g, _ctx())
    (paged,) = [n for n in g.nodes if n.op == "kiln.paged_attention"]
    assert "window" not in paged.attrs


def test_refuses_a_window_it_cannot_read():
    """A window kiln.ir.masks does not read (|q - kv| < W: abs is opaque to it) shows on the
    probe sequences and is refused, not served as plain causal attention."""
    g = parse(_positions_mask_graph(_QK_POSITIONS + """
  %d = aten.sub(%qp, %kp) : i64[1, 1, s0, s0]
  %a = aten.abs(%d) : i64[1, 1, s0, s0]
  %win = aten.lt(%a, 6) : bool[1, 1, s0, s0]
  %m = aten.bitwise_and(%causal, %win) : bool[1, 1, s0, s0]"""))
    with pytest.raises(NotAServingCapture, match="not causal"):
        serve_kv_cache(g, _ctx())


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_cpu_kernel_matches_reference(kind, window):
    """backends/paged_attention.py (the cpu/cuda kernel) against kiln_ref.paged_attention."""
    from kiln.backends.paged_attention import paged_attention
    from kiln.ir.kiln_ref import paged_attention as reference
    hq, hkv, d, bs, nb = 6, 2, 8, 4, 24
    if kind == "decode":   # (context before, new tokens) per sequence
        seqs = [(5, 1), (0, 1), (12, 1)]
    else:
        seqs = [(5, 1), (0, 7), (9, 3), (2, 1), (0, 1)]
    free = torch.randperm(nb).tolist()
    tables, slots, qstart, ctx = [], [], [0], []
    for past, new in seqs:
        n_blocks = -(-(past + new) // bs)
        table = [free.pop() for _ in range(n_blocks)]
        tables.append(table)
        slots += [table[p // bs] * bs + p % bs for p in range(past, past + new)]
        qstart.append(qstart[-1] + new)
        ctx.append(past + new)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    T = qstart[-1]
    q, k, v = torch.randn(T, hq, d), torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    kc, vc = torch.randn(nb, bs, hkv, d), torch.randn(nb, bs, hkv, d)
    meta = (torch.tensor(slots), bt, torch.tensor(ctx, dtype=torch.int32),
            torch.tensor(qstart, dtype=torch.int32))
    kc2, vc2 = kc.clone(), vc.clone()
    want = reference(q, k, v, kc, vc, *meta, scale=0.3, window=window)
    got = paged_attention(q, k, v, kc2, vc2, *meta, scale=0.3, window=window)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert rel_err(got, want) < 1e-6


def _as_cuda_capture(text: str) -> str:
    """The CPU serving capture rewritten the way capture on CUDA spells its SDPA calls (seen
    on an H100, torch 2.11): the memory-efficient kernel, its float mask padded to a multiple
    of 8 by a symbolic amount, sliced back, expanded to [B, Hq, Sq, Skv]."""
    import re
    syms = re.findall(r"(%s\d+): sym", text.splitlines()[0])
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(%\d+), (%\d+) = aten._scaled_dot_product_flash_attention_for_cpu"
                     r"\((%\d+), (%\d+), (%\d+), attn_mask=(%\d+), scale=([\d.]+)\) : "
                     r"\(f32\[(\d+), (\d+), s0, (\d+)\], .*\)", line)
        if not m:
            out.append(line)
            continue
        o, lse, q, k, v, mask, scale, b, h, d = m.groups()
        p = o + "_mask"
        out += [f"  {p}1 = sym.mod({syms[0]}, 8) : sym(mod(s0, 8))",
                f"  {p}2 = sym.sub(8, {p}1) : sym(8 - mod(s0, 8))",
                f"  {p}3 = aten.constant_pad_nd({mask}, pad=[0, {p}2], value=0.0) : "
                f"f32[1, 1, s0, s0 - mod(s0, 8) + 8]",
                f"  {p}4 = aten.slice({p}3, dim=-1, start=0, end={syms[0]}) : f32[1, 1, s0, s0]",
                f"  {p}5 = aten.expand({p}4, size=[{b}, {h}, {syms[-1]}, {syms[0]}]) : "
                f"f32[{b}, {h}, s0, s0]",
                f"  {o}, {lse}, {o}_seed, {o}_offset = aten._scaled_dot_product_efficient_attention("
                f"{q}, {k}, {v}, {p}5, compute_log_sumexp=false, scale={scale}) : "
                f"(f32[{b}, {h}, s0, {d}], f32[{b}, {h}, 0], i64[], i64[])"]
    return "\n".join(out) + "\n"


def test_cuda_efficient_attention_capture_serves():
    """On CUDA the aligned-mask chain once reached type inference, where fake tensors
    specialised the token count to its example (8) and fuse.attention failed."""
    from kiln.backends.targets import get_target
    from kiln.passes import PassManager
    from kiln.serving import capture_serving
    model = models.tiny_llama_gqa()
    g = capture_serving(model)
    PassManager(passes=["canonicalize"]).run(g)
    cuda_form = parse(_as_cuda_capture(print_graph(g)))
    assert sum(n.op == "aten._scaled_dot_product_efficient_attention" for n in cuda_form.nodes) == 2
    pm = PassManager(serving=True, verify_each=True,
                     options={"target": get_target("cuda"), "quant": None, "block_size": 16})
    pm.run(cuda_form)
    ops = [n.op for n in cuda_form.nodes]
    assert ops.count("kiln.paged_attention") == model.config.num_hidden_layers
    assert "aten.constant_pad_nd" not in ops and "aten._scaled_dot_product_efficient_attention" not in ops
    (logits,) = cuda_form.outputs
    assert logits.type.shape[1] == model.config.vocab_size and not isinstance(logits.type.shape[0], int)


def test_weight_only_int8_serves_with_its_lm_head_on_the_last_tokens():
    """quant="int8_weight_only" quantises the LM head too: serve.kv_cache finds it as a
    kiln.weight_int8_mm and runs it on each sequence's last token only; the paged graph
    then gives what the same quantised graph gives eagerly on the whole context."""
    model = models.TINY_MODELS["llama_gqa"]()
    compiled = compile_serving(model, block_size=BLOCK, verify=True, quant="int8_weight_only")
    ops = [n.op for n in compiled.graph.nodes]
    layers = model.config.num_hidden_layers
    # q/k/v and gate/up merged: fuse.parallel_linear merges on the cpu under weight-only quant
    assert ops.count("kiln.weight_int8_mm") == 4 * layers + 1 and "aten.mm" not in ops
    runner = runner_for(model, compiled)
    blocks = BlockManager(runner.num_blocks, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    seq = Sequence(list(range(3, 14)), SamplingParams(max_tokens=1))
    sched.add(seq)
    st = sched.schedule()
    logits = runner.execute(st.batch)
    want = eager_last_logits(model, seq.token_ids)
    assert logits.shape == (1, model.config.vocab_size)
    assert rel_err(logits[0], want) < 0.05   # int8 weights against the fp32 model


def test_weight_only_int4_serves_with_its_refined_lm_head_on_the_last_tokens():
    """quant="int4_weight_only": int4 GEMMs (q/k/v and gate/up merged), the LM head int8,
    its logits refined by kiln.refine_top_logits.
    serve.kv_cache cuts head and refinement to each sequence's last token; the paged graph
    gives what the same quantisation gives through torch.compile on the whole context."""
    model = models.TINY_MODELS["llama_gqa"]()
    compiled = compile_serving(model, block_size=BLOCK, verify=True, quant="int4_weight_only")
    ops = [n.op for n in compiled.graph.nodes]
    layers = model.config.num_hidden_layers
    assert ops.count("kiln.weight_int4_mm") == 4 * layers and "aten.mm" not in ops
    assert ops.count("kiln.weight_int8_mm") == 1
    (refine,) = [n for n in compiled.graph.nodes if n.op == "kiln.refine_top_logits"]
    assert refine.results[0] is compiled.graph.outputs[0]
    assert refine.args[0].producer.op == "kiln.weight_int8_mm"
    assert refine.args[1] is refine.args[0].producer.args[0]   # one gather of the last rows
    runner = runner_for(model, compiled)
    blocks = BlockManager(runner.num_blocks, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    seqs = [Sequence(list(range(3, 14)), SamplingParams(max_tokens=1)),
            Sequence(list(range(20, 27)), SamplingParams(max_tokens=1))]
    for s in seqs:
        sched.add(s)
    logits = runner.execute(sched.schedule().batch)
    assert logits.shape == (2, model.config.vocab_size)
    torch._dynamo.reset()
    quantised = torch.compile(model, backend="kiln", options={"quant": "int4_weight_only"})
    with torch.no_grad():
        for row, s in zip(logits, seqs):
            want = quantised(torch.tensor([s.token_ids])).logits[0, -1]
            assert rel_err(row, want) < 1e-2
            # int4 of random weights (~8% a weight) against the float32 model
            assert rel_err(row, eager_last_logits(model, s.token_ids)) < 0.35
    torch._dynamo.reset()
