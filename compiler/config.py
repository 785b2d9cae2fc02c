"""Compile options: from `torch.compile(..., options={...})`, `kiln.compile(**options)` and
the KILN_* environment variables (which win, so a user can debug without editing code)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Callable


@dataclass
class CompileOptions:
    target: str = "cpu"
    passes: list[str] | None = None            # None: the default pipeline
    disable_passes: set[str] = field(default_factory=set)
    dump_dir: str | None = None
    pass_limit: int | None = None
    verify: bool = False                       # verify after every pass
    cudagraphs: bool = True
    prepare_weights: bool = True               # weight-only work once per weight set, not per call
    quant: str | None = None                   # None or kiln.passes.quantize.QUANT_MODES
    observer: Callable | None = None           # called with each CompiledGraph (tests, tools)
    record: bool = False                       # keep the IR text after every pass (kiln dump)
    serving: bool = False                      # run the serving-only passes (serve.kv_cache)
    block_size: int = 16                       # serving: tokens per KV-cache block
    fallback: str = "warn"                     # "error": raise instead of running eagerly
    cache: bool = True                         # the persistent compile cache (KILN_CACHE=0: off)
    timings: bool = False                      # print where compile time went at exit (KILN_TIMINGS=1)
    tensor_parallel_size: int = 1              # > 1: shard.tensor_parallel over that many ranks
    tensor_parallel_rank: int | None = None    # None: torch.distributed.get_rank() at compile time

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def make(cls, options: dict | None = None, **kw) -> "CompileOptions":
        merged = dict(options or {})
        merged.update({k: v for k, v in kw.items() if v is not None})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(f"unknown kiln option(s) {', '.join(unknown)}; valid options: "
                             f"{', '.join(sorted(names))}")
        if "disable_passes" in merged:
            d = merged["disable_passes"]
            merged["disable_passes"] = set(d.split(",") if isinstance(d, str) else d)
        opts = cls(**merged)
        env = os.environ
        if env.get("KILN_DUMP_DIR"):
            opts.dump_dir = env["KILN_DUMP_DIR"]
        if env.get("KILN_DISABLE_PASSES"):
            opts.disable_passes |= {p.strip() for p in env["KILN_DISABLE_PASSES"].split(",") if p.strip()}
        if env.get("KILN_PASS_LIMIT"):
            try:
                opts.pass_limit = int(env["KILN_PASS_LIMIT"])
            except ValueError:
                raise ValueError(f"KILN_PASS_LIMIT must be an integer, got {env['KILN_PASS_LIMIT']!r}") from None
        if env.get("KILN_VERIFY") == "1":
            opts.verify = True
        from .compile_cache import enabled
        opts.cache = enabled(opts.cache)   # KILN_CACHE=0 wins; a bad value is an error
        if env.get("KILN_TIMINGS") == "1":
            opts.timings = True
        from kiln.ir.fallback import policy
        opts.fallback = policy(opts.fallback)   # KILN_FALLBACK wins; a bad value is an error
        from kiln.passes.quantize import check_quant
        check_quant(opts.quant)
        check_tensor_parallel(opts.tensor_parallel_size, opts.tensor_parallel_rank)
        from kiln.backends.targets import get_target
        get_target(opts.target)
        return opts


def check_tensor_parallel(size, rank) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)
                             or not 0 <= rank < size):
        raise ValueError(f"tensor_parallel_rank must be None (this process's rank in the "
                         f"torch.distributed group) or an int in [0, {size}), got {rank!r}")


def resolve_tensor_parallel(opts: CompileOptions) -> CompileOptions:
    """`opts` with tensor_parallel_rank set: the process's rank in the default
    torch.distributed group when the options leave it None, so the compiled graph (and the
    compile cache's key) is this rank's shard. With an explicit rank nothing needs a group
    at compile time (dumps, per-rank artifacts); the collectives need one when they run."""
    size, rank = opts.tensor_parallel_size, opts.tensor_parallel_rank
    check_tensor_parallel(size, rank)
    if size == 1 or rank is not None:
        return opts
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"tensor_parallel_size={size} needs a torch.distributed process group, and none is "
            f"initialised in this process: call torch.distributed.init_process_group(backend="
            f"'nccl' (GPUs) or 'gloo' (CPU), world_size={size}, rank=...) in each of the {size} "
            f"processes before the first compiled call (or start them with torchrun), or pass "
            f"tensor_parallel_rank to compile one rank's shard without a group")
    if dist.get_world_size() != size:
        raise RuntimeError(
            f"tensor_parallel_size={size}, but the torch.distributed group has "
            f"{dist.get_world_size()} ranks: give the group's size, or start {size} ranks")
    return replace(opts, tensor_parallel_rank=dist.get_rank())
