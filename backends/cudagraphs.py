"""Graph capture for a compiled wrapper: CUDA graphs, HIP graphs (the same torch.cuda API
on ROCm builds), XPU graphs (torch.xpu.XPUGraph) and ACL graphs (torch.npu.NPUGraph, once
torch_npu is imported). Each device module offers the same calls (a graph class, `graph`,
`graph_pool_handle`, `synchronize`, streams and events); the targets table names the class,
and `GraphAPI` finds the rest beside it. The serving runner (kiln.runtime.model_runner)
captures its bucket graphs through the same calls.

One graph per input signature (shapes, dtypes and size values). A signature runs eagerly
the first time (which also compiles every Triton kernel it launches) and is captured the
second time it is seen, then replayed. Inputs whose storage is the same on both calls
(weights, KV caches) are used in place; the others are copied into static buffers before
each replay, and copied back afterwards if the graph mutates them. Outputs are cloned out
of the graph's memory pool, so a later replay never overwrites what a caller holds
(`copy_outputs=False` opts out). Signatures past `max_graphs`, and graphs that fail to
capture, run eagerly; so do non-tensor inputs that change on every call, reported once as
a `cudagraph` fallback (kiln.ir.fallback).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir import timings
from kiln.ir.fallback import report



@dataclass(frozen=True)
class GraphAPI:
    """The capture calls of one device module, e.g. GraphAPI("torch.cuda", "CUDAGraph")."""
    module: str        # "torch.cuda", "torch.xpu", "torch.npu"
    graph_class: str   # "CUDAGraph", "XPUGraph", "NPUGraph"
    # "module:function" mapping a decode step's sequence lengths to the host arguments a
    # captured graph's operators take (the target's `graph_host_arguments`); None: its
    # kernels read everything from device memory.
    host_arguments: str | None = None

    @classmethod
    def of(cls, target) -> "GraphAPI | None":
        """The API of a target's `graph_capture` ("torch.xpu.XPUGraph"); None without one."""
        if not target.graph_capture:
            return None
        module, graph_class = target.graph_capture.rsplit(".", 1)
        return cls(module, graph_class, target.graph_host_arguments)

    @property
    def device_type(self) -> str:
        return self.module.rsplit(".", 1)[1]

    def device_module(self):
        """torch.cuda / torch.xpu / torch.npu (the last exists once torch_npu is imported)."""
        mod = getattr(torch, self.device_type, None)
        if mod is None or not hasattr(mod, self.graph_class):
            raise RuntimeError(f"{self.module}.{self.graph_class} is not in this torch "
                               f"({torch.__version__}): graph capture for {self.device_type} "
                               f"needs its plug-in (torch_npu for npu) or a torch that has it")
        return mod

    def available(self) -> bool:
        """A device to capture on is present (and the module that captures for it)."""
        mod = getattr(torch, self.device_type, None)
        return (mod is not None and hasattr(mod, self.graph_class)
                and bool(getattr(mod, "is_available", lambda: False)()))

    def new_graph(self):
        return getattr(self.device_module(), self.graph_class)()

    def capturing(self, graph, pool, host_arguments: bool = False):
        """The capture context. `host_arguments`: the caller will set the host arguments
        before every replay (`update_host_arguments`), so the graph records the operators
        that take them where the API needs telling (torch_npu: auto_dispatch_capture;
        such a graph waits for an update before each replay, so only callers that
        update ask for it)."""
        options = {"auto_dispatch_capture": True} if host_arguments and self.host_arguments else {}
        return self.device_module().graph(graph, pool=pool, **options)

    def update_host_arguments(self, graph, context_lens: list[int]) -> None:
        """Before a replay of a graph captured with `host_arguments`: its operators' host
        arguments for a step whose sequences have these lengths."""
        import importlib
        module, fn = self.host_arguments.split(":")
        graph.update(getattr(importlib.import_module(module), fn)(context_lens))

    def pool_handle(self):
        return self.device_module().graph_pool_handle()

    def synchronize(self) -> None:
        self.device_module().synchronize()

    def stream(self):
        """A new stream of the device (a side stream to warm up on before a capture)."""
        return self.device_module().Stream()

    def current_stream(self):
        return self.device_module().current_stream()

    def on_stream(self, stream):
        """Context in which work goes to `stream`."""
        return self.device_module().stream(stream)


