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

Loading checks, in order, and stops at the first problem with one `StaleArtifact` error
that names it and says how to recompile: the manifest (present, readable, this format),
kiln and torch versions (and triton for GPU targets), the files, the model directory and
its weights (size and mtime, else sha256), the config hash (the model's config.json and the
compile options), then parses the IR and compiles the wrapper.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
FINAL_IR = "serving.kir"
WRAPPER = "wrapper.py"
EXTRA_WEIGHTS = "extra_weights.safetensors"


class StaleArtifact(ValueError):
    """The artifact cannot be served as is; the message says why and how to recompile."""


# -- progress -------------------------------------------------------------------------------------
class Steps:
    """Named steps with a spinner and elapsed time on stderr (rich), silent when stderr is
    not a terminal. `with steps("capture"): ...`; `steps.seconds` keeps each duration."""

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
        task = self.progress.add_task(name, total=1) if self.progress is not None else None
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0
            if task is not None:
                self.progress.update(task, completed=1, description=f"{name} [green]done")


# -- hashing and versions -------------------------------------------------------------------------
def versions() -> dict:
    import torch
    import transformers

    import kiln
    out = {"kiln": kiln.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "triton": None}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
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
    if opts.get("aot"):
        extra += " --aot"
    return f"recompile with: kiln compile {spec} -t {target}{extra} -o {path}"


# -- compile --------------------------------------------------------------------------------------
def compile_artifact(spec: str, target: str, out: str | os.PathLike, block_size: int = 16,
                     dtype: str = "float32", disable_passes: list[str] | None = None,
                     quant: str | None = None, aot: bool = False,
                     steps: "Steps | None" = None) -> Path:
    """Compile `spec` (smollm2, an HF directory or a GGUF file) for `target` into `out`.
    `aot` (GPU targets) also writes aot/: kernel binaries with C launchers. `steps` shows
    progress (and keeps each step's seconds)."""
    import torch

    from kiln.frontends import hf

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
    compiled = compile_serving(model, target=target, block_size=block_size, record=True, steps=step,
                               disable_passes=set(disable_passes or ()), quant=quant)
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
        from safetensors import safe_open
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, where in self.manifest["weights"].items():
            by_file.setdefault(where["file"], []).append((name, where["key"]))
        out = {}
        for file, pairs in by_file.items():
            folder = self.path if file == EXTRA_WEIGHTS else self.model_dir
            with safe_open(str(folder / file), "pt", device=str(device)) as st:
                for name, key in pairs:
                    out[name] = st.get_tensor(key)
        return out

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.model_dir)


def is_artifact(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def load_artifact(path: str | os.PathLike, check_weights: bool = True) -> Artifact:
    from kiln.backends import wrapper
    from kiln.ir import KilnParseError, parse
    path = Path(path).resolve()
    manifest = None

    def stale(why: str) -> StaleArtifact:
        return StaleArtifact(f"artifact {path}: {why}; {recompile_hint(manifest, path)}")

    if not path.is_dir():
        raise stale("no such directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise stale(f"no {MANIFEST} (not a kiln artifact, or an interrupted write)") from None
    except (ValueError, UnicodeDecodeError) as e:
        manifest = None
        raise stale(f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        manifest = manifest if isinstance(manifest, dict) else None
        raise stale(f"format {got!r}, this kiln reads format {FORMAT}")
    try:
        have, want = versions(), manifest["versions"]
        hard = ["kiln", "torch"] + (["triton"] if manifest["target"] != "cpu" else [])
        for k in hard:
            if want.get(k) != have.get(k):
                raise stale(f"compiled with {k} {want.get(k)}, this is {k} {have.get(k)}")
        for f in [FINAL_IR, WRAPPER] + sorted({w["file"] for w in manifest["weights"].values()
                                                if w["file"] == EXTRA_WEIGHTS}):
            if not (path / f).is_file():
                raise stale(f"{f} is missing")
        model_dir = Path(manifest["model"]["dir"])
        if not (model_dir / "config.json").is_file():
            raise stale(f"the model directory {model_dir} (weights, config, tokenizer) is gone")
        if check_weights:
            for name, rec in manifest["model"]["files"].items():
                _check_file(model_dir / name, rec, stale)
        if config_hash(model_dir, manifest["target"], manifest["options"]) != manifest["config_hash"]:
            raise stale(f"the config hash differs: {model_dir / 'config.json'} or the compile "
                        f"options changed since compilation")
    except KeyError as e:
        raise stale(f"{MANIFEST} lacks {e}") from None
    try:
        graph = parse((path / FINAL_IR).read_text())
    except KilnParseError as e:
        raise stale(f"{FINAL_IR} does not parse ({str(e).splitlines()[0]})") from None
    if [v.name for v in graph.inputs] != manifest["serving"]["inputs"]:
        raise stale(f"{FINAL_IR} does not match the manifest's inputs")
    try:
        fn = wrapper.load((path / WRAPPER).read_text(), f"kiln_{path.name}")
    except Exception as e:  # noqa: BLE001 - any failure to compile the generated module
        raise stale(f"{WRAPPER} does not load ({type(e).__name__}: {e})") from None
    return Artifact(path, manifest, graph, fn, model_dir)


def _check_file(f: Path, rec: dict, stale) -> None:
    if not f.is_file():
        raise stale(f"weights file {f} is missing")
    st = f.stat()
    if st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
        return
    from kiln.frontends.hf import file_sha256
    if st.st_size != rec["size"] or file_sha256(f) != rec["sha256"]:
        raise stale(f"weights file {f} changed since compilation")
