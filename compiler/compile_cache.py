"""The persistent compile cache: what capture, the passes and codegen made of a model,
kept on disk, so that another process compiling the same thing skips them.

    <kiln cache>/compile/          $KILN_CACHE_DIR/compile (~/.cache/kiln/compile)
        <key>/                     one entry; manifest.json says which kind, what was
                                   compiled (model, graph, target), the versions, and the
                                   size and sha256 of every file, sealed with the host key
          a "compile" entry, keyed by a captured graph's text, the compile options that
          change the result and the target:
            graph.kir              the IR after the passes (kiln.ir.parse gives it back)
            wrapper.py             the generated wrapper
            meta.json              what the graph carries beside its text (graph.meta)
            passes.txt             the pass statistics of the compile that made it
            snapshots/NNN_<pass>.kir   the IR after every pass, when the compile recorded them
          a "capture" entry, keyed by a model's module classes (and their source files),
          config, parameters and device (kiln.serving: the serving capture of `kiln
          compile` / `kiln serve MODEL`):
            captured.kir           the graph as dynamo and AOTAutograd captured it
          an "aot" entry, keyed by dynamo's graph (its code, the types of its inputs) for a
          torch.compile whose AOTAutograd wrapper does nothing but pass inputs through
          (kiln.backend: AOTAutograd is then skipped):
            captured.kir           the graph AOTAutograd gave
            aot.json               what its wrapper did: small lifted constants (literals
                                   such as transformers' empty cache tensors, at most 1024
                                   elements), the outputs that are inputs
        triton/                    Triton's own kernel cache (cubins, hsacos), unless
                                   TRITON_CACHE_DIR says otherwise

Every key also holds kiln's version and a hash of its own source files (an edit during
development is a miss), the registered passes and rule functions (a user's, with a hash of
its source), and the torch, triton and Python versions. Weights are graph inputs, never
constants, so an entry holds code only; weight preparation still runs at the first call.

An entry is written into a temporary directory beside it and renamed into place: readers
see a complete entry or none, and of two processes writing the same entry one wins and
the other's copy is dropped. A reader checks the manifest's seal (an HMAC under this
machine's host key, as artifacts are sealed: the wrapper is code that will run) and every
file's size and hash; an entry that fails is reported in one warning, removed and
rebuilt, never trusted. A cache that cannot be used (the directory is not writable, the
disk is full) costs a warning, never a compile.

KILN_CACHE=0 (or the compile option `cache=False`) turns it off; KILN_DUMP_DIR compiles
without looking it up, so that every pass runs and is dumped. The keys do not see a patch
of kiln's internals made at run time (monkeypatching), nor a changed implementation of a
custom op under the same name: turn the cache off for those.
`kiln cache ls` lists the entries, `kiln cache clear` removes them;
`kiln.stats()["compile_cache"]` counts hits, misses and rebuilds.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
ENV = "KILN_CACHE"          # "0": off
SUBDIR = "compile"
TRITON_SUBDIR = "triton"
MANIFEST = "manifest.json"
GRAPH = "graph.kir"
WRAPPER = "wrapper.py"
META = "meta.json"
STATS = "passes.txt"
SNAPSHOTS = "snapshots"
CAPTURED = "captured.kir"
# The package folders of kiln (subpackages inside them included): a change to any of
# their source files is a new key.
KILN_PACKAGES = ("kiln", "kiln.frontends", "kiln.ir", "kiln.passes", "kiln.backends",
                 "kiln.runtime")
SOURCE_SUFFIXES = (".py", ".lark", ".kiln")


class CompileCacheWarning(UserWarning):
    """The compile cache could not be used, or held an entry it had to rebuild."""


class CorruptEntry(Exception):
    pass


_lock = threading.Lock()
_counts: Counter = Counter()   # (kind, what): what is hit, miss, rebuilt, stored, unwritable
_warned: set[str] = set()      # lasting problems (an unwritable cache) warned about once
EVENTS = ("hit", "miss", "rebuilt", "stored", "unwritable")


def counts(reset: bool = False) -> dict:
    """{"hit": n, ...} of compile entries, and the same for the captured graphs of `kiln
    compile` / `kiln serve MODEL` under "capture" and of torch.compile under "aot"."""
    with _lock:
        out = {what: _counts.get(("compile", what), 0) for what in EVENTS}
        for kind in ("capture", "aot"):
            out[kind] = {what: _counts.get((kind, what), 0) for what in EVENTS}
        if reset:
            _counts.clear()
    return out


def _count(kind: str, what: str) -> None:
    with _lock:
        _counts[(kind, what)] += 1


def _warn_once(topic: str, message: str) -> None:
    with _lock:
        if topic in _warned:
            return
        _warned.add(topic)
    warnings.warn(message, CompileCacheWarning, stacklevel=3)


def enabled(option: bool = True) -> bool:
    """KILN_CACHE=0 wins over the option; any other value of it is an error."""
    env = os.environ.get(ENV)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{ENV} must be 0 (compile cache off) or 1 (on), got {env!r}")
    return option and env != "0"


def directory() -> Path:
    from kiln.frontends.hf import cache_root
    return cache_root() / SUBDIR


def point_triton_here() -> None:
    """Triton keeps the kernels it compiles under the kiln cache (so `kiln cache clear`
    clears them too), unless the user chose a place with TRITON_CACHE_DIR."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory() / TRITON_SUBDIR))


