"""Compile options: from `torch.compile(..., options={...})`, `kiln.compile(**options)` and
the KILN_* environment variables (which win, so a user can debug without editing code)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
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
        from kiln.backends.targets import get_target
        get_target(opts.target)
        return opts
