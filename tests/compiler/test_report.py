"""`kiln report` and `kiln dump --format html` without a browser: what the page holds, read
back from the JSON it carries (tests/serving/test_report_browser.py opens SmolLM2's in
Chromium). A small graph compiled for cuda (the kernels are generated, not run) gives a
KILN_DUMP_DIR tree with a rule rewrite and a generated kernel in about a second."""
from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import zlib

import pytest

import kiln
from kiln.cli import main
from kiln.ir import parse
from kiln.passes.rules import RULES_DIR

# RMSNorm as models write it, then two elementwise ops that schedule makes a kernel of.
GRAPH = """func @forward(%x: f32[s0, 64], weight %w: f32[64]) -> f32[s0, 64]
    where s0 in [1, 64] {
  %0 = aten.pow(%x, 2) : f32[s0, 64]
  %1 = aten.mean(%0, dim=[-1], keepdim=true) : f32[s0, 1]
  %2 = aten.add(%1, 1e-06) : f32[s0, 1]
  %3 = aten.rsqrt(%2) : f32[s0, 1]
  %4 = aten.mul(%x, %3) : f32[s0, 64]
  %5 = aten.mul(%w, %4) : f32[s0, 64]
  %6 = aten.cos(%5) : f32[s0, 64]
  %7 = aten.sin(%6) : f32[s0, 64]
  return %7
}
"""


def page_data(path) -> dict:
    html = path.read_text()
    m = re.search(r'<script type="application/json" id="kiln-data">(.*?)</script>', html, re.S)
    return json.loads(m[1])


def inflate(data: dict, blob: int) -> str:
    return zlib.decompress(base64.b64decode(data["blobs"][blob])).decode()


def pass_named(graph: dict, name: str) -> dict:
    return next(p for p in graph["passes"] if p["name"] == name)


@pytest.fixture
def dump_dir(tmp_path, monkeypatch):
    """A KILN_DUMP_DIR tree of GRAPH compiled for cuda."""
    monkeypatch.setenv("KILN_DUMP_DIR", str(tmp_path / "dump"))
    kiln.compile(parse(GRAPH), target="cuda")
    monkeypatch.delenv("KILN_DUMP_DIR")
    return tmp_path / "dump"


def test_report_of_a_dump_dir(dump_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(dump_dir), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    html = out.read_text()
    # self-contained: nothing to fetch (the one URL is the SVG namespace the page draws in)
    assert not re.search(r"<script[^>]* src=|<link[^>]*stylesheet|url\((?!#)|@import", html)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}
    data = page_data(out)
    (graph,) = data["graphs"]
    assert graph["name"].startswith("forward_") and graph["target"] == "cuda"
    assert [p["name"] for p in graph["passes"]][:2] == ["input", "canonicalize"]
    assert inflate(data, graph["passes"][0]["text"]) == GRAPH

    norm = pass_named(graph, "fuse.norm")
    assert norm["stats"]["rewrites"] == 1 and norm["changed"]
    rules = {r["name"]: r for r in norm["rules"]}
    assert rules["rms_norm"]["rewrites"] == 1 and rules["fused_add_rms_norm"]["rewrites"] == 0
    assert "matched nothing" in rules["fused_add_rms_norm"]["why_not"]
    # the rule's file and line: where `rule rms_norm` is written
    line = RULES_DIR.joinpath("norm.kiln").read_text().splitlines()[rules["rms_norm"]["line"] - 1]
    assert rules["rms_norm"]["file"] == "norm.kiln" and line.startswith("rule rms_norm ")
    assert "norm.kiln" in data["rules"]
    # the change: six ATen lines out, one kiln.rms_norm in, each attributed to the rule
    before = inflate(data, pass_named(graph, "quantize")["text"]).splitlines()
    after = inflate(data, norm["text"]).splitlines()
    added = {int(k): v for k, v in norm["added_by"].items()}
    removed = {int(k): v for k, v in norm["removed_by"].items()}
    assert [after[k].split(" = ")[1].split("(")[0] for k in added] == ["kiln.rms_norm"]
    assert set(added.values()) == {"rms_norm"} and set(removed.values()) == {"rms_norm"}
    assert sorted(before[k].split(" = ")[1].split("(")[0] for k in removed) == sorted(
        ["aten.pow", "aten.mean", "aten.add", "aten.rsqrt", "aten.mul", "aten.mul"])
    assert sum(b1 - b0 for _, _, _, b0, b1 in norm["diff"]) == 1
    # passes that apply no rule file have no rule table; unchanged passes no diff
    assert "rules" not in pass_named(graph, "canonicalize")
    assert pass_named(graph, "reinplace")["diff"] == []

    (kernel,) = graph["kernels"]
    final = inflate(data, graph["passes"][-1]["text"]).splitlines()
    assert kernel["triton"] and f'callee="{kernel["name"]}"' in final[kernel["callers"][0]]
    wrapper = inflate(data, graph["wrapper"]).splitlines()
    code = "\n".join(line for a, b in kernel["code"] for line in wrapper[a - 1:b])
    assert "@triton.jit" in code and f"def {kernel['name']}_kernel(" in code
    assert graph["implementations"]["kiln.rms_norm"]["fn"] == "kiln.backends.triton.norm:rms_norm"
    runs = {r["op"]: r for r in graph["launches"]}
    assert runs[kernel["name"]]["count"] == 1 and runs["kiln.rms_norm"]["count"] == 1

    # a picture per distinct IR, laid out by dot: a node per IR line of a node
    assert norm["picture"] is not None and norm["picture_note"] is None
    layout = json.loads(inflate(data, norm["picture"]))
    names = {n[0]: n for n in layout["nodes"]}
    (rms_norm_line,) = added
    label, kind = names[f"L{rms_norm_line + 1}"][1:3]
    assert label.startswith("kiln.rms_norm") and kind == "fused"
    assert layout["edges"] and data["notes"] == []