CUDA_GRAPHS = GraphAPI("torch.cuda", "CUDAGraph")

# Different non-tensor values for the same tensor shapes before a graph stops capturing them.
SCALAR_VARIANTS = 8


def signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _ptrs(args) -> tuple:
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args)


@dataclass
class _Entry:
    graph: object            # the API's graph (torch.cuda.CUDAGraph, ...)
    static_args: list
    copied: list[int]        # inputs copied into static buffers before replay
    write_back: list[int]    # copied inputs the graph mutates
    pinned: tuple            # data_ptr of the inputs used in place
    outputs: tuple

    def __post_init__(self):
        self.pinned_index = [i for i, p in enumerate(self.pinned) if p is not None]
        self.scalar_index = [i for i, a in enumerate(self.static_args)
                             if not isinstance(a, torch.Tensor)]


class GraphCache:
    def __init__(self, fn, mutated_inputs: set[int] = frozenset(), max_graphs: int = 32,
                 copy_outputs: bool = True, fallback: str | None = None,
                 api: GraphAPI = CUDA_GRAPHS):
        self.fn = fn
        self.api = api
        self.fallback = fallback            # the policy for a failed capture (kiln.ir.fallback)
        self.mutated = set(mutated_inputs)
        self.max_graphs = max_graphs
        self.copy_outputs = copy_outputs
        self.entries: dict[tuple, _Entry] = {}
        self.first_ptrs: dict[tuple, tuple] = {}
        self.uncapturable: set[tuple] = set()
        self.pool = None
        self.replays = 0
        self._last: _Entry | None = None   # the entry the previous call replayed
        # tensor shapes -> the non-tensor values seen with them (first sightings)
        self._scalar_variants: dict[tuple, list] = {}
        self.gave_up: set[tuple] = set()    # shapes whose non-tensor inputs never repeat

    def _new_scalars_ok(self, key) -> bool:
        """False once the same tensor shapes came with more than SCALAR_VARIANTS different
        non-tensor values (a Python int that changes every call, like a sliding-window
        cache's length): each would be a graph used once. Reported once per shapes."""
        shapes = tuple(k for k in key if isinstance(k, tuple))
        if shapes in self.gave_up:
            return False
        seen = self._scalar_variants.setdefault(shapes, [])
        seen.append(key)
        if len(seen) <= SCALAR_VARIANTS:
            return True
        self.gave_up.add(shapes)
        changed = sorted({i for other in seen[:-1] for i, (a, b) in enumerate(zip(key, other))
                          if a != b and not isinstance(a, tuple)})
        for k in seen:
            self.first_ptrs.pop(k, None)
        report("cudagraph", f"changing inputs {changed}", f"kiln: the non-tensor input(s) at "
               f"{changed} of this graph change on every call ({len(seen)} values for the same "
               f"shapes) and a CUDA graph would bake them in, so these calls run without "
               f"graphs (pass them as tensors)", self.fallback)
        return False

    def __call__(self, *args):
        # Decode calls the same graph with the same weight and cache objects every step:
        # checking those by identity skips the signature of ~300 arguments (about 100 us
        # of host time per step, which small models are bound by).
        last = self._last
        if last is not None and self._same_call(last, args):
            return self._replay(last, args)
        key = signature(args)
        entry = self.entries.get(key)
        if entry is None:
            if key in self.uncapturable or len(self.entries) >= self.max_graphs:
                return self.fn(*args)
            if any(isinstance(a, torch.Tensor) and a.device.type != self.api.device_type
                   for a in args):
                # Work on host tensors would run once at capture and be baked in. (A
                # StaticCache prefill on transformers 5.17 reads its lengths on the host:
                # prefill runs without graphs by design, so this is no fallback.)
                self.uncapturable.add(key)
                return self.fn(*args)
            if key not in self.first_ptrs:
                if not self._new_scalars_ok(key):
                    return self.fn(*args)
                self.first_ptrs[key] = _ptrs(args)
                return self.fn(*args)
            entry = self._capture(key, args)
            if entry is None:
                return self.fn(*args)
        ptrs = _ptrs(args)
        if any(p is not None and p != ptrs[i] for i, p in enumerate(entry.pinned)):
            # A weight or cache moved: this graph would read stale memory.
            del self.entries[key]
            self.first_ptrs[key] = ptrs
            self._last = None
            return self.fn(*args)
        self._last = entry
        return self._replay(entry, args)

    def bind(self, args, varying: list[int]):
        """A replay for calls that pass `args` again except new tensors of the same shapes at
        `varying` (a decode step's token and position), or None when `args` is not the call
        the last replay served or a varying input is used in place. The caller vouches that
        the other arguments stay the same objects and that only the graph writes them (a
        loop that owns them: kiln.generate); each call then costs the copies of the
        varying inputs, the replay and the output clones, with no check of the ~300
        arguments a decode graph takes."""
        entry = self._last
        if entry is None or not self._same_call(entry, args) \
                or not set(varying) <= set(entry.copied):
            return None
        call = list(args)

        def replay(*tensors):
            for i, t in zip(varying, tensors):
                call[i] = t
            return self._replay(entry, call)
        return replay

    @staticmethod
    def _same_call(entry: "_Entry", args) -> bool:
        """Same pinned tensor objects (so the same memory), same shapes of the copied inputs,
        same non-tensor arguments: the call `signature` would map to this entry."""
        static = entry.static_args
        if len(args) != len(static):
            return False
        for i in entry.pinned_index:
            if args[i] is not static[i]:
                return False
        for i in entry.copied:
            a, b = args[i], static[i]
            if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype \
                    or a.device != b.device:
                return False
        return all(args[i] == static[i] for i in entry.scalar_index)

    def _replay(self, entry: "_Entry", args):
        for i in entry.copied:
            entry.static_args[i].copy_(args[i])
        entry.graph.replay()
        self.replays += 1
        for i in entry.write_back:
            args[i].copy_(entry.static_args[i])
        if not self.copy_outputs:
            return entry.outputs
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs)

    def _capture(self, key, args):
        first = self.first_ptrs[key]
        now = _ptrs(args)
        static_args, copied, pinned = [], [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and first[i] == now[i]:
                static_args.append(a)
                pinned.append(now[i])
            elif isinstance(a, torch.Tensor):
                static_args.append(a.clone())
                copied.append(i)
                pinned.append(None)
            else:
                static_args.append(a)
                pinned.append(None)
        for i in copied:
            static_args[i].copy_(args[i])
        api = self.api
        graph = api.new_graph()
        if self.pool is None:
            self.pool = api.pool_handle()
        try:
            api.synchronize()
            with timings.phase(f"{api.device_type} graph capture"), api.capturing(graph, self.pool):
                outputs = self.fn(*static_args)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            self.uncapturable.add(key)
            api.synchronize()
            report("cudagraph", str(key), f"kiln: {api.graph_class} capture failed for {key} "
                   f"({type(e).__name__}: {e}); these shapes run eagerly", self.fallback)
            return None
        entry = _Entry(graph, static_args, copied, [i for i in copied if i in self.mutated],
                       tuple(pinned), tuple(outputs))
        self.entries[key] = entry
        return entry


def capture_parts(forward):
    """(core, prepare) of a generated wrapper's `forward`: with a weight preparation,
    `core` is `forward_prepared` and `prepare(inputs)` the prepared tensors it takes after
    the inputs; without one, (forward, None). A graph captured over `core` with the prepared
    tensors as arguments holds them, so a new preparation (a weight replaced or written in
    place, another weight set) cannot free memory the graph reads; the caller compares
    `prepare(inputs)` with what it captured and captures again when they differ."""
    core = getattr(forward, "forward_prepared", None)
    if core is None:
        return forward, None
    return core, forward.prepared_weights
