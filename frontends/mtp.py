"""Multi-token-prediction (MTP) modules: loaded from a checkpoint that ships them, as torch
modules built from the model's own classes, for `--speculative mtp:K`.

DeepSeek-V3 (and GLM-4.5, which copies its layout) trains D extra modules after the main
model; module 1 predicts the token after next. For a token at position i, with h_i the main
model's last hidden state there (the residual stream before the final norm) and t_{i+1} the
token after it:

    h'_i   = DecoderLayer(eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]))   at position i
    logits = head(norm(h'_i))                                             predicts t_{i+2}

The decoder layer is causal self-attention over the positions 0..i of this same sequence of
inputs, so the module keeps a KV cache of its own. Chained for more drafts, its own output
h'_i stands in for the main model's hidden state at the next position (as vLLM's MTP drafter
and EAGLE do): position i+1 takes (t_{i+2} = the draft just made, h'_i). The rotary position
is that of the hidden state (i), as in vLLM and in the paper's indexing (the module runs over
the sequence positions 1..T-k of the main model); transformers' own MTP generation uses the
token's (i + 1) and chains the normed h'. Either choice changes how many drafts stand, never
the output.

Checkpoint layout (`MTP_LAYOUTS`, data): module j's tensors are `model.layers.{N + j}.*`
(N = num_hidden_layers) -- `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, `shared_head.head`,
`embed_tokens` (a copy of the main model's in DeepSeek-V3's release), and a full decoder
layer. transformers builds only N layers and drops these keys at load; `load` asks it for
N + 1 layers instead, so the decoder layer is the model's own class at index N (dense or MoE
by the model's own rule) loaded through transformers' own weight conversions (per-expert
checkpoint tensors become its fused expert tensors), then takes that layer out of the model.
The remaining tensors are read from the safetensors files directly. Embedding and head are
shared with the main model's when the checkpoint's copies are equal (or absent), as DeepSeek
and vLLM do.

Only the first module drafts: DeepSeek-V3 and GLM-4.5 ship one (`num_nextn_predict_layers`
= 1), and drafting with module 2 would need module 1's hidden state at every position.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hf


@dataclass(frozen=True)
class MTPLayout:
    """Where a family's checkpoint keeps its MTP modules."""
    count: str            # the config field: how many modules the checkpoint ships
    prefix: str           # module j's keys start with this, {index} = num_hidden_layers + j
    hidden_first: bool = False   # eh_proj reads [hnorm(h); enorm(e)] (default: embedding first)


# model_type -> layout. A family with the same layout is one more line here.
MTP_LAYOUTS = {
    "deepseek_v3": MTPLayout("num_nextn_predict_layers", "model.layers.{index}."),
    "glm4_moe": MTPLayout("num_nextn_predict_layers", "model.layers.{index}."),
}
# The module's own tensors besides its decoder layer (keys after the prefix), then the
# copies of the main model's embedding and LM head it may carry (absent or equal: shared).
OWN_TENSORS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
SHARED_TENSORS = ("embed_tokens.weight", "shared_head.head.weight")


class MTPError(ValueError):
    """The model has no MTP modules kiln can load; the message says why and what to use."""


def _no_mtp(what: str) -> MTPError:
    families = ", ".join(sorted(MTP_LAYOUTS))
    return MTPError(f"--speculative mtp:K drafts with the model's multi-token-prediction "
                    f"modules, and {what}; use a checkpoint that ships them (families: "
                    f"{families}, with num_nextn_predict_layers >= 1), or draft without them: "
                    f"--speculative ngram:K or layerskip:K")


def num_modules(config) -> int:
    """How many MTP modules the config says the checkpoint ships (0: none, or a family kiln
    does not know)."""
    layout = MTP_LAYOUTS.get(getattr(config, "model_type", None))
    return int(getattr(config, layout.count, 0) or 0) if layout else 0


