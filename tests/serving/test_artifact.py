"""Artifacts of a tiny Llama saved as an HF directory: compile -> load without recompiling
(the loaded graph gives eager's logits), atomic replacement, and one clear error with a
recompile hint for every kind of stale or broken artifact."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from kiln import serving
from kiln.artifact import StaleArtifact, compile_artifact, is_artifact, load_artifact, seal
from kiln.cli import main
from kiln.runtime.batch import build_batch
from kiln.runtime.model_runner import PagedModelRunner


def test_layout(tiny_artifact, tiny_dir):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["target"] == "cpu" and m["model"]["dir"] == str(tiny_dir[0].resolve())
    assert set(m["versions"]) == {"kiln", "torch", "triton", "transformers"}
    assert m["model"]["files"]["model.safetensors"]["sha256"]
    assert m["ir"][0] == "ir/000_input.kir" and m["ir"][-1].endswith("_schedule.kir")   # the last pass
    for f in m["ir"] + ["serving.kir", "wrapper.py", "passes.txt"]:
        assert (tiny_artifact / f).is_file(), f
    assert (tiny_artifact / "serving.kir").read_text() == (tiny_artifact / m["ir"][-1]).read_text()
    assert m["weights"]["model.rotary_emb.inv_freq"]["file"] == "extra_weights.safetensors"
    assert m["weights"]["lm_head.weight"] == {"file": "model.safetensors", "key": "lm_head.weight"}
    assert m["serving"]["block_size"] == 8 and m["serving"]["num_layers"] == 2
    assert not [p for p in tiny_artifact.parent.iterdir() if p.name.startswith(".")]   # no temp dirs


def test_load_runs_without_recompiling(tiny_artifact, tiny_dir):
    _, model = tiny_dir
    captures = serving.CAPTURES
    dynamo_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    a = load_artifact(tiny_artifact)
    runner = PagedModelRunner(a.fn, a.graph, a.load_weights(), num_blocks=16, max_model_len=64,
                              vocab_size=a.vocab_size)
    ids = [torch.randint(0, 320, (n,)).tolist() for n in (9, 4)]
    logits = runner.execute(build_batch([(ids[0], 0, 9, [0, 1]), (ids[1], 0, 4, [2])], 8))
    assert serving.CAPTURES == captures
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == dynamo_frames
    with torch.no_grad():
        for i, p in enumerate(ids):
            want = model(torch.tensor([p])).logits[0, -1]
            assert ((logits[i] - want).norm() / want.norm()).item() < 1e-5


def test_recompiling_replaces_atomically(tiny_artifact, tiny_dir, tmp_path):
    d, _ = tiny_dir
    out = tmp_path / "again.kiln"
    shutil.copytree(tiny_artifact, out)
    (out / "marker").write_text("old")
    with pytest.raises(ValueError, match="unknown pass"):   # a failed compile keeps the old one
        compile_artifact(str(d), "cpu", out, block_size=8, disable_passes=["no.such.pass"])
    assert (out / "marker").is_file() and is_artifact(out)
    compile_artifact(str(d), "cpu", out, block_size=8)
    assert not (out / "marker").exists() and is_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.kiln"]
    not_ours = tmp_path / "precious"
    not_ours.mkdir()
    (not_ours / "data.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a kiln artifact"):
        compile_artifact(str(d), "cpu", not_ours, block_size=8)
    assert (not_ours / "data.txt").read_text() == "keep"


def _rehash(art, m, rel):
    """As kiln would have recorded it: the manifest's size and sha256 of art/rel."""
    data = (art / rel).read_bytes()
    m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _break(kind, art, model_dir):
    """Breaks the artifact copy `art` (or its model directory) one way. Most kinds stand for
    an artifact kiln itself wrote that is stale now (an older kiln, a bad wrapper): the
    manifest is re-sealed with this machine's key, as kiln would have; the 'edited' kinds
    are changes made after kiln wrote it, and are not."""
    m = json.loads((art / "manifest.json").read_text())
    if kind == "kiln version":
        m["versions"]["kiln"] = "0.0.1"
    elif kind == "torch version":
        m["versions"]["torch"] = "1.0"
    elif kind == "format":
        m["format"] = 99
    elif kind == "old format":
        m["format"] = 1
    elif kind == "options":
        m["options"]["block_size"] = 32
    elif kind == "missing wrapper":
        (art / "wrapper.py").unlink()
    elif kind == "bad IR":
        text = (art / "serving.kir").read_text()
        (art / "serving.kir").write_text(text.replace("kiln.paged_attention(", "kiln.paged_attention[", 1))
        _rehash(art, m, "serving.kir")
    elif kind == "bad wrapper":
        (art / "wrapper.py").write_text("def forward(:\n")
        _rehash(art, m, "wrapper.py")
    elif kind == "edited wrapper":
        (art / "wrapper.py").write_text((art / "wrapper.py").read_text() + "\n# edited\n")
    elif kind == "edited IR dump":
        ir = sorted((art / "ir").iterdir())[1]
        ir.write_text(ir.read_text() + "\n")
    elif kind == "edited manifest":
        m["compile_seconds"] = 0.0
        (art / "manifest.json").write_text(json.dumps(m))
        return
    elif kind == "bad manifest":
        (art / "manifest.json").write_text("{not json")
        return
    elif kind == "no manifest":
        (art / "manifest.json").unlink()
        return
    elif kind == "model config":
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["rms_norm_eps"] = 1e-3
        (model_dir / "config.json").write_text(json.dumps(cfg))
    elif kind == "weights":
        w = model_dir / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
    elif kind == "model gone":
        shutil.rmtree(model_dir)
    (art / "manifest.json").write_text(json.dumps(seal(m)))


