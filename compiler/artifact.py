"""Compiled artifacts: `kiln compile MODEL -t TARGET -o DIR`, then `kiln serve DIR` with no
recompilation.

An artifact is a directory:

    DIR/
      manifest.json         format, versions (kiln, torch, triton, transformers), target,
                            model spec and directory, compile options, config hash, serving
                            shape (layers, KV heads, head dim, block size, vocab), and the
                            weights: each safetensors file of the model directory with its
                            size, mtime and sha256, and for every weight input of the graph
                            where its tensor lives
      ir/NNN_<pass>.kir     the IR after every pass (000_input.kir is the captured graph)
      serving.kir           the final serving graph (what `kiln serve` parses)
      wrapper.py            the generated wrapper for it (what `kiln serve` runs)
      passes.txt            per-pass statistics
      extra_weights.safetensors   tensors the model directory does not hold (non-persistent
                            buffers such as rotary inv_freq), if any
      aot/                  with --aot (cuda, hip): the cubin/hsaco of every AOT variant of
                            the Triton kernels the graph uses, a C launcher for each, the
                            header kiln_kernels.h, README.txt (how to build a library) and
                            manifest.json (see kiln.backends.triton.launcher); listed in
                            the artifact's manifest under "aot". Serving does not read it.

Weights stay in the model directory (the safetensors files `kiln.frontends.hf.model_dir`
names, e.g. the GGUF conversion cache); the manifest pins their content. It is written to
a temporary directory beside DIR and renamed into place, so DIR is either the old artifact
or the complete new one, never half-written.

Integrity and trust. `wrapper.py` is Python that `kiln serve` executes, so an artifact is
code. The manifest records the size and sha256 of every file of the artifact ("files":
wrapper.py, serving.kir, ir/*.kir, passes.txt, extra_weights.safetensors, aot/...), and
of every safetensors file of the model directory. The manifest itself is sealed:

  - `manifest_sha256`: sha256 of the manifest's canonical JSON (sorted keys, no spaces,
    ASCII) without the two seal fields. Any edit (a swapped weight binding, a changed
    file hash) that does not also recompute it is refused.
  - `signature`: HMAC-SHA256 of the same bytes under this machine's host key, 32 random
    bytes kiln creates once in `<kiln cache>/host.key` (mode 0600; the cache is
    $KILN_CACHE_DIR or ~/.cache/kiln), and `build_host`, a public id derived from that key.
    Only a kiln holding the key can produce it: it proves the artifact was built by kiln
    on this machine (by this user) and not edited since.

An artifact whose signature does not verify (built on another machine, by another user,
or re-sealed by someone else) is refused unless the caller passes `trust=True`
(`--trust-artifact` on the command line, like Hugging Face's trust_remote_code); trust
skips only the signature: the manifest hash, every file hash, the containment of every
path and the shape of every weight binding are still checked. Every path the manifest
names must resolve (symlinks included) inside the artifact or the model directory, and
each weight binding must name a hashed file and a tensor of the shape the serving graph
declares for that input.

Loading checks, in order, and stops at the first problem with one `StaleArtifact` error
that names it and says how to recompile: the manifest (present, readable, this format),
its seal (`manifest_sha256`, then the signature unless trusted), kiln and torch versions
(and triton for GPU targets), the artifact's files (paths inside it, sizes and sha256),
the model directory and its weights (size and mtime, else sha256: the weights are data
and hashing gigabytes on every start is too slow, the artifact's own files are always
hashed), the config hash (the model's config.json and the compile options), that the
target's device is here, then parses the IR, checks the weight bindings against the
graph's inputs, and only then executes the wrapper, from the very bytes it hashed.
`check_artifact` runs the checks up to the config hash, less torch's and triton's
versions: what `kiln serve` checks, without importing torch, before it starts the
engine's process, which loads the artifact.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = 2   # 2: file hashes, the manifest seal and the build host
MANIFEST = "manifest.json"
FINAL_IR = "serving.kir"
WRAPPER = "wrapper.py"
EXTRA_WEIGHTS = "extra_weights.safetensors"
HOST_KEY = "host.key"
SEAL_FIELDS = ("manifest_sha256", "signature")


class StaleArtifact(ValueError):
    """The artifact cannot be served as is; the message says why and how to recompile."""


class UntrustedArtifact(StaleArtifact):
    """The artifact's signature is not this machine's: kiln did not build it here (or it was
    re-sealed elsewhere). Loading it needs trust (`--trust-artifact`)."""


# -- progress -------------------------------------------------------------------------------------
class Steps:
    """Named steps with a spinner and elapsed time on stderr (rich), silent when stderr is
    not a terminal. `with steps("capture"): ...`; `steps.seconds` keeps each duration, and
    each step is a phase of kiln.ir.timings (what the stages inside it time nests in it)."""

    def __init__(self, enabled: bool | None = None):
        self.seconds: dict[str, float] = {}
        self.progress = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
                self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                         TimeElapsedColumn(), console=Console(stderr=True),
                                         transient=False)
            except ImportError:
                self.progress = None

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    @contextlib.contextmanager
    def __call__(self, name: str):
        from kiln.ir import timings
        task = self.progress.add_task(name, total=1) if self.progress is not None else None
        stop = timings.start(name)   # the same step in the phase tree (--timings)
        try:
            yield
        finally:
            self.seconds[name] = stop()
            if task is not None:
                self.progress.update(task, completed=1, description=f"{name} [green]done")


# -- hashing and versions -------------------------------------------------------------------------
def versions(names=("kiln", "torch", "transformers", "triton")) -> dict:
    """Each package's `__version__` (None where it is not installed). Not the distribution
    metadata: a CUDA build's local part (`2.11.0+cu130`) is only in `__version__`."""
    import importlib
    out = {}
    for name in names:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            out[name] = None
    return out


