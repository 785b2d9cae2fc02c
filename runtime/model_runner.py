"""The model runner: a compiled serving graph (serve.kv_cache) behind the ModelRunner protocol.

It owns the KV cache (one K and one V tensor per layer, [num_blocks + 1, block_size, Hkv, D];
the extra last block is scratch that padded batch rows write to), binds every graph input
by name (batch fields, caches, weights), and returns the [N, vocab] logits of each
sequence's last new token.

On a device with graph capture (cudagraphs=True) every step replays a graph over static
input buffers, one per bucket (T tokens, N sequences), through the target's capture API
(`graph_api`, kiln.backends.cudagraphs.GraphAPI: CUDA graphs, HIP graphs through the same
torch.cuda calls, XPU graphs, ACL graphs): `kiln serve` captures the decode buckets and the
mixed ones at start-up (`capture_decode_buckets`, `capture_mixed_buckets`), or leaves them
to the engine's idle time (`capture_later`, `capture_in_background`); a bucket not
captured yet is captured on first use. A batch of t
tokens in n sequences runs in a bucket of N >= n sequences; its sequences past n are
scratch sequences (one token each, context 1, reading and writing only the scratch block).
A decode batch (one token a sequence) runs in (N, N), N from `decode_buckets(max_num_seqs)`
(with speculative decoding on a target with `verify_group_buckets`, each rounded up to a
multiple of 1 + k: a sequence's verify step is 1 + k decode rows);
a batch with prefill chunks in the smallest N of `mixed_seq_buckets` and T of
`token_buckets()` that hold its sequences and its tokens with the scratch ones, the tokens
past those belonging to no sequence (attention leaves them zero; they write the scratch
block).
Block tables are padded to the width that max_model_len needs. Batches past the largest
buckets run eagerly. Every kernel of a serving graph on cuda/hip is launched from shapes
alone (the Triton paged attention finds each tile's sequence on the device), so one
captured graph serves any batch of its bucket. On xpu and npu only decode batches are
captured (`capture_prefill=False`: their attention reads a prefill batch's layout on the
host), and npu's fused attention takes even a decode step's lengths on the host, so its
graphs are given them before every replay (`GraphAPI.update_host_arguments`).
"""
from __future__ import annotations

import contextlib
import math
import operator

import numpy as np
import torch

from kiln.backends.batch_invariance import batch_invariant, invariant_calls
from kiln.backends.cudagraphs import CUDA_GRAPHS, GraphAPI, capture_parts
from kiln.ir import Graph, TensorType, timings
from kiln.ir.fallback import report
from kiln.ir.roles import BATCH_INPUTS, is_cache_input

from .batch import FlatBatch