def test_a_pass_that_did_not_apply_its_rules_says_so(tmp_path, monkeypatch):
    """fuse.prologue applies rules/prologue.kiln on Triton targets only: on the CPU it
    leaves a linear alone that its rules, applied regardless, would rewrite."""
    linear = """func @forward(%x: f32[s0, 64], weight %w: f32[32, 64]) -> f32[s0, 32]
    where s0 in [1, 64] {
  %0 = aten.permute(%w, dims=[1, 0]) : f32[64, 32]
  %1 = aten.mm(%x, %0) : f32[s0, 32]
  return %1
}
"""
    monkeypatch.setenv("KILN_DUMP_DIR", str(tmp_path / "dump"))
    kiln.compile(parse(linear), target="cpu")
    monkeypatch.delenv("KILN_DUMP_DIR")
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "dump"), "-o", str(out)]) == 0
    prologue = pass_named(page_data(out)["graphs"][0], "fuse.prologue")
    assert not prologue["changed"] and "rules" not in prologue
    assert prologue["rules_note"].startswith("This pass changed nothing: it applies its rules "
                                             "(rules/prologue.kiln) only under a condition")


def test_report_without_dot_says_so(dump_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no dot on it
    out = tmp_path / "report.html"
    assert main(["report", str(dump_dir), "-o", str(out)]) == 0
    data = page_data(out)
    (note,) = data["notes"]
    assert "dot is not installed" in note and "apt-get install graphviz" in note
    assert all(p["picture"] is None for p in data["graphs"][0]["passes"])


def test_report_of_an_artifact_and_a_profile_beside_it(dump_dir, tmp_path):
    """An artifact's layout (manifest.json, ir/, wrapper.py, passes.txt) and, beside it, a
    step profile (bench/step_profile.py) and a `kiln bench serve --json` report; other
    JSON there is not a profile."""
    (graph_dir,) = [d for d in dump_dir.iterdir() if d.is_dir()]
    art = tmp_path / "art.kiln"
    (art / "ir").mkdir(parents=True)
    for f in graph_dir.glob("*.kir"):
        shutil.copy(f, art / "ir" / f.name)
    shutil.copy(graph_dir / "wrapper.py", art)
    shutil.copy(graph_dir / "passes.txt", art)
    (art / "manifest.json").write_text(json.dumps({"target": "cuda", "model": {"spec": "tiny"}}))
    (schedule,) = (art / "ir").glob("*_schedule.kir")   # numbered by the pipeline's order
    callee = re.search(r'callee="(\w+)"', schedule.read_text())[1]
    (art / "steps.json").write_text(json.dumps({"device": "NVIDIA H200", "runs": {"decode_1": {
        "runner": {"steps": 20}, "phases_us": {"forward": 800.0},
        "kernels": [{"name": f"{callee}_kernel", "calls": 40, "self_us": 100.0},
                    {"name": "_rms_norm_kernel", "calls": 20, "self_us": 60.0}]}}}))
    (art / "serve.json").write_text(json.dumps({"command": "kiln bench serve", "step_profile": {
        "steps": 10, "phase_s": {"forward": 4e-4}, "step_s": 7e-4, "device_s": None,
        "tokens_per_step": 1.0, "sequences_per_step": 1.0}}))
    out = tmp_path / "report.html"
    assert main(["report", str(art), "-o", str(out)]) == 0
    data = page_data(out)
    assert data["details"]["target"] == "cuda" and data["graphs"][0]["name"] == "serving"
    profiles = {p["kind"]: p for p in data["profiles"]}   # manifest.json is not one
    assert len(data["profiles"]) == 2
    steps, serve = profiles["steps"], profiles["serve"]
    assert steps["file"].endswith("steps.json") and serve["file"].endswith("serve.json")
    (run,) = steps["runs"]
    generated = run["kernels"][0]
    assert generated["calls_per_step"] == 2 and generated["us_per_call"] == 2.5
    assert generated["us_per_step"] == 5
    assert serve["phase_us"]["forward"] == pytest.approx(400)
    assert serve["step_us"] == pytest.approx(700)
    # the library kernel of kiln.rms_norm is found in the module that runs it
    assert "_rms_norm_kernel" in data["graphs"][0]["implementations"]["kiln.rms_norm"]["kernels"]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "bad profile", "no interpreter",
                                  "bad IR"])
