"""The driver: kiln Graph -> passes -> wrapper codegen -> a callable. The only place
(with the rest of `compiler/`) that knows the whole pipeline."""
from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.backends import wrapper
from kiln.backends.targets import get_target
from kiln.ir import Graph, parse, print_graph, timings
from kiln.ir.roles import SCALAR
from kiln.passes import PassManager
from kiln.passes.weight_prep import split_weight_preparation

from . import compile_cache
from .config import CompileOptions, resolve_tensor_parallel

_graph_ids = itertools.count()


class CompiledGraph:
    """A compiled kiln graph: call it with the graph's inputs, in order."""

    # Callables (compiled graph, args, outputs) told of every call while present: how a loop
    # that kiln owns (kiln.generate) learns which tensors a step passes.
    watchers: list = []

    def __init__(self, graph: Graph, source: str, fn, stats: str, snapshots, seconds: float,
                 target: str, prepare: Graph | None = None, cuda_graphs=None,
                 cached: bool = False):
        self.graph = graph
        self.cuda_graphs = cuda_graphs      # the GraphCache replaying the forward, if any
        self.prepare = prepare              # the weight preparation split off `graph`, if any
        self.source = source
        self.fn = fn
        self.stats = stats
        self.snapshots = snapshots          # [(pass name, IR text)] when recorded
        self.compile_seconds = seconds
        self.target = target
        self.cached = cached                # the passes and codegen came from the compile cache
        self._first_call = True

    def __call__(self, *args):
        if self._first_call:
            # Timed on its own: it compiles the kernels it launches (Triton's JIT) and
            # prepares the weights.
            self._first_call = False
            with timings.phase(f"first call @{self.graph.name}"):
                out = self.fn(*args)
        else:
            out = self.fn(*args)
        for watch in CompiledGraph.watchers:
            watch(self, args, out)
        return out

    def bind(self, args, varying: list[int]):
        """A replay of this graph's captured CUDA graph for calls like `args` whose only new
        tensors are at `varying` (GraphCache.bind), with the weight preparation taken
        as it is now; None without a replayable graph. For a loop that owns every other
        argument and writes no weight while bound (kiln.generate's DirectDecode)."""
        if self.cuda_graphs is None or isinstance(self.fn, ScalarInputs):
            return None
        prepared = getattr(self.fn, "prepared_weights", None)
        full = list(args) + (list(prepared(args)) if prepared is not None else [])
        return self.cuda_graphs.bind(full, varying)

    @property
    def replays(self) -> int:
        """How many calls so far replayed a captured CUDA graph (0 without graph capture)."""
        return self.cuda_graphs.replays if self.cuda_graphs is not None else 0

    def __repr__(self) -> str:
        return f"CompiledGraph(@{self.graph.name}, {len(self.graph.nodes)} nodes, target={self.target})"


def mutated_inputs(graph: Graph) -> set[int]:
    """Indices of the graph inputs that some op writes in place (an op's first operand, or
    the operands its `mutated_operands` names, e.g. the caches of kiln.paged_attention)."""
    from kiln.ir.ops import written_values
    index = {v: i for i, v in enumerate(graph.inputs)}
    return {index[v] for n in graph.nodes for v in written_values(n) if v in index}