# -- the key ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over kiln's own source files (paths and contents), read once a process."""
    digest = hashlib.sha256()
    for package in KILN_PACKAGES:
        for folder in importlib.util.find_spec(package).submodule_search_locations or ():
            root = Path(folder)
            for f in sorted(root.rglob("*")):
                if f.suffix in SOURCE_SUFFIXES and "__pycache__" not in f.parts and f.is_file():
                    digest.update(f"{package}/{f.relative_to(root).as_posix()}\0".encode())
                    digest.update(f.read_bytes())
    return digest.hexdigest()


def pipeline() -> list:
    """The registered passes and rule functions, by name and where they are defined; one
    defined outside kiln (a user's pass or predicate) with a hash of its source, so that
    registering or editing one is a new key (kiln's own are in `source_hash`)."""
    from kiln.passes import PIPELINE
    from kiln.passes.rules import FUNCTIONS
    out = []
    for kind, name, fn in ([("pass", p.name, p.fn) for p in PIPELINE]
                           + [("function", n, f) for n, f in FUNCTIONS.items()]):
        module = getattr(fn, "__module__", None) or ""
        row = [kind, name, module, getattr(fn, "__qualname__", type(fn).__name__)]
        if module != "kiln" and not module.startswith("kiln."):
            with contextlib.suppress(OSError, TypeError):   # a builtin: its name says it
                row.append(_sha256(inspect.getsource(fn).encode()))
        out.append(row)
    return out


def versions() -> dict:
    from .artifact import versions as package_versions
    return {**package_versions(("kiln", "torch", "triton")), "kiln_source": source_hash(),
            "python": sys.version.split()[0]}