STALE = {"kiln version": "compiled with kiln 0.0.1", "torch version": "compiled with torch 1.0",
         "format": "format 99", "old format": "format 1, this kiln reads format 2",
         "options": "config hash differs", "missing wrapper": "wrapper.py is missing",
         "bad IR": "serving.kir does not parse", "bad wrapper": "wrapper.py does not load",
         "edited wrapper": "wrapper.py changed since compilation",
         "edited IR dump": "ir/001_.* changed since compilation",
         "edited manifest": "manifest.json was edited after kiln wrote it",
         "bad manifest": "not valid JSON", "no manifest": "no manifest.json",
         "model config": "config hash differs", "weights": "changed since compilation",
         "model gone": "is gone"}


@pytest.mark.parametrize("kind", sorted(STALE))
def test_stale_artifact_is_one_clear_error(kind, tiny_artifact, tiny_dir, tmp_path, capsys):
    d, _ = tiny_dir
    model_dir = tmp_path / "model"
    shutil.copytree(d, model_dir)
    art = tmp_path / "tiny.kiln"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())   # point the copy at the model copy
    m["model"]["dir"] = str(model_dir)
    m["model"]["spec"] = str(model_dir)
    (art / "manifest.json").write_text(json.dumps(seal(m)))
    load_artifact(art)   # the copy itself is fine (copied files keep content: hashes match)
    _break(kind, art, model_dir)
    with pytest.raises(StaleArtifact, match=STALE[kind]) as e:
        load_artifact(art)
    assert "recompile with: kiln compile" in str(e.value) and str(art) in str(e.value)
    if kind not in ("bad manifest", "no manifest", "options"):
        assert f"kiln compile {model_dir} -t cpu --block-size 8 -o {art}" in str(e.value)
    # The CLI prints that one message and exits 2, before any serving starts.
    assert main(["serve", str(art), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recompile with: kiln compile" in err[0]


def test_aot_on_cpu_is_one_clear_error(tiny_dir, tmp_path, capsys):
    """--aot ships GPU kernel binaries: for -t cpu the CLI says so, and how to get them,
    before loading the model. (cuda --aot artifacts: tests/gpu/test_aot_launcher_gpu.py.)"""
    d, _ = tiny_dir
    out = tmp_path / "tiny.kiln"
    assert main(["compile", str(d), "-t", "cpu", "--aot", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--aot" in err[0] and "-t cuda or -t hip" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())
