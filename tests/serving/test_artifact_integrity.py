"""Artifact integrity and trust: every file hashed, the manifest sealed, paths contained,
weight bindings checked, and nothing of an artifact executed before all of that passed.
An artifact kiln did not build on this machine loads only with trust (--trust-artifact).

The attacks are made the way an attacker could: editing files, editing the manifest and
recomputing its plain sha256 (anyone can), never with this machine's host key."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat

import pytest

from kiln.artifact import (StaleArtifact, UntrustedArtifact, canonical_manifest, host_id,
                           host_key, host_key_path, load_artifact, seal)
from kiln.cli import main


@pytest.fixture
def art(tiny_artifact, tmp_path):
    """A private copy of the tiny artifact (copies keep content: its hashes still match)."""
    out = tmp_path / "tiny.kiln"
    shutil.copytree(tiny_artifact, out)
    return out


def manifest(art) -> dict:
    return json.loads((art / "manifest.json").read_text())


def write(art, m) -> None:
    (art / "manifest.json").write_text(json.dumps(m, indent=2))


def forge(m: dict) -> dict:
    """What anyone can do: recompute the manifest's plain sha256 (not the signature)."""
    m["manifest_sha256"] = hashlib.sha256(canonical_manifest(m)).hexdigest()
    return m


def rehash(art, m, rel) -> None:
    data = (art / rel).read_bytes()
    m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def refused(art, match, trust=False, cls=StaleArtifact):
    with pytest.raises(cls, match=match) as e:
        load_artifact(art, trust=trust)
    msg = str(e.value)
    assert str(art) in msg and ("recompile with: kiln compile" in msg), msg
    return msg