def decode_buckets(max_num_seqs: int) -> tuple:
    """Batch sizes of the decode buckets: powers of two up to 32, then every 32 up to
    `max_num_seqs`, which is one itself (1, 2, ..., 32, 64, 96, ..., 256 for 256): padding
    a large decode batch costs at most 31 scratch sequences, and 256 takes 13 graphs."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_num_seqs]
    sizes += range(64, max_num_seqs, 32)
    return tuple(sizes) + (max_num_seqs,)


def mixed_seq_buckets(seq_buckets: tuple) -> tuple:
    """Sequence counts of the buckets with prefill chunks: the powers of four among the
    decode buckets up to 64, every multiple of 64 past it, and the largest. Each comes with
    every token bucket, so fewer of them keeps the graphs few; but a scratch sequence costs
    a token of every GEMM, and a 150-sequence step padded to 256 ran 106 of them (28% of
    its ~380 tokens): past 64, steps of 64 keep the padding under 64 rows."""
    return tuple(b for b in seq_buckets[:-1]
                 if (b & (b - 1) == 0 and b.bit_length() % 2 and b <= 64) or (b > 64 and b % 64 == 0)
                 ) + seq_buckets[-1:]


def in_multiples(buckets, multiple: int) -> tuple:
    """Each bucket rounded up to a multiple of `multiple`, duplicates dropped (vLLM rounds
    its graph sizes for speculative decoding the same way): with k = 3 drafts, 1, 2, 4, 8,
    ..., 256 become 4, 8, ..., 256, and three sequences verifying 4 rows each fill 12."""
    return tuple(sorted({-(-b // multiple) * multiple for b in buckets}))


def graph_settings(target, speculative=None) -> dict:
    """PagedModelRunner's graph arguments for `target` (a kiln Target) serving with
    `speculative` (a SpeculativeConfig or None): its capture API, whether batches with
    prefill chunks are captured, and the rows decode buckets come in multiples of."""
    verify_rows = 1 + speculative.k if speculative is not None and target.verify_group_buckets else 1
    return {"graph_api": GraphAPI.of(target), "capture_prefill": target.graph_captures_prefill,
            "decode_rows_multiple": verify_rows}


SEQ_BUCKETS = decode_buckets(64)

def cache_inputs(graph: Graph) -> list:
    return [v for v in graph.inputs if is_cache_input(v.name)]


def cache_bytes_per_block(graph: Graph) -> int:
    total = 0
    for v in cache_inputs(graph):
        _, bs, hkv, d = v.type.shape
        total += bs * hkv * d * v.type.dtype.itemsize
    return total


def token_buckets(max_num_batched_tokens: int, max_seqs: int = SEQ_BUCKETS[-1]) -> tuple:
    """Token counts of the mixed-batch buckets: powers of two up to 128, then steps of 128,
    up to the largest step (its tokens plus the scratch sequences of its bucket). Coarser
    buckets mean fewer captures; finer ones less padding on compute-bound prefill steps."""
    top = max_num_batched_tokens + max_seqs
    sizes = [16, 32, 64, 128]
    while sizes[-1] < top:
        sizes.append(sizes[-1] + 128)
    return tuple(sizes)


def pick_bucket(n: int, buckets=SEQ_BUCKETS) -> int | None:
    """The smallest bucket that holds n, or None (run eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return None


class StepBuffers:
    """Static inputs of one (T tokens, N sequences) bucket. A batch of t <= T tokens in
    n <= N sequences is copied in; sequences n..N-1 become scratch sequences that own one
    token each (token 0 at position 0, context 1, reading and writing only
    `scratch_block`), and tokens past t + N - n belong to no sequence. A decode bucket
    (T == N) only ever holds decode batches, so its query_start stays 0, 1, ..., N.

    The inputs, and the rows and picks of the batch's pending inputs (batch.PendingInputs),
    are views of one device buffer: a step assembles them, scratch entries included, in
    pinned host memory and sends them in one asynchronous copy. Before the host side is
    rewritten, `fill` waits for the previous copy (an event; the engine already waited for
    the step's tokens, so it is done). The host side is written through numpy views: a
    slice assignment costs under 1 us there, 3-5 us as a torch op, and a step makes a
    dozen."""

    FIELDS = (("input_ids", torch.int64), ("positions", torch.int64), ("slot_mapping", torch.int64),
              ("pending_rows", torch.int64), ("pending_picks", torch.int64), ("context_lens", torch.int32),
              ("query_start", torch.int32), ("block_tables", torch.int32))
    ALIGN = 64   # bytes between field starts (Triton specializes on 16-byte-aligned pointers)

    def __init__(self, num_tokens: int, num_seqs: int, width: int, scratch_block: int,
                 block_size: int, device: torch.device):
        self.num_tokens, self.num_seqs, self.width = num_tokens, num_seqs, width
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        device = torch.device(device)
        shapes = {"input_ids": (num_tokens,), "positions": (num_tokens,), "slot_mapping": (num_tokens,),
                  "pending_rows": (num_seqs,), "pending_picks": (num_seqs,), "context_lens": (num_seqs,),
                  "query_start": (num_seqs + 1,),
                  "block_tables": (num_seqs, width)}
        nbytes = [math.prod(shapes[k]) * dtype.itemsize for k, dtype in self.FIELDS]
        sizes = [-(-n // self.ALIGN) * self.ALIGN for n in nbytes]
        pinned = device.type != "cpu"
        # the last copy to the device (an Event of torch.cuda, torch.xpu or torch.npu)
        self._sent = getattr(torch, device.type).Event() if pinned else None
        self._host_pack = torch.zeros(sum(sizes), dtype=torch.uint8, pin_memory=pinned)
        self._device_pack = (self._host_pack if device.type == "cpu" else
                             torch.zeros(sum(sizes), dtype=torch.uint8, device=device))
        self._host, self._device = {}, {}   # numpy views of the host side, device tensors
        at = 0
        for (k, dtype), n, size in zip(self.FIELDS, nbytes, sizes):
            self._host[k] = self._host_pack[at:at + n].view(dtype).view(shapes[k]).numpy()
            self._device[k] = self._device_pack[at:at + n].view(dtype).view(shapes[k])
            at += size
        h = self._host   # the contents of an all-scratch batch
        h["slot_mapping"][:] = self.scratch_slot
        h["block_tables"][:] = scratch_block
        h["context_lens"][:] = 1
        h["query_start"][:] = np.arange(num_seqs + 1)
        self._send()

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs

    def fill(self, batch: FlatBatch) -> None:
        t, n, w = batch.num_tokens, batch.num_seqs, batch.block_tables.shape[1]
        assert batch.is_decode == self.is_decode and w <= self.width
        assert n <= self.num_seqs and t + self.num_seqs - n <= self.num_tokens
        if self._sent is not None:
            self._sent.synchronize()
        h = self._host
        h["input_ids"][:t] = batch.input_ids.numpy()
        h["positions"][:t] = batch.positions.numpy()
        h["slot_mapping"][:t] = batch.slot_mapping.numpy()
        h["context_lens"][:n] = batch.context_lens.numpy()
        h["block_tables"][:n, :w] = batch.block_tables.numpy()
        # Entries past the batch may hold an earlier batch's values: reset them.
        h["input_ids"][t:] = 0
        h["positions"][t:] = 0
        h["slot_mapping"][t:] = self.scratch_slot
        h["context_lens"][n:] = 1
        h["block_tables"][:n, w:] = self.scratch_block
        h["block_tables"][n:] = self.scratch_block
        if not self.is_decode:
            h["query_start"][:n + 1] = batch.query_start.numpy()
            h["query_start"][n + 1:] = np.arange(t + 1, t + 1 + self.num_seqs - n)
        if batch.pending is not None:
            k = len(batch.pending.rows)
            h["pending_rows"][:k] = batch.pending.rows
            h["pending_picks"][:k] = batch.pending.picks
        self._send()

    def _send(self) -> None:
        if self._device_pack is not self._host_pack:
            self._device_pack.copy_(self._host_pack, non_blocking=True)
        if self._sent is not None:
            self._sent.record()

    def field(self, name: str) -> torch.Tensor:
        return self._device[name]

    def host_context_lens(self) -> list[int]:
        """The context length of every sequence of the bucket, scratch ones included, as
        `fill` wrote them on the host."""
        return self._host["context_lens"].tolist()

    def pending_index(self, batch: FlatBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows and picks of the batch's pending inputs, as `fill` sent them."""
        k = len(batch.pending.rows)
        return self._device["pending_rows"][:k], self._device["pending_picks"][:k]


class PagedModelRunner:
    """ModelRunner over a compiled serving graph. `fn(*inputs)` returns (logits,)."""
    accepts_pending_inputs = True

    def __init__(self, fn, graph: Graph, weights: dict[str, torch.Tensor], num_blocks: int,
                 max_model_len: int, vocab_size: int, device: str | torch.device = "cpu",
                 cudagraphs: bool = False, seq_buckets=SEQ_BUCKETS,
                 max_num_batched_tokens: int = 512, pad_batches: bool | None = None,
                 caches: dict[str, torch.Tensor] | None = None, batch_invariant: bool = False,
                 graph_api: GraphAPI | None = CUDA_GRAPHS, capture_prefill: bool = True,
                 decode_rows_multiple: int = 1):
        self._core, self._prepare = capture_parts(fn)
        # batch_invariant: each row computed as in a one-row batch (backends/batch_invariance.py),
        # in eager calls and in what the graphs capture.
        self.batch_invariant = batch_invariant
        if batch_invariant:
            fn, self._core = invariant_calls(fn), invariant_calls(self._core)
        self.fn = fn
        self.device = torch.device(device)
        self.block_size = self.block_size_of(graph)
        self.num_blocks = num_blocks
        # `caches`: the K/V tensors by graph input name, shared with another runner (a
        # layer-skip draft graph reads and writes its model's kept layers); else allocated.
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        # Batches with prefill chunks take the sequence counts as given; decode buckets are
        # rounded to whole verify groups (graph_settings).
        self.mixed_seq_buckets = mixed_seq_buckets(tuple(sorted(seq_buckets)))
        self.seq_buckets = in_multiples(seq_buckets, decode_rows_multiple)
        self.decode_rows_multiple = decode_rows_multiple
        self.max_num_batched_tokens = max_num_batched_tokens
        self.token_buckets = token_buckets(max_num_batched_tokens, self.mixed_seq_buckets[-1])
        if cudagraphs and graph_api is None:
            raise ValueError("cudagraphs=True needs the target's graph API: pass "
                             "graph_settings(target) (its graph_api), or cudagraphs=False")
        self.cudagraphs = cudagraphs
        self.graph_api = graph_api
        self.capture_prefill = capture_prefill
        # Padding to buckets is what graph replay needs; tests switch it on alone on the CPU.
        self.pad_batches = cudagraphs if pad_batches is None else pad_batches
        self.max_blocks_per_seq = math.ceil(max_model_len / self.block_size)
        self.scratch_block = num_blocks   # allocated past what the engine hands out
        self.caches: dict[str, torch.Tensor] = {}
        self._binding: list = []          # per graph input: a tensor, or a batch field name
        missing = []
        for v in graph.inputs:
            if v.name in BATCH_INPUTS:
                self._binding.append(v.name)
            elif is_cache_input(v.name):
                _, bs, hkv, d = v.type.shape
                cache = caches[v.name] if caches is not None else torch.zeros(
                    num_blocks + 1, bs, hkv, d, dtype=v.type.dtype, device=self.device)
                self.caches[v.name] = cache
                self._binding.append(cache)
            elif v.name in weights:
                self._binding.append(self._weight(v, weights[v.name]))
            else:
                missing.append(v.name)
        if missing:
            raise ValueError(f"no weight for graph input(s) {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''}: the weights do not match "
                             f"the compiled graph (recompile for this model)")
        absent = [f for f in BATCH_INPUTS if f not in self._binding]
        if absent:
            raise ValueError(f"the graph is not a serving graph: no input(s) {', '.join(absent)} "
                             f"(compile with serve.kv_cache)")
        self._buffers: dict[tuple[int, int], StepBuffers] = {}
        # (T, N) -> (the API's graph, static output, the prepared weights the graph reads)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._uncapturable: set[tuple[int, int]] = set()
        self._background: list[tuple[int, int]] = []   # buckets left for idle time, in order
        self._pool = None
        self.steps = 0
        self.replays = 0

    @property
    def graph_options(self) -> dict:
        """This runner's graph arguments, for a runner that runs beside it (a draft graph's)."""
        return {"cudagraphs": self.cudagraphs, "graph_api": self.graph_api,
                "capture_prefill": self.capture_prefill,
                "decode_rows_multiple": self.decode_rows_multiple}

    @staticmethod
    def block_size_of(graph: Graph) -> int:
        caches = cache_inputs(graph)
        if not caches:
            raise ValueError("the graph has no kv_cache.* inputs: not a serving graph")
        bs = caches[0].type.shape[1]
        if not isinstance(bs, int):
            raise ValueError(f"the cache block size must be a constant, got {bs}")
        return bs

    def _weight(self, v, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(v.type, TensorType):
            raise ValueError(f"graph input %{v.name} is {v.type}, not a tensor")
        want = tuple(v.type.shape)
        if tuple(t.shape) != want:
            raise ValueError(f"weight {v.name} has shape {tuple(t.shape)}, the graph expects "
                             f"{want} (recompile for this model)")
        return t.detach().to(device=self.device, dtype=v.type.dtype)

    # -- the ModelRunner protocol ----------------------------------------------------------------
    def execute(self, batch: FlatBatch) -> torch.Tensor:
        self.steps += 1
        bucket = self.bucket_of(batch) if self.pad_batches else None
        # A batch marked invariant (speculation's verify rows) runs its kernels batch-
        # invariantly, in graphs of its own, when the runner is not invariant throughout.
        invariant = batch.invariant and not self.batch_invariant
        with batch_invariant() if invariant else contextlib.nullcontext():
            if bucket is not None:
                return self._run_bucket(batch, bucket, (*bucket, "invariant") if invariant
                                        else bucket)[:batch.num_seqs]
            b = batch.to(self.device, non_blocking=True)
            if b.pending is not None:
                b.pending.apply(b.input_ids)
            (logits,) = self.fn(*self._args(lambda name: getattr(b, name)))
            return logits

    def _args(self, field) -> list:
        return [field(x) if isinstance(x, str) else x for x in self._binding]

    # -- buckets -------------------------------------------------------------------------------
    def bucket_of(self, batch: FlatBatch) -> tuple[int, int] | None:
        """(T, N) of the bucket the batch runs in, or None (eagerly)."""
        if batch.block_tables.shape[1] > self.max_blocks_per_seq:
            return None
        if not batch.is_decode and self.cudagraphs and not self.capture_prefill:
            return None   # no graph will run it: padding would only add work
        n = batch.num_seqs
        seqs = pick_bucket(n, self.seq_buckets if batch.is_decode else self.mixed_seq_buckets)
        if seqs is None:
            return None
        if batch.is_decode:
            return seqs, seqs
        tokens = pick_bucket(batch.num_tokens + seqs - n, self.token_buckets)
        return None if tokens is None else (tokens, seqs)

    def buffers(self, bucket: tuple[int, int]) -> StepBuffers:
        buf = self._buffers.get(bucket)
        if buf is None:
            buf = StepBuffers(*bucket, self.max_blocks_per_seq, self.scratch_block,
                              self.block_size, self.device)
            self._buffers[bucket] = buf
        return buf

    def _run_bucket(self, batch: FlatBatch, bucket: tuple[int, int], key: tuple) -> torch.Tensor:
        """Run the batch in `bucket`'s buffers, replaying (or capturing) the graph `key`."""
        buf = self.buffers(bucket)
        buf.fill(batch)
        if batch.pending is not None:
            batch.pending.apply(buf.field("input_ids"), buf.pending_index(batch))
        if not self.cudagraphs:
            (logits,) = self.fn(*self._args(buf.field))
            return logits
        entry = self._graphs.get(key)
        if entry is not None and self._prepare is not None and not all(
                map(operator.is_, self._prepare(self._binding), entry[2])):
            entry = None   # the weights were prepared anew: the graph reads the old tensors
        if entry is None and key not in self._uncapturable:
            entry = self._capture(bucket, buf, key)
        if entry is None:   # (this bucket failed to capture, now or before: eager)
            (logits,) = self.fn(*self._args(buf.field))
            return logits
        graph, out, _ = entry
        if self.graph_api.host_arguments:
            self.graph_api.update_host_arguments(graph, buf.host_context_lens())
        graph.replay()
        self.replays += 1
        return out.clone()

    def mixed_buckets(self) -> list[tuple[int, int]]:
        """Every (T, N) bucket a batch with prefill chunks can run in: n sequences in the
        smallest N that holds them, t > n tokens (at most max_num_batched_tokens) plus the
        N - n scratch ones."""
        out, lower = [], 0
        for seqs in self.mixed_seq_buckets:   # n in (lower, seqs]
            least = pick_bucket(seqs + 1, self.token_buckets)
            most = pick_bucket(self.max_num_batched_tokens + seqs - lower - 1, self.token_buckets)
            if least is not None:
                out += [(t, seqs) for t in self.token_buckets if least <= t <= (most or t)]
            lower = seqs
        return out

    def capture_mixed_buckets(self) -> int:
        """Capture every mixed bucket now (start-up), as `capture_decode_buckets` does the
        decode ones: a bucket first met while serving would stall that step for its capture.
        Returns how many were captured (none where the target captures decode batches only)."""
        if not self.cudagraphs or not self.capture_prefill:
            return 0
        done = 0
        for key in self.mixed_buckets():
            if key not in self._graphs and key not in self._uncapturable:
                done += self._capture(key, self.buffers(key)) is not None
        return done

    def capture_decode_buckets(self, invariant_up_to: int = 0) -> int:
        """Capture every decode bucket now (start-up), over buffers that hold only scratch
        sequences: they write and read only the scratch block. `invariant_up_to`: also the
        batch-invariant graphs of the decode buckets of at most that many rows (speculation's
        verify steps; unless the runner is invariant throughout). Returns how many were
        captured."""
        if not self.cudagraphs:
            return 0
        done = 0
        for n in self.seq_buckets:
            bucket = (n, n)
            if bucket not in self._graphs and bucket not in self._uncapturable:
                done += self._capture(bucket, self.buffers(bucket)) is not None
            key = (*bucket, "invariant")
            if (n <= invariant_up_to and not self.batch_invariant and key not in self._graphs
                    and key not in self._uncapturable):
                with batch_invariant():
                    done += self._capture(bucket, self.buffers(bucket), key) is not None
        return done

    def capture_later(self, buckets) -> None:
        """Leaves `buckets` to be captured while the engine is idle (`capture_in_background`),
        in this order, instead of at start-up: the server is ready sooner."""
        self._background = [b for b in buckets if b not in self._graphs and
                            (self.capture_prefill or b[0] == b[1])] if self.cudagraphs else []

    def capture_in_background(self) -> bool:
        """Captures the next bucket left for idle time (one a step met first is captured
        already); returns whether any is left. The engine calls it while no request runs: a
        request that arrives meanwhile waits for at most this one capture."""
        while self._background:
            bucket = self._background.pop(0)
            if bucket not in self._graphs and bucket not in self._uncapturable:
                self._capture(bucket, self.buffers(bucket))
                break
        return bool(self._background)

    def _capture(self, bucket: tuple[int, int], buf: StepBuffers, key: tuple | None = None):
        """Warm up on a side stream (compiles kernels), then capture one step. The warm-up
        and capture runs write K/V only for the batch in the buffers (its own slots, with
        the same values the real step writes) and the scratch block."""
        args = self._args(buf.field)
        # The prepared weights are arguments of the captured call and kept with the graph.
        prepared = tuple(self._prepare(args)) if self._prepare is not None else ()
        api = self.graph_api
        stop = timings.start(f"{api.device_type} graph capture")
        try:
            stream = api.stream()
            stream.wait_stream(api.current_stream())
            with api.on_stream(stream):
                self._core(*args, *prepared)
            api.current_stream().wait_stream(stream)
            graph = api.new_graph()
            if self._pool is None:
                self._pool = api.pool_handle()
            with api.capturing(graph, self._pool, host_arguments=True):
                (out,) = self._core(*args, *prepared)
        except Exception as e:  # noqa: BLE001 - a graph that cannot be captured runs eagerly
            self._uncapturable.add(key or bucket)
            api.synchronize()
            report("cudagraph", f"bucket {bucket}", f"kiln: {api.graph_class} capture failed for "
                   f"the bucket of {bucket[0]} tokens in {bucket[1]} sequences "
                   f"({type(e).__name__}: {e}); its batches run eagerly")
            return None
        finally:
            stop()
        self._graphs[key or bucket] = (graph, out, prepared)
        return self._graphs[key or bucket]

    def reset_cache(self) -> None:
        for c in self.caches.values():
            c.zero_()
