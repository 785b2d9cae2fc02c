"""The driver: kiln Graph -> passes -> wrapper codegen -> a callable. The only place
(with the rest of `compiler/`) that knows the whole pipeline."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

from kiln.backends import wrapper
from kiln.backends.targets import get_target
from kiln.ir import Graph, print_graph
from kiln.passes import PassManager
from kiln.passes.weight_prep import split_weight_preparation

from .config import CompileOptions

_graph_ids = itertools.count()


class CompiledGraph:
    """A compiled kiln graph: call it with the graph's inputs, in order."""

    def __init__(self, graph: Graph, source: str, fn, stats: str, snapshots, seconds: float,
                 target: str, prepare: Graph | None = None, cuda_graphs=None):
        self.graph = graph
        self.cuda_graphs = cuda_graphs      # the CudaGraphCache replaying the forward, if any
        self.prepare = prepare              # the weight preparation split off `graph`, if any
        self.source = source
        self.fn = fn
        self.stats = stats
        self.snapshots = snapshots          # [(pass name, IR text)] when recorded
        self.compile_seconds = seconds
        self.target = target

    def __call__(self, *args):
        return self.fn(*args)

    @property
    def replays(self) -> int:
        """How many calls so far replayed a captured CUDA graph (0 without graph capture)."""
        return self.cuda_graphs.replays if self.cuda_graphs is not None else 0

    def __repr__(self) -> str:
        return f"CompiledGraph(@{self.graph.name}, {len(self.graph.nodes)} nodes, target={self.target})"


def mutated_inputs(graph: Graph) -> set[int]:
    """Indices of the graph inputs that some op writes in place (an op's first operand, or
    the operands its `mutated_operands` names, e.g. the caches of kiln.paged_attention)."""
    from kiln.ir.ops import get_op
    index = {v: i for i, v in enumerate(graph.inputs)}
    out = set()
    for n in graph.nodes:
        op = get_op(n.op)
        if op.has("mutates"):
            for k in op.extra.get("mutated_operands", (0,)):
                if k < len(n.args) and n.args[k] in index:
                    out.add(index[n.args[k]])
    return out


def compile_graph(graph: Graph, options: CompileOptions | None = None) -> CompiledGraph:
    opts = options or CompileOptions()
    t0 = time.perf_counter()
    target = get_target(opts.target)
    dump = None
    if opts.dump_dir:
        dump = Path(opts.dump_dir) / f"{graph.name}_{next(_graph_ids)}"
    pm = PassManager(passes=opts.passes, disabled=opts.disable_passes, verify_each=opts.verify,
                     dump_dir=dump, rewrite_limit=opts.pass_limit, serving=opts.serving,
                     options={"target": target, "quant": opts.quant, "block_size": opts.block_size,
                              "can_generate": wrapper.code_generator(target)})
    pm.run(graph, record=opts.record)
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
    module = wrapper.load_module(source, f"kiln_{graph.name}")
    cuda_graphs = None
    if target.graph_capture and target.device_type == "cuda" and opts.cudagraphs:
        import torch
        if torch.cuda.is_available():
            from kiln.backends.cudagraphs import CudaGraphCache
            # Graphs capture the forward only (the wrapper's `forward` looks
            # `forward_prepared` up at call time): prepared weights are inputs of the
            # replay, so a weight written in place is prepared again, not baked in.
            core = "forward" if split is None else "forward_prepared"
            cuda_graphs = module[core] = CudaGraphCache(module[core], mutated_inputs(graph),
                                                        fallback=opts.fallback)
    fn = module["forward"]
    compiled = CompiledGraph(graph, source, fn, pm.summary(), pm.snapshots,
                             time.perf_counter() - t0, target.name,
                             split.prepare if split is not None else None, cuda_graphs)
    if opts.observer is not None:
        opts.observer(compiled)
    return compiled
