"""Building TVM kernels: for this machine's CPU, once per (kernel, parameters), cached on disk.

    <kiln cache>/tvm/          $KILN_CACHE_DIR/tvm (~/.cache/kiln/tvm)
        <kernel>-<key>.so      a module TVM's LLVM backend compiled, linked by the system
                               compiler (export_library)

The key is a hash of the kernel's name and parameters (the sizes it is specialised for,
eps, the group size), the CPU (model and instruction-set flags), TVM's version and the
source of `kernels.py` (an edit is a new key). A cached module is loaded through TVM's FFI
and runtime library alone; TVM's compiler is imported only to build one. A module is written to a temporary file beside it and
renamed into place, so a reader sees a whole file or none; one that fails to load is
removed and rebuilt, never trusted. A directory that cannot be written costs a rebuild
per process, not an error. `counts()` says what happened: builds, disk hits, rebuilds,
and which ops ran on TVM or on torch.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import platform
import tempfile
import threading
import warnings
from collections import Counter
from pathlib import Path

_lock = threading.Lock()
_counts: Counter = Counter()
_loaded: dict[tuple, object] = {}   # (kernel, *params) -> the module's packed function
_warned: set[str] = set()
EXTRA_MESSAGE = ("the CPU target's TVM kernels need the 'cpu' extra (apache-tvm not "
                 "installed): pip install 'kiln[cpu]'")


class TVMUnavailable(ImportError):
    """TVM is not installed; the message names the extra that provides it."""


@functools.lru_cache(maxsize=None)
def available() -> bool:
    # Cached: every op call asks, and until TVM's package is imported (a warm start never
    # imports it) find_spec searches sys.path each time (~30 us).
    return importlib.util.find_spec("tvm") is not None


def require() -> None:
    if not available():
        raise TVMUnavailable(EXTRA_MESSAGE, name="tvm")


def count(what: str) -> None:
    with _lock:
        _counts[what] += 1


def counts(reset: bool = False) -> dict:
    """{"build": n, "disk_hit": n, "rebuilt": n, "unwritable": n,
    "tvm:<op>": calls run by a TVM kernel, "torch:<op>:<why>": calls run by torch}."""
    with _lock:
        out = dict(_counts)
        if reset:
            _counts.clear()
    return out


def warn_once(topic: str, message: str) -> None:
    with _lock:
        if topic in _warned:
            return
        _warned.add(topic)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / "tvm"


_TARGET = None


def target():
    """TVM's LLVM target for this machine's CPU. TVM's wheel reports its build's conda
    triple, with which LLVM refuses -mcpu=native; the system triple with the CPU name LLVM
    detects gives the same vector instructions (AVX-512 where the CPU has it)."""
    global _TARGET
    if _TARGET is None:
        import tvm
        from tvm.target import codegen
        _TARGET = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                     "mcpu": codegen.llvm_get_system_cpu()})
    return _TARGET


def _source_hash() -> str:
    source = importlib.resources.files("kiln.backends.tvm").joinpath("kernels.py").read_bytes()
    return hashlib.sha256(source).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """What the key needs of the machine without importing TVM's compiler (seconds, and not
    needed to run a cached module): TVM's version and the CPU (model and instruction-set
    flags, which decide what LLVM generates for it)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n", 1)[0].splitlines()
                        if ":" in line)
        cpu += "|" + info.get("model name\t", "").strip() + "|" + info.get("flags\t\t", "").strip()
    except OSError:
        pass
    return f"tvm {importlib.metadata.version('apache-tvm')} | {hashlib.sha256(cpu.encode()).hexdigest()[:16]}"


def key(kernel: str, params: dict) -> str:
    text = json.dumps({"kernel": kernel, "params": params, "machine": _machine(),
                       "source": _source_hash()}, sort_keys=True)
    return f"{kernel}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


_RUNTIME = False


def _load(path: Path):
    """A cached module's `main` through TVM's FFI and runtime library only: `import tvm`
    loads its compiler too (LLVM; seconds at start-up), which only a build needs."""
    global _RUNTIME
    import tvm_ffi
    if not _RUNTIME:
        spec = importlib.util.find_spec("tvm")
        lib = Path(spec.origin).parent / "lib" / "libtvm_runtime.so"
        # The modules call into it (TVM's thread pool for their parallel loops).
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        _RUNTIME = True
    return tvm_ffi.load_module(str(path))["main"]


def _size_thread_pool() -> None:
    """TVM's parallel loops run on its own thread pool, sized when first used: by
    TVM_NUM_THREADS, else OMP_NUM_THREADS, else half the logical CPUs on x86 (it assumes
    two hyperthreads a core). On a 2-vCPU machine that is one thread, and the grouped int8
    GEMV ran at about half the speed it runs on two (BENCHMARKS.md). kiln sizes it as torch
    sizes its own (torch.get_num_threads(): the CPUs torch computes on), unless the user
    set TVM_NUM_THREADS."""
    if "TVM_NUM_THREADS" not in os.environ:
        import torch
        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())


def get(kernel: str, params: dict, define=None):
    """The compiled function for `kernel` with `params`: from memory (keyed by the
    parameters themselves: this runs on every call of an op), from the disk cache, or
    built from `define(**params)` (a scheduled IRModule; by default the function of
    kernels.py named `kernel`) and stored."""
    fast = (kernel, *sorted(params.items()))
    fn = _loaded.get(fast)
    if fn is not None:
        return fn
    _size_thread_pool()
    k = key(kernel, params)
    path = cache_dir() / f"{k}.so"
    fn = None
    if path.exists():
        try:
            fn = _load(path)
            count("disk_hit")
        except Exception as e:    # a truncated or foreign file: rebuilt, never trusted
            warn_once(f"corrupt:{path}", f"kiln TVM cache: {path} did not load ({e}); rebuilding it")
            count("rebuilt")
            path.unlink(missing_ok=True)
    if fn is None:
        import tvm
        if define is None:
            from . import kernels
            define = getattr(kernels, kernel)
        lib = tvm.compile(define(**params), target=target())
        count("build")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{k}.", dir=path.parent)
            os.close(fd)
            try:
                lib.export_library(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fn = _load(path)
        except OSError as e:
            count("unwritable")
            warn_once("unwritable", f"kiln TVM cache: cannot write {path.parent} ({e}); TVM "
                      f"kernels are rebuilt in every process. Set KILN_CACHE_DIR to a "
                      f"writable directory")
            fn = lib["main"]
    with _lock:
        _loaded[fast] = fn
    return fn


def clear_memory() -> None:
    """Forgets the in-process modules (tests: the next get reads the disk cache)."""
    with _lock:
        _loaded.clear()