def file_record(path: Path) -> dict:
    from kiln.frontends.hf import file_sha256
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def config_hash(model_dir: Path, target: str, options: dict) -> str:
    """What the compiled graph depends on besides code versions: the model's config.json
    and the compile options."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    blob = json.dumps({"config": config, "target": target, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def recompile_hint(manifest: dict | None, path: Path) -> str:
    spec = (manifest or {}).get("model", {}).get("spec", "MODEL")
    target = (manifest or {}).get("target", "TARGET")
    opts = (manifest or {}).get("options", {})
    extra = ""
    if opts.get("block_size", 16) != 16:
        extra += f" --block-size {opts['block_size']}"
    if opts.get("dtype", "float32") != "float32":
        extra += f" --dtype {opts['dtype']}"
    if opts.get("quant"):
        extra += f" --quant {opts['quant']}"
    if opts.get("aot"):
        extra += " --aot"
    return f"recompile with: kiln compile {spec} -t {target}{extra} -o {path}"


# -- the host key and the manifest seal ------------------------------------------------------------
def host_key_path() -> Path:
    from kiln.frontends.hf import cache_root
    return cache_root() / HOST_KEY


def host_key(create: bool = False) -> bytes | None:
    """This machine's secret artifact key (32 bytes), from `<kiln cache>/host.key`; made
    once (mode 0600, atomically: two processes creating it at once agree) when `create`.
    None when there is none and `create` is false."""
    path = host_key_path()
    try:
        key = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        key = None
    except (OSError, ValueError) as e:
        raise ValueError(f"the kiln host key {path} is unreadable ({e}); delete it (kiln makes "
                         f"a new one; artifacts built with the old one then need "
                         f"--trust-artifact or a recompile)") from None
    if key is not None:
        if len(key) != 32:
            raise ValueError(f"the kiln host key {path} is not 64 hex digits; delete it (kiln "
                             f"makes a new one; artifacts built with the old one then need "
                             f"--trust-artifact or a recompile)")
        return key
    if not create:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".host.key.tmp-", dir=path.parent)
    except OSError as e:
        raise ValueError(f"kiln signs the artifacts it builds with a key kept in {path} and "
                         f"cannot create it ({e}); set KILN_CACHE_DIR to a writable "
                         f"directory") from None
    try:
        with os.fdopen(fd, "w") as f:   # mkstemp: mode 0600
            f.write(secrets.token_hex(32) + "\n")
        with contextlib.suppress(FileExistsError):   # another process won: use its key
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return host_key(create=False)


def host_id(key: bytes | None) -> str:
    """The public name of a host key (recorded in manifests, shown in messages)."""
    return "none" if key is None else hashlib.sha256(b"kiln host id\0" + key).hexdigest()[:16]


def canonical_manifest(manifest: dict) -> bytes:
    """The bytes the seal covers: the manifest without its seal fields, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k not in SEAL_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def seal(manifest: dict, key: bytes | None = None) -> dict:
    """Records the build host and seals `manifest` in place (and returns it): its sha256 and
    the HMAC under `key` (default: this machine's host key, made if needed)."""
    key = key if key is not None else host_key(create=True)
    manifest["build_host"] = host_id(key)
    blob = canonical_manifest(manifest)
    manifest["manifest_sha256"] = hashlib.sha256(blob).hexdigest()
    manifest["signature"] = hmac.new(key, blob, hashlib.sha256).hexdigest()
    return manifest