def key_of(kind: str, what: dict) -> str:
    """The name of an entry of `kind` ("compile", "capture", "aot") for `what` (JSON-able:
    every input that changes its content), with kiln's versions and pipeline."""
    blob = json.dumps({"format": FORMAT, "kind": kind, "what": what, "versions": versions(),
                       "pipeline": pipeline()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the compile entry's files --------------------------------------------------------------------
@dataclass
class Compiled:
    """What the passes and codegen made of a captured graph (a "compile" entry)."""
    graph: str                          # IR text after the passes
    wrapper: str                        # the generated wrapper's source
    meta: dict                          # graph.meta beside the text (JSON)
    stats: str                          # the pass statistics
    snapshots: list[tuple[str, str]]    # (pass, IR text) after each pass, when recorded

    def files(self) -> dict[str, str]:
        out = {GRAPH: self.graph, WRAPPER: self.wrapper, STATS: self.stats,
               META: json.dumps(self.meta, sort_keys=True, default=_meta_value)}
        for i, (name, text) in enumerate(self.snapshots):
            out[f"{SNAPSHOTS}/{i:03d}_{name}.kir"] = text
        return out

    @classmethod
    def from_files(cls, files: dict[str, str]) -> "Compiled":
        snaps = sorted((rel, text) for rel, text in files.items() if rel.startswith(SNAPSHOTS + "/"))
        return cls(files[GRAPH], files[WRAPPER], json.loads(files[META]), files[STATS],
                   [(rel[len(SNAPSHOTS) + 5:-len(".kir")], text) for rel, text in snaps])


# -- entries ------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(key: str, kind: str = "compile") -> dict[str, str] | None:
    """The files of the entry for `key`, by path inside it, or None (a miss). An entry that
    fails its checks is warned about, removed, and counted as rebuilt: the caller makes
    it again and stores it."""
    path = directory() / key
    if not path.is_dir():
        _count(kind, "miss")
        return None
    try:
        files = _read(path, key, kind)
    except (CorruptEntry, KeyError, TypeError, AttributeError, ValueError) as e:
        why = str(e) if isinstance(e, CorruptEntry) else \
            f"its manifest lacks or garbles a field: {type(e).__name__} {e}"
        warnings.warn(f"kiln: compile cache entry {path} is unusable ({why}); removing it "
                      f"and compiling again", CompileCacheWarning, stacklevel=2)
        _remove(path)
        _count(kind, "rebuilt")
        return None
    _count(kind, "hit")
    return files


def _read(path: Path, key: str, kind: str) -> dict[str, str]:
    from .artifact import canonical_manifest, host_key
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptEntry(f"no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"{MANIFEST} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("key") != key or manifest.get("kind") != kind:
        raise CorruptEntry(f"{MANIFEST} is not a format-{FORMAT} {kind} manifest of this key")
    try:
        sealed = hmac.new(host_key() or b"", canonical_manifest(manifest), hashlib.sha256)
    except ValueError as e:
        raise CorruptEntry(f"cannot check its seal: {e}") from None
    if not hmac.compare_digest(str(manifest.get("signature")), sealed.hexdigest()):
        raise CorruptEntry("its manifest's seal does not verify (edited, or written by "
                           "another machine or user)")
    files = {}
    for rel, rec in manifest["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CorruptEntry(f"{MANIFEST} names {rel!r}, outside the entry")
        try:
            data = (path / rel).read_bytes()
        except OSError:
            raise CorruptEntry(f"{rel} is missing") from None
        if len(data) != rec["size"] or _sha256(data) != rec["sha256"]:
            raise CorruptEntry(f"{rel} does not match its recorded size and sha256 "
                               f"(truncated or edited)")
        files[rel] = data.decode()
    return files


def store(key: str, files: dict[str, str], about: dict, kind: str = "compile") -> None:
    """Writes an entry of these files (temp directory + rename); `about` describes it for
    `kiln cache ls`. A failure to write warns once and changes nothing else."""
    from .artifact import seal
    root = directory()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        records = {}
        for rel, text in files.items():
            data = text.encode()
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            records[rel] = {"size": len(data), "sha256": _sha256(data)}
        manifest = {"format": FORMAT, "kind": kind, "key": key, "created": time.time(),
                    "about": about, "versions": versions(), "files": records}
        seal(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.replace(tmp, root / key)
        except OSError:
            if not (root / key).is_dir():
                raise
            # Another process stored the same entry first: its copy is as good as this one.
        else:
            tmp = None
            _count(kind, "stored")
    except (OSError, ValueError) as e:   # ValueError: the host key (artifact.host_key)
        _count(kind, "unwritable")
        _warn_once("unwritable", f"kiln: cannot write the compile cache in {root} ({e}); "
                                 f"compiling without it. Set KILN_CACHE_DIR to a writable "
                                 f"directory, or KILN_CACHE=0 to turn the cache off")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _meta_value(value):
    import sympy
    if isinstance(value, sympy.Basic):   # scalar_inputs' host output expressions
        return str(value)
    raise TypeError(f"a {type(value).__name__} in graph.meta")


def _remove(path: Path) -> None:
    """Renames the entry away first, so that a concurrent reader sees it whole or not at all."""
    trash = path.with_name(f".trash-{path.name[:16]}-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


# -- kiln cache ls | clear --------------------------------------------------------------------
def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def entries() -> list[dict]:
    """One row per entry, newest first: key, bytes, created (epoch seconds), and what its
    manifest says it holds (`about`), or `problem` when the manifest is unreadable."""
    root = directory()
    rows = []
    if not root.is_dir():
        return rows
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith(".") or path.name == TRITON_SUBDIR:
            continue
        row = {"key": path.name, "bytes": _size(path), "created": path.stat().st_mtime,
               "about": {}}
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            row["created"], row["about"] = manifest["created"], manifest["about"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            row["problem"] = f"unreadable {MANIFEST} ({type(e).__name__})"
        rows.append(row)
    return sorted(rows, key=lambda r: -r["created"])


def triton_bytes() -> int:
    return _size(directory() / TRITON_SUBDIR)


def clear() -> tuple[int, int]:
    """Removes every entry, Triton's kernels under the cache and leftovers of interrupted
    writes; returns (entries removed, bytes freed)."""
    root = directory()
    if not root.is_dir():
        return 0, 0
    removed, freed = 0, 0
    for path in root.iterdir():
        freed += _size(path) if path.is_dir() else path.stat().st_size
        if path.is_dir():
            removed += not path.name.startswith(".") and path.name != TRITON_SUBDIR
            _remove(path)
        else:
            path.unlink(missing_ok=True)
    return removed, freed