class ScalarInputs:
    """Calls `fn` with the ints at `positions` written into 0-d int64 tensors it owns, on the
    device of the call's first tensor (capture.scalar_inputs): the same buffers every call,
    so a captured CUDA graph reads each call's value from them. The int outputs the pass
    took out of the graph (`host_outputs` meta) are computed here, from the ints."""

    def __init__(self, fn, graph: Graph):
        import sympy
        self.fn = fn
        self.positions = [i for i, v in enumerate(graph.inputs) if v.role == SCALAR]
        self.buffers: dict = {}   # device -> [buffer per position]
        host = graph.meta.get("host_outputs")
        self.num_outputs = host["outputs"] if host else None
        self.host_values = []     # (output index, f, input positions of f's arguments)
        if host:
            index = {v.name: i for i, v in enumerate(graph.inputs)}
            names = sorted(host["symbols"])
            args = [index[host["symbols"][n]] for n in names]
            for out, expr in host["values"]:
                f = sympy.lambdify([sympy.Symbol(n) for n in names], sympy.sympify(expr),
                                   modules="math")
                self.host_values.append((out, f, args))

    def __call__(self, *args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        bufs = self.buffers.get(device)
        if bufs is None:
            bufs = self.buffers[device] = [torch.zeros((), dtype=torch.int64, device=device)
                                           for _ in self.positions]
        call = list(args)
        for i, buf in zip(self.positions, bufs):
            if not isinstance(call[i], torch.Tensor):
                buf.fill_(int(call[i]))
                call[i] = buf
        outputs = self.fn(*call)
        if self.num_outputs is None:
            return outputs
        device_outputs = iter(outputs)
        host = {out: int(f(*(args[a] for a in fa))) for out, f, fa in self.host_values}
        return tuple(host[i] if i in host else next(device_outputs) for i in range(self.num_outputs))


@dataclass
class CapturedText:
    """A captured graph as text (a cached capture, kiln.serving.cached_capture): parsed
    only when the compile cache lacks what the passes make of it."""
    text: str
    meta: dict = field(default_factory=dict)   # the capture's graph.meta (constants, source)

    @property
    def name(self) -> str:
        return self.text.split("(", 1)[0].removeprefix("func @")

    def parse(self) -> Graph:
        graph = parse(self.text)
        graph.meta.update(self.meta)
        return graph


def compile_graph(graph: Graph | CapturedText, options: CompileOptions | None = None) -> CompiledGraph:
    """Runs the passes on `graph` (in place) and generates its wrapper, or takes both from
    the compile cache (compiler/compile_cache.py) when this captured graph was compiled
    with these options before; then loads the wrapper. `graph` may be a CapturedText (a
    cached capture), parsed only when the compile cache misses."""
    opts = resolve_tensor_parallel(options or CompileOptions())
    t0 = time.perf_counter()
    target = get_target(opts.target)
    dump = None
    if opts.dump_dir:
        dump = Path(opts.dump_dir) / f"{graph.name}_{next(_graph_ids)}"
    if opts.timings or opts.dump_dir:
        report_timings_at_exit(opts.timings, opts.dump_dir)
    with timings.phase(f"compile @{graph.name}"):
        key = cached = None
        if opts.cache:
            if target.triton_backend is not None:
                compile_cache.point_triton_here()
            with timings.phase("cache lookup"):
                text = graph.text if isinstance(graph, CapturedText) else print_graph(graph)
                key = compile_cache.key_of("compile", {"graph": text, "target": target.name,
                                                       "options": cache_options(opts)})
                # A dump shows every pass run, so it never comes from the cache.
                files = compile_cache.load(key) if dump is None else None
                cached = compile_cache.Compiled.from_files(files) if files else None
        if cached is not None:
            with timings.phase("parse cached IR"):
                graph = _take_cached(graph, cached)
            source, stats, snapshots = cached.wrapper, cached.stats, cached.snapshots
            split = split_weight_preparation(graph) if opts.prepare_weights else None
        else:
            if isinstance(graph, CapturedText):
                with timings.phase("parse captured IR"):
                    graph = graph.parse()
            source, stats, snapshots, split = _run_pipeline(graph, opts, target, dump)
            if key is not None:
                with timings.phase("cache store"):
                    _store(key, compile_cache.Compiled(print_graph(graph), source,
                                                       _graph_meta(graph), stats, snapshots),
                           _describe(graph, target.name, opts))
        with timings.phase("load wrapper"):
            module = wrapper.load_module(source, f"kiln_{graph.name}")
        cuda_graphs = None
        if target.graph_capture and opts.cudagraphs:
            from kiln.backends.cudagraphs import GraphAPI, GraphCache
            api = GraphAPI.of(target)
            if api.available():
                # Graphs capture the forward only (the wrapper's `forward` looks
                # `forward_prepared` up at call time): prepared weights are inputs of the
                # replay, so a weight written in place is prepared again, not baked in.
                core = "forward" if split is None else "forward_prepared"
                cuda_graphs = module[core] = GraphCache(module[core], mutated_inputs(graph),
                                                        fallback=opts.fallback, api=api)
        fn = module["forward"]
        if any(v.role == SCALAR for v in graph.inputs):
            fn = ScalarInputs(fn, graph)
    compiled = CompiledGraph(graph, source, fn, stats, snapshots,
                             time.perf_counter() - t0, target.name,
                             split.prepare if split is not None else None, cuda_graphs,
                             cached=cached is not None)
    if opts.observer is not None:
        opts.observer(compiled)
    return compiled


def _run_pipeline(graph: Graph, opts: CompileOptions, target, dump: Path | None):
    """The passes, the weight-preparation split and codegen: (wrapper source, pass
    statistics, IR snapshots when recorded, the split or None)."""
    pm = PassManager(passes=opts.passes, disabled=opts.disable_passes, verify_each=opts.verify,
                     dump_dir=dump, rewrite_limit=opts.pass_limit, serving=opts.serving,
                     options={"target": target, "quant": opts.quant, "block_size": opts.block_size,
                              "can_generate": wrapper.code_generator(target),
                              "cudagraphs": opts.cudagraphs and not opts.serving,
                              "tensor_parallel_size": opts.tensor_parallel_size,
                              "tensor_parallel_rank": opts.tensor_parallel_rank})
    with timings.phase("passes"):
        pm.run(graph, record=opts.record)
        for s in pm.stats:   # the pass manager times each pass itself
            timings.record(s.name, s.seconds)
    with timings.phase("codegen"):
        split = split_weight_preparation(graph) if opts.prepare_weights else None
        if split is None:
            source = wrapper.generate(graph, target)
        else:
            source = wrapper.generate(split.forward, target, split.prepare, tuple(split.positions),
                                      tuple(split.copied))
    if dump is not None:
        (dump / "wrapper.py").write_text(source)
        (dump / "passes.txt").write_text(pm.summary() + "\n")
        if split is not None:
            (dump / "prepare_weights.kir").write_text(print_graph(split.prepare))
    return source, pm.summary(), pm.snapshots, split


# Options that do not change what is compiled (where dumps go, who is told, what happens
# on a fallback at run time, the cache and timings themselves): left out of the cache key.
_NOT_IN_KEY = {"dump_dir", "observer", "fallback", "cache", "timings"}


def cache_options(opts: CompileOptions) -> dict:
    """The options in the compile cache's key, as JSON."""
    out = {}
    for name, value in opts.as_dict().items():
        if name not in _NOT_IN_KEY:
            out[name] = sorted(value) if isinstance(value, set) else value
    return out


def _graph_meta(graph: Graph) -> dict:
    """What the compiled graph carries beside its text, for the cache: not the lifted
    constants (tensors the capture holds and passes in as inputs at every call)."""
    return {k: v for k, v in graph.meta.items() if k != "constants" and not k.startswith("_")}


def _store(key: str, compiled: "compile_cache.Compiled", about: dict) -> None:
    try:
        files = compiled.files()
    except TypeError as e:   # graph.meta holds what JSON cannot: compiled anew each process
        warnings.warn(f"kiln: this graph carries {e}, which the compile cache cannot store; "
                      f"it is compiled again in each process", compile_cache.CompileCacheWarning)
        return
    compile_cache.store(key, files, about)


def _take_cached(graph: Graph | CapturedText, cached) -> Graph:
    """The cached result of the passes, with the capture's lifted constants. A captured
    Graph becomes it in place, as if the passes had rewritten it (callers hold on to it)."""
    done = parse(cached.graph)
    done.meta = {**cached.meta, "constants": graph.meta.get("constants", {})}
    if isinstance(graph, CapturedText):
        return done
    graph.name, graph.inputs, graph.nodes, graph.outputs = done.name, done.inputs, done.nodes, done.outputs
    graph.sym_ranges, graph.sym_hints, graph.meta = done.sym_ranges, done.sym_hints, done.meta
    graph.functions = done.functions
    return graph


def _describe(graph: Graph, target: str, opts: CompileOptions) -> dict:
    """What `kiln cache ls` shows of an entry: the model (graph.meta["source"], from the
    capture) and its size, the target and how it was compiled."""
    from kiln.ir.roles import is_weight
    params = sum(math.prod(v.type.shape) for v in graph.inputs
                 if is_weight(v) and all(isinstance(d, int) for d in getattr(v.type, "shape", (None,))))
    return {"model": graph.meta.get("source"), "graph": graph.name, "nodes": len(graph.nodes),
            "weights": params, "target": target, "serving": opts.serving, "quant": opts.quant}


_timings_reported: set = set()


def report_timings_at_exit(show: bool, dump_dir: str | None = None) -> None:
    """Where compile time went, when the process exits: on stderr (`show`: --timings,
    KILN_TIMINGS=1, the `timings` option) and in DUMP_DIR/timings.txt (KILN_DUMP_DIR);
    with Triton's JIT timed per kernel from now on (its compiles happen at first launch)."""
    import atexit
    import sys

    if show and "show" not in _timings_reported:
        _timings_reported.add("show")
        os.environ[timings.ENV] = "1"   # worker processes (kiln serve's engine) report too
        try:
            from kiln.backends.triton.jit_times import time_jit
            time_jit()
        except ImportError:   # no Triton: nothing is JIT-compiled
            pass
        atexit.register(lambda: sys.stderr.write(kiln_timings()))
    if dump_dir and dump_dir not in _timings_reported:
        _timings_reported.add(dump_dir)

        def write():
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(dump_dir) / "timings.txt").write_text(kiln_timings())
        atexit.register(write)


def kiln_timings() -> str:
    """The phase tree (kiln.ir.timings) and the compile cache's counts."""
    c = compile_cache.counts()
    lines = [f"compile cache ({compile_cache.directory()}): {c['hit']} hit(s), {c['miss']} "
             f"miss(es), {c['rebuilt']} rebuilt, {c['stored']} stored"]
    capture = c["capture"]
    if any(capture.values()):
        lines.append(f"serving capture cache: {capture['hit']} hit(s), {capture['miss']} "
                     f"miss(es), {capture['rebuilt']} rebuilt, {capture['stored']} stored")
    return timings.report() + "".join(line + "\n" for line in lines)