def _check_seal(manifest: dict, trust: bool, path: Path, stale) -> None:
    try:
        blob = canonical_manifest(manifest)
    except ValueError as e:   # NaN / Infinity: kiln never writes them
        raise stale(f"{MANIFEST} holds a value kiln never writes ({e})") from None
    recorded = manifest.get("manifest_sha256")
    if not isinstance(recorded, str) or not hmac.compare_digest(
            recorded.encode(), hashlib.sha256(blob).hexdigest().encode()):
        raise stale(f"{MANIFEST} was edited after kiln wrote it (its content does not match "
                    f"its manifest_sha256; e.g. a weight binding or a file hash was changed)")
    if trust:
        return
    key = host_key(create=False)
    signature = manifest.get("signature")
    if key is not None and isinstance(signature, str) and hmac.compare_digest(
            signature.encode(), hmac.new(key, blob, hashlib.sha256).hexdigest().encode()):
        return
    built, here = manifest.get("build_host"), host_id(key)
    where = (f"it claims this machine's host id ({here}) but its signature does not verify: "
             f"it was re-sealed without this machine's key" if built == here else
             f"it was built on another machine or by another user (host {built}; this is "
             f"{here}, key {host_key_path()})")
    raise UntrustedArtifact(
        f"artifact {path}: kiln did not build it here: {where}. Its wrapper.py is Python that "
        f"serving runs: if you trust where it came from (read its wrapper.py), pass "
        f"--trust-artifact to kiln serve / kiln generate (trust=True in Python); otherwise "
        f"{recompile_hint(manifest, path)}")


