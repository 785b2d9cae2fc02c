"""Ahead-of-time compilation of kiln's Triton kernels, with the kernels declared as data.

Each kernel module (`norm`, `rope`, ...) lists the concrete variants it wants shipped in a
module-level `AOT_SPECS` list of `KernelSpec`s: the `@triton.jit` function, the type of
every parameter, the values of its constexprs and the launch options. `compile_spec`
turns one spec into a cubin (cuda) or hsaco (hip) on any machine: no GPU is needed, only
the toolchains bundled with Triton (ptxas for cuda, the in-process LLVM/lld for AMD).

TRITON_INTERPRET: when that variable is set (as it is for the whole test suite),
`@triton.jit` returns interpreter objects that cannot be compiled, and the interpreter
also patches `triton.language` while it runs kernels. So whenever a spec's function is
not a real `JITFunction`, compilation happens in fresh child processes
(`python -m kiln.backends.triton.aot --worker ...`) started with TRITON_INTERPRET unset;
a child re-imports the kernel's module, where the decorator now gives a `JITFunction`,
and rebuilds the spec from plain data (kernel as "module:name"), so kernels must be
module-level functions. The same children give parallelism: `compile_specs` spreads a
list of (spec, target) jobs over `jobs` processes. Results come back as `CompiledBinary`,
a plain picklable record (binary, assembly text, metadata), whichever path produced it.

Triton versions: 3.6 (the GPU machine's; checked: `ASTSource(fn, signature,
constexprs=None, attrs=None)`, and every spec here compiles with it) and 3.9 (this
machine's) take every parameter in `signature` ("constexpr" for constexprs), constexpr
values by name in `constexprs`, and attrs as {(index,): [["tt.divisibility", 16]]}.
Older releases spelled the keyword `constants`; `_make_source` picks the spelling by
inspecting `ASTSource.__init__` rather than parsing version strings (the old spelling is
untested). `enable_fp_fusion` is passed explicitly: 3.9 warns that its default changes
in 3.10.

CLI: `python -m kiln.backends.triton.aot -t cuda -t hip -o DIR [-j N] [-k FILTER]` writes
`<spec>.<target>.cubin|hsaco` plus `manifest.json` (kernel symbol, shared memory,
warps, signature, constants) for a C launcher to load without Python.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget

TARGETS = {"cuda": GPUTarget("cuda", 90, 32), "hip": GPUTarget("hip", "gfx942", 64)}
BINARY_KIND = {"cuda": "cubin", "hip": "hsaco"}


def family(target: str) -> str:
    """"hip" of "hip:gfx950": a compile target is a TARGETS key, or one with ":ARCH" naming
    another architecture of that target (one of its archs in kiln's targets table)."""
    return target.split(":", 1)[0]


def gpu_target(target: str) -> GPUTarget:
    """The GPUTarget of "cuda", "hip" (their default archs) or "hip:gfx950", "cuda:80"."""
    name, _, arch = target.partition(":")
    if name not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}, each with an "
                         f"optional :ARCH")
    if not arch:
        return TARGETS[name]
    from kiln.backends.targets import get_target
    archs = [str(a) for a in get_target(name).archs]
    if arch not in archs:
        raise ValueError(f"target {name} has archs {archs} (kiln targets), not {arch!r}")
    default = TARGETS[name]
    return GPUTarget(default.backend, int(arch) if arch.isdigit() else arch, default.warp_size)
KERNEL_MODULES = ("norm", "rope", "activation", "quant", "attention", "paged_attention", "moe", "gemm",
                  "gemv")
_PACKAGE = "kiln.backends.triton"
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class KernelSpec:
    """One concrete kernel variant to compile ahead of time.

    `signature` names the type of every parameter of `fn` ("constexpr" for those whose
    value is in `constants`). `divisible_by_16` lists the parameters (pointers or ints)
    a launcher guarantees to be multiples of 16 (pointers: 16-byte aligned); the compiler
    uses that to vectorise. None means "every pointer parameter". `targets` restricts a
    variant to the backends that support its types (fp8 e4m3fnuz exists only on hip).
    """
    name: str
    fn: object  # triton.runtime.JITFunction (or the interpreter's stand-in)
    signature: dict[str, str]
    constants: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple[str, ...] | None = None
    targets: tuple[str, ...] = ("cuda", "hip")