def test_report_errors_are_one_clear_message(case, dump_dir, tmp_path, capsys, monkeypatch):
    argv = {"missing": [str(tmp_path / "nowhere")],
            "file": [str(tmp_path / "note.txt")],
            "empty": [str(tmp_path / "empty")],
            "bad profile": [str(dump_dir), "--profile", str(tmp_path / "note.txt")],
            # compiling a model runs it; Triton kernels on the CPU need the interpreter
            "no interpreter": ["smollm2", "-t", "cuda"],
            "bad IR": [str(dump_dir)]}[case]
    (tmp_path / "note.txt").write_text("not a dump")
    if case == "bad IR":
        (snapshot,) = dump_dir.glob("*/*_fuse.norm.kir")
        snapshot.write_text(snapshot.read_text() + "  %9 = garbage(\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "report.html"
    assert main(["report", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln report: ") and err.count("\n") == 1, err
    assert {"missing": "no such file or directory", "file": "is a file",
            "empty": "holds no kiln dump", "bad profile": "not a readable profile",
            "no interpreter": "set TRITON_INTERPRET=1",
            "bad IR": "the IR after fuse.norm does not parse"}[case] in err
    assert argv[-1] in err and not out.exists()


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory):
    """kiln dump's capture of a tiny Llama (prefill and decode graphs), once for the module."""
    import torch

    from kiln.cli import _capture
    from models import tiny_llama_dir
    model = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    torch._dynamo.reset()
    args = argparse.Namespace(model=str(model), target="cpu", disable=None, prompt="Hello")
    return model, _capture(args)


def test_report_of_a_model_and_dump_format_html(tiny_capture, tmp_path, monkeypatch, capsys):
    model, compiled = tiny_capture
    monkeypatch.setattr("kiln.cli._capture", lambda args: compiled)
    out = tmp_path / "report.html"
    assert main(["report", str(model), "-o", str(out)]) == 0
    data = page_data(out)
    assert [g["name"] for g in data["graphs"]] == ["graph_0", "graph_1"]
    assert data["details"]["model"] == str(model) and data["fallbacks"] == []
    attention = pass_named(data["graphs"][0], "fuse.attention")
    assert {r["name"]: r["rewrites"] for r in attention["rules"]}["sdpa"] == 2   # two layers

    capsys.readouterr()
    assert main(["dump", str(model), "--format", "html", "--graph", "decode",
                 "--after", "fuse.norm"]) == 0
    page = capsys.readouterr().out
    (out := tmp_path / "decode.html").write_text(page)
    one = page_data(out)
    assert [g["name"] for g in one["graphs"]] == ["decode"]
    names = [p["name"] for p in one["graphs"][0]["passes"]]
    assert one["start"] == f"g0/p{names.index('fuse.norm')}"
    assert inflate(one, one["graphs"][0]["passes"][-1]["text"]) == compiled[-1].snapshots[-1][1]