# -- compile --------------------------------------------------------------------------------------
def compile_artifact(spec: str, target: str, out: str | os.PathLike, block_size: int = 16,
                     dtype: str = "float32", disable_passes: list[str] | None = None,
                     quant: str | None = None, aot: bool = False,
                     steps: "Steps | None" = None, on_choice=None) -> Path:
    """Compile `spec` (smollm2, an HF directory or a GGUF file) for `target` into `out`.
    `quant`: a mode, None / "none", or "auto" (kiln.quant_choice: int4 weights on the cpu
    when the model's are exactly 4-bit); `on_choice` gets the QuantChoice. `aot` (GPU
    targets) also writes aot/: kernel binaries with C launchers. `steps` shows progress
    (and keeps each step's seconds)."""
    import torch

    from kiln.frontends import hf

    from .quant_choice import choose
    from .serving import compile_serving, model_weights
    out = Path(out).resolve()
    if aot:
        check_aot_target(target)
    options = {"block_size": block_size, "dtype": dtype, "quant": quant,
               "disable_passes": sorted(disable_passes or [])}
    if aot:   # only when set: artifacts compiled before --aot existed keep their hash
        options["aot"] = True
    step = steps or Steps(False)
    if str(spec) != hf.DEFAULT:   # a path: record it absolute, for the recompile hint
        spec = str(Path(spec).expanduser().resolve())
    with step(f"load {spec}"):
        folder = hf.model_dir(spec).resolve()
        weight_files = sorted(folder.glob("*.safetensors"))
        if not weight_files:
            raise ValueError(f"model directory {folder} has no *.safetensors weights; kiln "
                             f"artifacts reference safetensors (convert the .bin weights first)")
        from transformers import AutoModelForCausalLM   # the tokenizer is read at serve time
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa").eval()
    choice = choose(quant, model, target)
    options["quant"] = choice.quant
    if on_choice is not None:
        on_choice(choice)
    compiled = compile_serving(model, target=target, block_size=block_size, record=True, steps=step,
                               disable_passes=set(disable_passes or ()), quant=choice.quant)
    binaries = None
    if aot:
        from kiln.backends.triton.aot import AotCompileError, compile_specs
        with step("aot kernels"):
            try:
                binaries = compile_specs(aot_specs(compiled.graph, target), (target,))
            except AotCompileError as e:   # the CLI reports ValueErrors in one message
                raise ValueError(f"--aot: {e}") from None
    with step("write artifact"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write(tmp, spec, folder, weight_files, target, options, model, compiled,
                   model_weights(model, compiled.graph), binaries)
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_aot_target(target: str) -> None:
    """--aot needs a target whose kernels are Triton binaries (cuda, hip)."""
    from kiln.backends.targets import get_target
    from kiln.backends.triton.aot import TARGETS as AOT_TARGETS
    if get_target(target).triton_backend not in AOT_TARGETS:
        raise ValueError(
            f"--aot writes GPU kernel binaries with C launchers, and target {target!r} has "
            f"none (cpu runs torch ops and CPU kernels; {', '.join(sorted(AOT_TARGETS))} run "
            f"Triton kernels); compile with -t {' or -t '.join(sorted(AOT_TARGETS))} to get "
            f"aot/, or drop --aot")


def aot_specs(graph, target: str) -> list:
    """The AOT variants (`AOT_SPECS`) of every Triton kernel module that implements one of
    the graph's kiln ops on `target` (the targets table names each op's launcher; its
    module is the kernel's), those meant for `target`, in the order the graph first uses
    them."""
    import importlib

    from kiln.backends.targets import get_target
    t = get_target(target)
    modules = []
    for n in graph.nodes:
        if n.op.startswith("kiln."):
            module = t.kernel(n.op).split(":")[0]
            if module.startswith("kiln.backends.triton.") and module not in modules:
                modules.append(module)
    return [s for m in modules for s in getattr(importlib.import_module(m), "AOT_SPECS", ())
            if target in s.targets]


def _write(tmp: Path, spec, folder: Path, weight_files, target, options, model, compiled,
           weights, aot_binaries=None) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kiln.ir.roles import is_weight
    from kiln.runtime.model_runner import cache_inputs
    tmp.chmod(0o755)
    (tmp / "ir").mkdir()
    for i, (name, text) in enumerate(compiled.snapshots):
        (tmp / "ir" / f"{i:03d}_{name}.kir").write_text(text)
    (tmp / FINAL_IR).write_text(compiled.snapshots[-1][1])
    (tmp / WRAPPER).write_text(compiled.source)
    (tmp / "passes.txt").write_text(compiled.stats + "\n")
    # Where each weight input of the graph lives: a key of a safetensors file of the model
    # directory (directly, or through a tied parameter), or extra_weights.safetensors.
    keys = {}
    for f in weight_files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                keys[k] = f.name
    ptr_to_key = {}
    for k in keys:
        t = weights.get(k)
        if t is not None:
            ptr_to_key.setdefault(t.data_ptr(), k)
    binding, extra = {}, {}
    g = compiled.graph
    for v in g.inputs:
        if not is_weight(v):
            continue
        t = weights[v.name]
        if v.name in keys:
            binding[v.name] = {"file": keys[v.name], "key": v.name}
        elif t.data_ptr() in ptr_to_key:
            k = ptr_to_key[t.data_ptr()]
            binding[v.name] = {"file": keys[k], "key": k}
        else:
            extra[v.name] = t.detach().contiguous().clone()
            binding[v.name] = {"file": EXTRA_WEIGHTS, "key": v.name}
    if extra:
        save_file(extra, str(tmp / EXTRA_WEIGHTS))
    caches = cache_inputs(g)
    cfg = model.config
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "target": target,
        "model": {"spec": str(spec), "dir": str(folder), "architecture": type(model).__name__,
                  "files": {f.name: file_record(f) for f in weight_files},
                  "config.json": file_record(folder / "config.json")},
        "options": options,
        "config_hash": config_hash(folder, target, options),
        "serving": {"num_layers": len(caches) // 2, "block_size": caches[0].type.shape[1],
                    "num_kv_heads": caches[0].type.shape[2], "head_dim": caches[0].type.shape[3],
                    "cache_dtype": str(caches[0].type.dtype).replace("torch.", ""),
                    "vocab_size": cfg.vocab_size,
                    "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
                    "inputs": [v.name for v in g.inputs]},
        "weights": binding,
        "ir": [f"ir/{i:03d}_{name}.kir" for i, (name, _) in enumerate(compiled.snapshots)],
        "compile_seconds": round(compiled.compile_seconds, 3),
    }
    if aot_binaries is not None:
        from kiln.backends.triton.launcher import write_aot
        aot_dir = Path(write_aot(aot_binaries, str(tmp / "aot"), targets=(target,)))
        manifest["aot"] = {
            "dir": "aot",
            "kernels": [b.spec_name for b in aot_binaries],
            "files": sorted(str(f.relative_to(tmp)) for f in aot_dir.iterdir()),
        }
    manifest["files"] = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size,
                                                          "sha256": _sha256_file(f)}
                         for f in sorted(tmp.rglob("*")) if f.is_file()}
    seal(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for f in tmp.rglob("*"):   # an ordinary, world-readable directory like any build output
        f.chmod(0o755 if f.is_dir() else 0o644)
    return manifest


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp directory to `out`, replacing an earlier artifact there."""
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a kiln artifact; choose another -o directory")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- load -----------------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: Path
    manifest: dict
    graph: object            # kiln.ir.Graph (the serving graph)
    fn: object               # the wrapper's forward
    model_dir: Path

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["serving"]["vocab_size"]

    def load_weights(self, device: str = "cpu") -> dict:
        """The bound tensors by graph input name (the bindings were checked at load). A file
        that became unreadable since is one StaleArtifact error, not a safetensors traceback."""
        from safetensors import SafetensorError, safe_open
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, where in self.manifest["weights"].items():
            by_file.setdefault(where["file"], []).append((name, where["key"]))
        out = {}
        for file, pairs in by_file.items():
            folder = self.path if file == EXTRA_WEIGHTS else self.model_dir
            try:
                with safe_open(str(folder / file), "pt", device=str(device)) as st:
                    for name, key in pairs:
                        out[name] = st.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise StaleArtifact(f"artifact {self.path}: {folder / file} is not a readable "
                                    f"safetensors file ({e}); "
                                    f"{recompile_hint(self.manifest, self.path)}") from None
        return out

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.model_dir)


def is_artifact(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def check_artifact(path: str | os.PathLike, trust: bool = False) -> dict:
    """The checks of `load_artifact` that parse nothing, run nothing and need no torch: the
    manifest and its seal, kiln's version, every file's size and sha256, the model's files
    and config. Returns the manifest. `kiln serve` runs them before it starts the
    engine's process, which loads the artifact: a stale one is one error at once. What is
    left to the load (the IR parses, its weight inputs are bound, the wrapper loads, torch's
    and triton's versions) reads bytes these checks found as the sealed manifest records
    them; should any of it fail, its error reaches the user from the engine's process."""
    return _verified(Path(path).resolve(), True, trust, torch_versions=False)[0]


def load_artifact(path: str | os.PathLike, check_weights: bool = True,
                  trust: bool = False) -> Artifact:
    """Verify, then load, the artifact at `path` (see the module docstring for the checks and
    their order). `trust` accepts an artifact kiln did not build on this machine (its
    wrapper runs); nothing in it executes before every check passed."""
    from kiln.backends import wrapper
    from kiln.ir import KilnParseError, parse
    path = Path(path).resolve()
    manifest, content, model_dir, stale = _verified(path, check_weights, trust)
    from kiln.backends.targets import get_target
    # The graph names the target's device; loading is for running there.
    get_target(manifest["target"]).torch_device(to_run=True)
    try:
        try:
            graph = parse(content[FINAL_IR].decode())
        except (KilnParseError, UnicodeDecodeError) as e:
            raise stale(f"{FINAL_IR} does not parse ({str(e).splitlines()[0]})") from None
        if [v.name for v in graph.inputs] != manifest["serving"]["inputs"]:
            raise stale(f"{FINAL_IR} does not match the manifest's inputs")
        _check_bindings(path, model_dir, manifest, graph, stale)
    except (KeyError, TypeError, AttributeError) as e:   # a field missing or of the wrong kind
        raise stale(f"{MANIFEST} lacks {e} or holds it in a form kiln never writes") from None
    # Every check passed: only now run the wrapper, from the bytes that were hashed.
    try:
        fn = wrapper.load(content[WRAPPER].decode(), f"kiln_{path.name}")
    except Exception as e:  # noqa: BLE001 - any failure to compile the generated module
        raise stale(f"{WRAPPER} does not load ({type(e).__name__}: {e})") from None
    return Artifact(path, manifest, graph, fn, model_dir)


def _verified(path: Path, check_weights: bool, trust: bool, torch_versions: bool = True):
    """(manifest, content of the files loading reads, model directory, the StaleArtifact
    maker) once the checks of `check_artifact` passed (and, with `torch_versions`, torch's
    and triton's versions: reading them imports torch)."""
    manifest = None

    def stale(why: str) -> StaleArtifact:
        return StaleArtifact(f"artifact {path}: {why}; {recompile_hint(manifest, path)}")

    if not path.is_dir():
        raise stale("no such directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise stale(f"no {MANIFEST} (not a kiln artifact, or an interrupted write)") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        manifest = None
        raise stale(f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        manifest = manifest if isinstance(manifest, dict) else None
        raise stale(f"format {got!r}, this kiln reads format {FORMAT}")
    try:
        _check_seal(manifest, trust, path, stale)
        hard = ["kiln", "torch"] + (["triton"] if manifest["target"] != "cpu" else [])
        hard = hard if torch_versions else ["kiln"]
        have, want = versions(hard), manifest["versions"]
        for k in hard:
            if want.get(k) != have.get(k):
                raise stale(f"compiled with {k} {want.get(k)}, this is {k} {have.get(k)}")
        content = _check_artifact_files(path, manifest, stale)
        model_dir = Path(manifest["model"]["dir"]).resolve()
        if not (model_dir / "config.json").is_file():
            raise stale(f"the model directory {model_dir} (weights, config, tokenizer) is gone")
        for name, rec in manifest["model"]["files"].items():
            f = _inside(model_dir, name, "the model weights file", stale)
            if check_weights:
                _check_file(f, rec, stale)
        if config_hash(model_dir, manifest["target"], manifest["options"]) != manifest["config_hash"]:
            raise stale(f"the config hash differs: {model_dir / 'config.json'} or the compile "
                        f"options changed since compilation")
    except (KeyError, TypeError, AttributeError) as e:   # a field missing or of the wrong kind
        raise stale(f"{MANIFEST} lacks {e} or holds it in a form kiln never writes") from None
    return manifest, content, model_dir, stale


def _sha256_file(f: Path) -> str:
    from kiln.frontends.hf import file_sha256
    return file_sha256(f)


def _inside(root: Path, rel, what: str, stale) -> Path:
    """root/rel, refused unless it is a relative path that resolves (symlinks followed)
    inside root."""
    if not isinstance(rel, str) or not rel or "\0" in rel or Path(rel).is_absolute():
        raise stale(f"{MANIFEST} names {what} {rel!r}, which is not a relative path inside "
                    f"{root}; refusing to read it")
    f = (root / rel).resolve()
    if not f.is_relative_to(root.resolve()):
        raise stale(f"{MANIFEST} names {what} {rel!r}, which resolves to {f}, outside {root}; "
                    f"refusing to read it")
    return f


def _check_artifact_files(path: Path, manifest: dict, stale) -> dict[str, bytes]:
    """Every file the manifest records: inside the artifact, present, its size and sha256.
    Returns the content of the files loading reads as code or text (serving.kir,
    wrapper.py), read once: what is hashed is what runs."""
    files = manifest["files"]
    needed = [FINAL_IR, WRAPPER] + sorted({w["file"] for w in manifest["weights"].values()
                                           if w["file"] == EXTRA_WEIGHTS})
    for rel in needed:
        if rel not in files:
            raise stale(f"{MANIFEST} records no hash for {rel}")
    content = {}
    for rel, rec in files.items():
        f = _inside(path, rel, "the artifact file", stale)
        if not f.is_file():
            raise stale(f"{rel} is missing")
        if rel in (FINAL_IR, WRAPPER):
            data = f.read_bytes()
            size, sha = len(data), hashlib.sha256(data).hexdigest()
            content[rel] = data
        else:
            size = f.stat().st_size
            sha = _sha256_file(f) if size == rec["size"] else None
        if size != rec["size"] or sha != rec["sha256"]:
            raise stale(f"{rel} changed since compilation (its {'size' if size != rec['size'] else 'sha256'} "
                        f"differs from the manifest's: edited, truncated or corrupt)")
    return content


def _check_bindings(path: Path, model_dir: Path, manifest: dict, graph, stale) -> None:
    """Each weight input of the graph is bound, to a tensor of a hashed file, with the shape
    the graph declares for it (read from the safetensors headers, no tensor data)."""
    from safetensors import SafetensorError, safe_open

    from kiln.ir.roles import is_weight
    binding = manifest["weights"]
    inputs = {v.name: v for v in graph.inputs}
    for name in binding:
        if name not in inputs or not is_weight(inputs[name]):
            raise stale(f"{MANIFEST} binds {name!r}, which is not a weight input of {FINAL_IR}")
    missing = [v.name for v in graph.inputs if is_weight(v) and v.name not in binding]
    if missing:
        raise stale(f"{MANIFEST} binds no tensor to the weight input(s) {', '.join(missing[:4])}")
    by_file: dict[str, list[str]] = {}
    for name, where in binding.items():
        by_file.setdefault(where["file"], []).append(name)
    for file, names in by_file.items():
        if file == EXTRA_WEIGHTS:
            f = _inside(path, file, "the weights file", stale)
        elif file in manifest["model"]["files"]:
            f = _inside(model_dir, file, "the weights file", stale)
        else:
            raise stale(f"{MANIFEST} binds weight {names[0]!r} to {file!r}, which is neither "
                        f"{EXTRA_WEIGHTS} nor a hashed safetensors file of the model directory "
                        f"{model_dir}; refusing to read it")
        try:
            with safe_open(str(f), "pt") as st:
                keys = set(st.keys())
                for name in names:
                    key = binding[name]["key"]
                    if key not in keys:
                        raise stale(f"{file} has no tensor {key!r} (bound to weight {name!r})")
                    shape = tuple(st.get_slice(key).get_shape())
                    want = tuple(inputs[name].type.shape)
                    if shape != want:
                        raise stale(f"{MANIFEST} binds weight {name!r} to {file}:{key} of shape "
                                    f"{list(shape)}, and {FINAL_IR} declares {list(want)}")
        except (SafetensorError, OSError) as e:
            raise stale(f"{f} is not a readable safetensors file ({e})") from None


def _check_file(f: Path, rec: dict, stale) -> None:
    if not f.is_file():
        raise stale(f"weights file {f} is missing")
    st = f.stat()
    if st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
        return
    from kiln.frontends.hf import file_sha256
    if st.st_size != rec["size"] or file_sha256(f) != rec["sha256"]:
        raise stale(f"weights file {f} changed since compilation")