class MTPModule(torch.nn.Module):
    """One MTP module over a flat batch, as the serving capture calls a model:
    `forward(input_ids [1, T], position_ids [1, T], hidden_states [1, T, H])` returns
    (logits [1, T, V], the module's own last hidden state [1, T, H]: what chains, and what
    the next draft's hidden_states is)."""

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module, own: dict[str, torch.Tensor],
                 layout: MTPLayout, embed: torch.nn.Module | None = None,
                 head: torch.nn.Module | None = None):
        super().__init__()
        config = model.config
        if getattr(config, "_attn_implementation", "sdpa") != "sdpa":
            raise MTPError(f"MTP drafting captures the module with SDPA's causal attention; "
                           f"load the model with attn_implementation='sdpa', not "
                           f"{config._attn_implementation!r}")
        self.config = config
        self.hidden_first = layout.hidden_first
        decoder = model.get_decoder()
        size, eps = config.hidden_size, config.rms_norm_eps
        norm_cls = type(decoder.norm)
        dtype = next(model.parameters()).dtype
        self.embed_tokens = model.get_input_embeddings() if embed is None else embed
        self.enorm = norm_cls(size, eps=eps)
        self.hnorm = norm_cls(size, eps=eps)
        self.eh_proj = torch.nn.Linear(2 * size, size, bias=False)
        self.layer = layer
        self.norm = norm_cls(size, eps=eps)
        self.head = model.get_output_embeddings() if head is None else head
        self.rotary_emb = decoder.rotary_emb
        with torch.no_grad():
            for name, param in (("enorm.weight", self.enorm.weight), ("hnorm.weight", self.hnorm.weight),
                                ("eh_proj.weight", self.eh_proj.weight),
                                ("shared_head.norm.weight", self.norm.weight)):
                t = own[name]
                if t.shape != param.shape:
                    raise MTPError(f"MTP tensor {name} is {tuple(t.shape)}, expected "
                                   f"{tuple(param.shape)} for hidden size {size}: the checkpoint "
                                   f"does not match its config.json")
                param.copy_(t)
        for m in (self.enorm, self.hnorm, self.eh_proj, self.norm):
            m.to(dtype)
        self.eval()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                hidden_states: torch.Tensor, use_cache: bool = False):
        e = self.enorm(self.embed_tokens(input_ids))
        h = self.hnorm(hidden_states)
        x = self.eh_proj(torch.cat([h, e] if self.hidden_first else [e, h], dim=-1))
        # SDPA without a mask attends causally over the flat batch (serve.kv_cache pages it).
        x = self.layer(x, attention_mask=None, position_ids=position_ids,
                       position_embeddings=self.rotary_emb(x, position_ids))
        return self.head(self.norm(x)), x


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every safetensors key of a model directory -> the file that holds it."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def _read(files: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    for f in sorted({files[k] for k in keys}):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in keys if files[k] == f})
    return out


def load(spec: str | os.PathLike, dtype: torch.dtype = torch.float32,
         attn_implementation: str = "sdpa"):
    """`(model, tokenizer, [MTPModule])`: `hf.load`'s model and tokenizer, and the checkpoint's
    first MTP module. Raises MTPError when the model ships none."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as tf_logging
    folder = hf.model_dir(spec)
    config = AutoConfig.from_pretrained(folder)
    layout = MTP_LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None:
        raise _no_mtp(f"{spec} is a {getattr(config, 'model_type', 'model')} model, a family "
                      f"kiln knows no MTP modules of")
    if num_modules(config) < 1:
        raise _no_mtp(f"{spec}'s config.json says it ships none ({layout.count} = "
                      f"{getattr(config, layout.count, 0)})")
    n = config.num_hidden_layers
    prefix = layout.prefix.format(index=n)
    files = checkpoint_files(folder)
    mine = [k for k in files if k.startswith(prefix)]
    if not mine:
        raise _no_mtp(f"{spec}'s weights have no {prefix}* tensors (its config.json says "
                      f"{layout.count} = {getattr(config, layout.count)}, but the checkpoint was "
                      f"saved without them)")
    missing = [k for k in OWN_TENSORS if prefix + k not in files]
    if missing:
        raise _no_mtp(f"{spec}'s MTP module lacks {', '.join(prefix + k for k in missing)}")
    # transformers builds (and converts the weights of) one more decoder layer: the module's.
    # (Its report would list the module's other tensors as unexpected: they are read below.)
    config.num_hidden_layers = n + 1
    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, attn_implementation=attn_implementation,
            output_loading_info=True)
    finally:
        tf_logging.set_verbosity(verbosity)
    absent = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if absent:
        raise _no_mtp(f"{spec}'s MTP decoder layer lacks {', '.join(absent[:4])}"
                      f"{' ...' if len(absent) > 4 else ''}")
    decoder = model.get_decoder()
    layer = decoder.layers[n]
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:n])
    model.config.num_hidden_layers = n   # (from_pretrained keeps a copy of `config`)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tensors = _read(files, [prefix + k for k in OWN_TENSORS + SHARED_TENSORS
                            if prefix + k in files])
    own = {k: tensors[prefix + k] for k in OWN_TENSORS}
    unshared = _unshared(model, {k: tensors.get(prefix + k) for k in SHARED_TENSORS}, dtype)
    return model, tokenizer, [MTPModule(model, layer, own, layout, **unshared)]


def _unshared(model, copies: dict[str, torch.Tensor | None], dtype) -> dict[str, torch.nn.Module]:
    """The module's own embedding / head where its checkpoint copy differs from the main
    model's (none where it is equal or absent: the main model's is used)."""
    out = {}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    for key, main, name, make in (
            ("embed_tokens.weight", embed, "embed",
             lambda w: torch.nn.Embedding(w.shape[0], w.shape[1])),
            ("shared_head.head.weight", head, "head",
             lambda w: torch.nn.Linear(w.shape[1], w.shape[0], bias=False))):
        t = copies[key]
        if t is None or (t.shape == main.weight.shape and torch.equal(t.to(dtype), main.weight)):
            continue
        module = make(t)
        with torch.no_grad():
            module.weight.copy_(t)
        out[name] = module.to(dtype)
    return out