def test_manifest_records_every_file_and_is_sealed(tiny_artifact):
    m = manifest(tiny_artifact)
    on_disk = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*")
               if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    assert {"wrapper.py", "serving.kir", "passes.txt", "extra_weights.safetensors"} <= on_disk
    assert any(f.startswith("ir/") for f in on_disk)
    for rel, rec in m["files"].items():
        data = (tiny_artifact / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert m["manifest_sha256"] == hashlib.sha256(canonical_manifest(m)).hexdigest()
    assert m["build_host"] == host_id(host_key())
    key_file = host_key_path()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_tampered_wrapper_never_runs(art, tmp_path, capsys):
    """A line appended to wrapper.py that would create a file: refused, and the file never
    appears, whether the manifest is left alone, forged, or the artifact trusted."""
    marker = tmp_path / "pwned"
    (art / "wrapper.py").write_text((art / "wrapper.py").read_text()
                                    + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    refused(art, "wrapper.py changed since compilation")
    refused(art, "wrapper.py changed since compilation", trust=True)
    assert main(["serve", str(art), "--trust-artifact", "--port", "1"]) == 2
    assert "wrapper.py changed since compilation" in capsys.readouterr().err
    m = manifest(art)   # the attacker also updates the wrapper's hash and the plain seal
    rehash(art, m, "wrapper.py")
    write(art, m)
    refused(art, "manifest.json was edited after kiln wrote it")
    write(art, forge(m))
    msg = refused(art, "kiln did not build it here", cls=UntrustedArtifact)
    assert "--trust-artifact" in msg and "wrapper.py is Python" in msg
    assert main(["generate", str(art), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-artifact" in err[0]
    assert not marker.exists()


def _same_shape_pair(m, art):
    from kiln.ir import parse
    graph = parse((art / "serving.kir").read_text())
    by_shape = {}
    for v in graph.inputs:
        if v.name in m["weights"] and m["weights"][v.name]["file"] != "extra_weights.safetensors":
            by_shape.setdefault(str(v.type), []).append(v.name)
    return next(names[:2] for names in by_shape.values() if len(names) >= 2)


def test_swapped_weight_bindings_are_refused(art):
    m = manifest(art)
    a, b = _same_shape_pair(m, art)     # e.g. the q projections of layers 0 and 1
    m["weights"][a], m["weights"][b] = m["weights"][b], m["weights"][a]
    write(art, m)
    refused(art, "manifest.json was edited after kiln wrote it")
    refused(art, "manifest.json was edited after kiln wrote it", trust=True)
    write(art, forge(m))
    refused(art, "kiln did not build it here", cls=UntrustedArtifact)


def test_binding_of_another_shape_is_refused_even_when_trusted(art):
    m = manifest(art)
    m["weights"]["lm_head.weight"] = dict(m["weights"]["model.norm.weight"])
    write(art, forge(m))
    refused(art, r"binds weight 'lm_head.weight' to model.safetensors:model.norm.weight of "
                 r"shape \[64\], and serving.kir declares \[320, 64\]", trust=True)


@pytest.mark.parametrize("where", ["binding", "model file", "artifact file", "symlink"])
def test_paths_outside_the_artifact_and_model_are_refused(art, where):
    m = manifest(art)
    evil = "../../../../../../../../etc/passwd"
    if where == "binding":
        m["weights"]["lm_head.weight"] = {"file": evil, "key": "lm_head.weight"}
        match = "binds weight 'lm_head.weight' to '../.*etc/passwd'.*refusing to read it"
    elif where == "model file":
        data = open("/etc/passwd", "rb").read()
        m["model"]["files"][evil] = {"size": len(data), "mtime_ns": os.stat("/etc/passwd").st_mtime_ns,
                                     "sha256": hashlib.sha256(data).hexdigest()}
        match = "resolves to /etc/passwd, outside .*refusing to read it"
    elif where == "artifact file":
        m["files"]["ir/" + evil] = dict(m["files"]["passes.txt"])
        match = "resolves to /etc/passwd, outside .*refusing to read it"
    else:   # a file of the artifact replaced by a symlink that leaves it
        (art / "passes.txt").unlink()
        (art / "passes.txt").symlink_to("/etc/passwd")
        match = "'passes.txt', which resolves to /etc/passwd, outside"
    write(art, m)
    if where != "symlink":
        refused(art, "manifest.json was edited after kiln wrote it")
        write(art, forge(m))
    refused(art, match, trust=True)


def test_truncated_extra_weights_is_one_clear_error(art, capsys):
    f = art / "extra_weights.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    refused(art, "extra_weights.safetensors changed since compilation .*truncated or corrupt")
    assert main(["serve", str(art), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "extra_weights.safetensors" in err[0] and "SafetensorError" not in err[0]
    # Recorded as it is now (as if written so): the header check names the file, no traceback.
    m = manifest(art)
    rehash(art, m, "extra_weights.safetensors")
    write(art, forge(m))
    refused(art, "extra_weights.safetensors is not a readable safetensors file", trust=True)


def test_weights_that_break_after_loading_are_a_stale_artifact(art):
    a = load_artifact(art)
    f = art / "extra_weights.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(StaleArtifact, match="is not a readable safetensors file.*recompile with"):
        a.load_weights()


def test_artifact_built_elsewhere_needs_trust(art, capsys):
    """Sealed with another machine's key: refused with the way out, loads with trust, and
    `kiln generate --trust-artifact` answers through it."""
    write(art, seal(manifest(art), key=secrets.token_bytes(32)))
    msg = refused(art, "built on another machine or by another user", cls=UntrustedArtifact)
    assert "--trust-artifact" in msg
    assert main(["serve", str(art), "--port", "1"]) == 2
    assert "--trust-artifact" in capsys.readouterr().err
    a = load_artifact(art, trust=True)
    assert a.manifest["build_host"] != host_id(host_key())
    assert main(["generate", str(art), "--trust-artifact", "--prompt", "hello world", "--no-chat",
                 "--max-tokens", "4", "--ignore-eos"]) == 0
    assert "4 tokens" in capsys.readouterr().err


def test_host_key_lives_in_the_kiln_cache_dir(tiny_artifact, tmp_path, monkeypatch):
    """Another cache dir is another machine: a new key (0600, made once) and the artifact
    built under the default one needs trust there."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    assert host_key() is None
    key = host_key(create=True)
    assert host_key(create=True) == key and len(key) == 32
    assert stat.S_IMODE((tmp_path / "cache" / "host.key").stat().st_mode) == 0o600
    with pytest.raises(UntrustedArtifact, match=f"this is {host_id(key)}"):
        load_artifact(tiny_artifact)
    load_artifact(tiny_artifact, trust=True)