def make_spec(name: str, fn, types: dict[str, str], constants: dict[str, object],
              **options) -> KernelSpec:
    """Build a KernelSpec whose signature lists `fn`'s parameters in order, marking those in
    `constants` as constexpr; fails early when a parameter has no type."""
    arg_names = list(fn.arg_names)
    missing = [a for a in arg_names if a not in types and a not in constants]
    extra = [a for a in list(types) + list(constants) if a not in arg_names]
    if missing or extra:
        raise ValueError(f"kernel spec {name!r}: parameters without a type {missing}, "
                         f"unknown names {extra}")
    signature = {a: ("constexpr" if a in constants else types[a]) for a in arg_names}
    return KernelSpec(name, fn, signature, dict(constants), **options)


@dataclass
class CompiledBinary:
    """What compiling one spec for one target gives: plain data, safe to pickle."""
    spec_name: str
    target: str
    kernel_name: str            # symbol to look up in the binary
    binary: bytes               # cubin or hsaco
    asm: dict[str, str] = field(default_factory=dict)       # ttir, ttgir, llir, ptx / amdgcn
    metadata: dict[str, object] = field(default_factory=dict)  # shared, num_warps, ...
    signature: dict[str, str] = field(default_factory=dict)
    constants: dict[str, object] = field(default_factory=dict)
    compile_s: float = 0.0


class AotCompileError(RuntimeError):
    """One or more kernels failed to compile; `failures` maps (spec, target) to the error."""

    def __init__(self, failures: dict[tuple[str, str], str]):
        self.failures = failures
        lines = [f"{len(failures)} kernel compilation(s) failed:"]
        for (name, target), err in failures.items():
            lines.append(f"--- {name} for {target}:\n{err.strip()}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- compiling

def _is_jit_function(fn) -> bool:
    return isinstance(fn, triton.runtime.JITFunction)


def _attrs(spec: KernelSpec) -> dict:
    names = list(spec.signature)
    if spec.divisible_by_16 is None:
        aligned = [n for n, t in spec.signature.items() if t.startswith("*")]
    else:
        aligned = list(spec.divisible_by_16)
    unknown = [n for n in aligned if n not in names]
    if unknown:
        raise ValueError(f"kernel spec {spec.name!r}: divisible_by_16 names unknown {unknown}")
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def _check_signature(spec: KernelSpec) -> None:
    args = list(spec.fn.arg_names)
    const = [n for n, t in spec.signature.items() if t == "constexpr"]
    if list(spec.signature) != args or sorted(const) != sorted(spec.constants):
        raise ValueError(
            f"kernel spec {spec.name!r} does not match {spec.fn.__name__}{tuple(args)}: "
            f"signature names {list(spec.signature)}, constexprs {const}, "
            f"constants given {sorted(spec.constants)}")


def _make_source(spec: KernelSpec):
    from triton.compiler import ASTSource
    _check_signature(spec)
    params = inspect.signature(ASTSource.__init__).parameters
    kw = "constexprs" if "constexprs" in params else "constants"
    return ASTSource(fn=spec.fn, signature=dict(spec.signature), attrs=_attrs(spec),
                     **{kw: dict(spec.constants)})


def _json_safe(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, (list, tuple)):
            return [_json_safe(v) for v in value]
        return str(value)


def _compile_in_process(spec: KernelSpec, target: str) -> CompiledBinary:
    gpu = gpu_target(target)
    start = time.perf_counter()
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
               # The default is changing in Triton 3.10; say what we want.
               "enable_fp_fusion": True}
    kernel = triton.compile(_make_source(spec), target=gpu, options=options)
    md = kernel.metadata
    md = md._asdict() if hasattr(md, "_asdict") else dict(vars(md))
    asm = {k: v for k, v in kernel.asm.items() if isinstance(v, str)}
    return CompiledBinary(
        spec_name=spec.name, target=target, kernel_name=str(md.get("name", spec.fn.__name__)),
        binary=bytes(kernel.asm[BINARY_KIND[family(target)]]), asm=asm,
        metadata={k: _json_safe(v) for k, v in md.items()},
        signature=dict(spec.signature), constants=dict(spec.constants),
        compile_s=time.perf_counter() - start)


def _spec_to_data(spec: KernelSpec) -> dict:
    py_fn = spec.fn.fn  # both JITFunction and InterpretedFunction keep the Python function
    if "<locals>" in py_fn.__qualname__:
        raise ValueError(f"kernel spec {spec.name!r}: {py_fn.__qualname__} is not a "
                         "module-level function, so a compile process cannot import it")
    return {"name": spec.name, "fn": f"{py_fn.__module__}:{py_fn.__qualname__}",
            "signature": spec.signature, "constants": spec.constants,
            "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "divisible_by_16": spec.divisible_by_16, "targets": spec.targets}


def _spec_from_data(data: dict) -> KernelSpec:
    module, qualname = data["fn"].split(":")
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    if not _is_jit_function(fn):
        raise RuntimeError(f"{data['fn']} is not a triton JITFunction in the compile process "
                           "(is TRITON_INTERPRET set?)")
    return KernelSpec(data["name"], fn, data["signature"], data["constants"], data["num_warps"],
                      data["num_stages"], data["divisible_by_16"], tuple(data["targets"]))


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The child must import kiln and the kernels' modules exactly as this process does.
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] +
                                        [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_children(jobs_data: list[tuple[dict, str]], processes: int) -> list:
    """Compile (spec data, target) jobs in `processes` fresh interpreters; returns, per job,
    a CompiledBinary or an error string."""
    chunks = [jobs_data[i::processes] for i in range(processes)]
    chunks = [c for c in chunks if c]
    with tempfile.TemporaryDirectory(prefix="kiln-aot-") as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            src, dst = os.path.join(tmp, f"in{i}.pkl"), os.path.join(tmp, f"out{i}.pkl")
            with open(src, "wb") as f:
                pickle.dump(chunk, f)
            cmd = [sys.executable, "-m", "kiln.backends.triton.aot", "--worker", src, dst]
            procs.append((subprocess.Popen(cmd, env=_child_env(), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT), dst, chunk))
        results = {}
        for proc, dst, chunk in procs:
            out, _ = proc.communicate()
            if proc.returncode == 0 and os.path.exists(dst):
                with open(dst, "rb") as f:
                    for key, res in pickle.load(f):
                        results[key] = res
            else:
                tail = out.decode(errors="replace")[-4000:]
                msg = f"compile process exited with {proc.returncode}:\n{tail}"
                for data, target in chunk:
                    results[(data["name"], target)] = msg
    return [results[(data["name"], target)] for data, target in jobs_data]


def _worker(src: str, dst: str) -> None:
    import traceback
    with open(src, "rb") as f:
        jobs = pickle.load(f)
    out = []
    for data, target in jobs:
        try:
            res = _compile_in_process(_spec_from_data(data), target)
        except Exception:  # report every failure, keep compiling the rest
            res = traceback.format_exc(limit=-3)
        out.append(((data["name"], target), res))
    with open(dst, "wb") as f:
        pickle.dump(out, f)


def compile_specs(specs: list[KernelSpec], targets=tuple(TARGETS), jobs: int | None = None,
                  raise_on_error: bool = True) -> list[CompiledBinary]:
    """Compile every spec for every target it supports. `jobs` processes in parallel
    (default: the CPU count, at most 8); jobs=1 with real JITFunctions stays in-process.
    Raises AotCompileError listing every failure (or, with raise_on_error=False, returns
    the successes and the error strings in place of the failures)."""
    work = [(s, t) for s in specs for t in targets if family(t) in s.targets]
    return compile_pairs(work, jobs, raise_on_error)


def compile_pairs(work: list[tuple[KernelSpec, str]], jobs: int | None = None,
                  raise_on_error: bool = True) -> list[CompiledBinary]:
    """compile_specs over chosen (spec, target) pairs rather than every spec for every
    target; results in the order of `work`."""
    pairs = collections.Counter((s.name, t) for s, t in work)
    dupes = sorted({name for (name, _), n in pairs.items() if n > 1})
    if dupes:
        raise ValueError(f"duplicate kernel spec names: {dupes}")
    jobs = jobs or min(os.cpu_count() or 1, 8)
    jobs = max(1, min(jobs, len(work)))
    if jobs == 1 and all(_is_jit_function(s.fn) for s, _ in work):
        results = []
        for s, t in work:
            try:
                results.append(_compile_in_process(s, t))
            except Exception as e:  # noqa: BLE001 - collected and reported below
                results.append(f"{type(e).__name__}: {e}")
    else:
        results = _run_children([(_spec_to_data(s), t) for s, t in work], jobs)
    failures = {(s.name, t): r for (s, t), r in zip(work, results) if isinstance(r, str)}
    if failures and raise_on_error:
        raise AotCompileError(failures)
    return results


def compile_spec(spec: KernelSpec, target: str) -> CompiledBinary:
    """Compile one spec for "cuda" (sm_90), "hip" (gfx942) or another arch ("hip:gfx950")."""
    if family(target) not in spec.targets:
        raise ValueError(f"kernel spec {spec.name!r} is not meant for {target!r} "
                         f"(targets: {spec.targets})")
    if _is_jit_function(spec.fn):
        return _compile_in_process(spec, target)
    return compile_specs([spec], (target,), jobs=1)[0]


def binary_bytes(compiled, target: str) -> bytes:
    """The cubin (cuda) or hsaco (hip) of a CompiledBinary or a triton CompiledKernel."""
    if isinstance(compiled, CompiledBinary):
        return compiled.binary
    return bytes(compiled.asm[BINARY_KIND[family(target)]])


def all_specs() -> list[KernelSpec]:
    """Every AOT_SPECS entry of the kernel modules."""
    specs = []
    for mod in KERNEL_MODULES:
        specs.extend(importlib.import_module(f"{_PACKAGE}.{mod}").AOT_SPECS)
    return specs


def write_artifacts(results: list[CompiledBinary], out_dir: str) -> str:
    """Write binaries and manifest.json into out_dir (via a temp dir renamed into place)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".aot-", dir=parent)
    manifest = []
    for r in results:
        fname = f"{r.spec_name}.{r.target.replace(':', '-')}.{BINARY_KIND[family(r.target)]}"
        with open(os.path.join(tmp, fname), "wb") as f:
            f.write(r.binary)
        manifest.append({"spec": r.spec_name, "target": r.target, "file": fname,
                         "kernel_name": r.kernel_name, "signature": r.signature,
                         "constants": {k: _json_safe(v) for k, v in r.constants.items()},
                         "metadata": r.metadata})
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        import shutil
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        # Run through the importable module, not __main__, so that pickled results name
        # kiln.backends.triton.aot.CompiledBinary.
        importlib.import_module(f"{_PACKAGE}.aot")._worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python -m kiln.backends.triton.aot",
                                description="Compile kiln's Triton kernels ahead of time.")
    p.add_argument("-t", "--target", action="append", choices=sorted(TARGETS))
    p.add_argument("-o", "--out", help="directory for binaries and manifest.json")
    p.add_argument("-j", "--jobs", type=int, default=None)
    p.add_argument("-k", "--filter", default="", help="only specs whose name contains this")
    args = p.parse_args(argv)
    specs = [s for s in all_specs() if args.filter in s.name]
    start = time.perf_counter()
    try:
        results = compile_specs(specs, tuple(args.target or TARGETS), args.jobs)
    except AotCompileError as e:
        print(e, file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.spec_name:40s} {r.target:5s} {len(r.binary):8d} B  {r.compile_s:6.2f} s")
    print(f"{len(results)} binaries in {time.perf_counter() - start:.1f} s")
    if args.out:
        print("wrote", write_artifacts(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
