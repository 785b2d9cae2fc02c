"""The persistent compile cache (kiln.compile_cache) and the phase record (kiln.ir.timings):
a second compile, in a fresh process too, hits and computes the same; a changed option or
version misses; a truncated or edited entry is rebuilt with one warning; concurrent writers
leave one valid entry; a cache that cannot be written costs a warning, not a compile; the
serving capture is cached by the model's code, config and parameters; `kiln cache ls|clear`;
--timings, KILN_TIMINGS and KILN_DUMP_DIR's timings.txt."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kiln
from kiln import compile_cache
from kiln.artifact import seal
from kiln.cli import main
from kiln.compile_cache import CompileCacheWarning
from kiln.ir import parse, print_graph, timings
from models import tiny_llama

TESTS = Path(__file__).resolve().parents[1]

GRAPH = """func @f(%x: f32[s0, 8], %w: f32[8]) -> f32[s0, 8]
    where s0 in [1, 64] {
  %0 = aten.pow(%x, 2) : f32[s0, 8]
  %1 = aten.mean(%0, dim=[-1], keepdim=true) : f32[s0, 1]
  %2 = aten.add(%1, 1e-06) : f32[s0, 1]
  %3 = aten.rsqrt(%2) : f32[s0, 1]
  %4 = aten.mul(%x, %3) : f32[s0, 8]
  %5 = aten.mul(%4, %w) : f32[s0, 8]
  return %5
}
"""


def compile_text(text: str = GRAPH, **options):
    return kiln.compile(parse(text), **options)


def entry_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name != compile_cache.TRITON_SUBDIR)


def test_second_compile_hits_and_computes_the_same(compile_cache_dir):
    x, w = torch.randn(5, 8), torch.randn(8)
    first = compile_text()
    second = compile_text()
    assert (first.cached, second.cached) == (False, True)
    assert kiln.stats()["compile_cache"] | {"capture": None, "aot": None} == {
        "hit": 1, "miss": 1, "rebuilt": 0, "stored": 1, "unwritable": 0, "capture": None,
        "aot": None}
    assert second.source == first.source and second.stats == first.stats
    assert print_graph(second.graph) == print_graph(first.graph)
    assert "kiln.rms_norm" in print_graph(second.graph)
    torch.testing.assert_close(second(x, w)[0], first(x, w)[0])
    manifest = json.loads((entry_dirs(compile_cache_dir)[0] / "manifest.json").read_text())
    assert manifest["kind"] == "compile" and manifest["about"]["target"] == "cpu"
    assert "signature" in manifest and set(manifest["files"]) >= {"graph.kir", "wrapper.py"}


def test_what_the_graph_carries_beside_its_text_survives(compile_cache_dir):
    """capture.scalar_inputs moves an int output to the host (graph.meta["host_outputs"]):
    a cached compile computes it too."""
    text = """func @forward(%x: f32[4], %n: sym(s0)) -> (f32[4], sym(s0 + 1))
    where s0 in [0, 100] {
  %0 = aten.add(%x, %n) : f32[4]
  %1 = sym.add(%n, 1) : sym(s0 + 1)
  return %0, %1
}
"""
    first, second = (compile_text(text, target="cuda") for _ in range(2))
    assert second.cached and second.graph.meta["host_outputs"]["symbols"] == {"s0": "n"}
    x = torch.randn(4)
    out = second(x, 5)
    assert out[1] == 6 and torch.equal(out[0], first(x, 5)[0])


@pytest.mark.parametrize("change", ["option", "target", "torch version", "kiln source",
                                    "registered pass"])
def test_a_changed_option_or_version_misses(compile_cache_dir, monkeypatch, change):
    compile_text()
    if change == "option":
        compile_text(disable_passes="fuse.norm")
    elif change == "target":
        compile_text(target="cuda")
    elif change == "torch version":
        versions = compile_cache.versions
        monkeypatch.setattr(compile_cache, "versions", lambda: {**versions(), "torch": "9.9"})
        compile_text()
    elif change == "kiln source":
        monkeypatch.setattr(compile_cache, "source_hash", lambda: "edited")
        compile_text()
    else:
        from kiln.passes import PIPELINE, register_pass
        register_pass("user.noop", "a user's pass")(lambda g, ctx: 0)
        try:
            compile_text()
        finally:
            PIPELINE.pop()
    assert kiln.stats()["compile_cache"]["miss"] == 2
    assert len(entry_dirs(compile_cache_dir)) == 2


@pytest.mark.parametrize("damage", ["truncate wrapper", "edit graph", "drop manifest",
                                    "garble manifest", "forge seal"])
def test_a_damaged_entry_is_rebuilt_with_one_warning(compile_cache_dir, damage):
    x, w = torch.randn(3, 8), torch.randn(8)
    want = compile_text()(x, w)[0]
    (entry,) = entry_dirs(compile_cache_dir)
    if damage == "truncate wrapper":
        f = entry / "wrapper.py"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "edit graph":
        f = entry / "graph.kir"
        f.write_text(f.read_text().replace("1e-06", "0.5"))
    elif damage == "drop manifest":
        (entry / "manifest.json").unlink()
    elif damage == "garble manifest":
        (entry / "manifest.json").write_text("{not json")
    else:   # re-sealed without this machine's key: a consistent but foreign manifest
        m = json.loads((entry / "manifest.json").read_text())
        m["files"]["wrapper.py"] = {"size": 1, "sha256": "0" * 64}
        (entry / "manifest.json").write_text(json.dumps(seal(m, key=b"x" * 32)))
    with pytest.warns(CompileCacheWarning, match=f"entry {entry} is unusable .*compiling again") as got:
        again = compile_text()
    assert len([w for w in got if issubclass(w.category, CompileCacheWarning)]) == 1
    assert not again.cached
    torch.testing.assert_close(again(x, w)[0], want)
    assert kiln.stats()["compile_cache"]["rebuilt"] == 1
    assert compile_text().cached   # rebuilt and stored again


def test_an_unwritable_cache_warns_and_compiles(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("KILN_CACHE", "1")
    monkeypatch.setenv("KILN_CACHE_DIR", str(blocked))
    kiln.stats(reset=True)
    monkeypatch.setattr(compile_cache, "_warned", set())
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.warns(CompileCacheWarning, match=f"cannot write the compile cache in {blocked}.*"
                                                 f"KILN_CACHE_DIR"):
        cg = compile_text()
    torch.testing.assert_close(cg(x, w)[0], compile_text(cache=False)(x, w)[0])
    assert kiln.stats(reset=True)["compile_cache"]["unwritable"] == 1


def test_off_switch(compile_cache_dir, monkeypatch):
    compile_text(cache=False)
    monkeypatch.setenv("KILN_CACHE", "0")
    compile_text()
    assert not compile_cache_dir.exists()
    monkeypatch.setenv("KILN_CACHE", "yes")
    with pytest.raises(ValueError, match="KILN_CACHE must be 0"):
        compile_text()


def test_concurrent_writers_leave_one_valid_entry(compile_cache_dir):
    """Processes storing the same entry over and over while reading it back: every read is
    a whole entry, and one valid entry is left."""
    script = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("error")
        from kiln import compile_cache as c
        files = {"graph.kir": "x" * 200000, "wrapper.py": "y" * 100000}
        for _ in range(15):
            c.store("k" * 64, files, {"target": "cpu"})
            assert c.load("k" * 64) == files
        print(c.counts())
    """)
    env = {**os.environ, "KILN_CACHE_DIR": str(compile_cache_dir.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "'rebuilt': 0" in out
    assert [p.name for p in compile_cache_dir.iterdir()] == ["k" * 64]   # no temp leftovers
    assert compile_cache.load("k" * 64)["wrapper.py"] == "y" * 100000


WARM_RUN = textwrap.dedent("""
    import json, sys
    import torch
    import kiln
    sys.path.insert(0, sys.argv[1])
    from models import tiny_llama
    compiled = []
    fn = torch.compile(tiny_llama(), backend="kiln", options={"observer": compiled.append})
    with torch.no_grad():
        logits = fn(torch.load(sys.argv[2])).logits
    torch.save(logits, sys.argv[3])
    print(json.dumps({"cached": [c.cached for c in compiled],
                      "cache": kiln.stats()["compile_cache"]}))
""")


def test_a_fresh_process_hits_and_computes_the_same(compile_cache_dir, tmp_path):
    """torch.compile of a model here, then in a new process: the passes and codegen come
    from the cache there, the logits are the same, and KILN_TIMINGS=1 prints the tree."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    torch._dynamo.reset()
    compiled = []
    with torch.no_grad():
        want = torch.compile(model, backend="kiln",
                             options={"observer": compiled.append})(ids).logits
    assert [c.cached for c in compiled] == [False]
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "KILN_CACHE_DIR": str(compile_cache_dir.parent), "KILN_TIMINGS": "1"}
    run = subprocess.run([sys.executable, "-c", WARM_RUN, str(TESTS), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["cached"] == [True] and report["cache"]["hit"] == 1
    assert report["cache"]["aot"]["hit"] == 1   # AOTAutograd skipped too
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)
    tree = run.stderr[run.stderr.index("kiln timings"):]
    for phase in ("torch.compile frame", "dynamo", "aot cache lookup", "compile @forward",
                  "parse cached IR", "first call @forward", "compile cache"):
        assert phase in tree, tree


@pytest.mark.parametrize("name", ["llama", "mistral_sw"])
def test_a_cached_capture_skips_aot_autograd_and_computes_the_same(compile_cache_dir, name):
    """A StaticCache loop (prefill and decode graphs; the sliding window's Python int and
    the prefill's output that is an input) and a forward with transformers' default cache
    (lifted empty-tensor constants), captured again after a dynamo reset: AOTAutograd does
    not run, every call's logits are bit-identical."""
    from capture import run_steps
    from families import VOCAB, build
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 7))

    def run():
        torch._dynamo.reset()
        compiled = []
        fn = torch.compile(model, backend="kiln", options={"observer": compiled.append})
        with torch.no_grad():
            out = run_steps(fn, model, ids, 2) + [fn(ids).logits]
        return out, len(compiled)

    cold, graphs = run()
    assert kiln.stats()["compile_cache"]["aot"]["stored"] == graphs
    warm, _ = run()
    assert kiln.stats()["compile_cache"]["aot"]["hit"] == graphs
    for a, b in zip(warm, cold):
        assert torch.equal(a, b)


def test_the_serving_capture_is_cached_by_the_models_code_config_and_parameters(
        compile_cache_dir):
    from kiln import serving
    model = tiny_llama()
    first = serving.compile_serving(model, record=True)
    captures = serving.CAPTURES
    second = serving.compile_serving(model, record=True)
    assert serving.CAPTURES == captures, "the second compile captured again"
    assert kiln.stats()["compile_cache"]["capture"]["hit"] == 1 and second.cached
    assert second.source == first.source and second.snapshots == first.snapshots
    assert print_graph(second.graph) == print_graph(first.graph)
    identity = serving.capture_identity(model)
    model.model.layers = model.model.layers[:1]        # module surgery: not the same model
    assert serving.capture_identity(model) != identity
    model.lm_head.forward = lambda x: x                # code kiln cannot pin: not cached
    assert serving.capture_identity(model) is None


def test_kiln_cache_ls_and_clear(compile_cache_dir, capsys):
    compile_text()
    (compile_cache_dir / compile_cache.TRITON_SUBDIR / "k").mkdir(parents=True)
    (compile_cache_dir / compile_cache.TRITON_SUBDIR / "k" / "a.cubin").write_bytes(b"\0" * 10)
    (key,) = [p.name for p in entry_dirs(compile_cache_dir)]
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert key[:16] in out and "cpu" in out and "@f" in out and f"1 entries in {compile_cache_dir}" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert list(compile_cache_dir.iterdir()) == []
    main(["cache", "ls"])
    assert "0 entries" in capsys.readouterr().out


def test_timings_nest_and_add_up():
    timings.reset()
    with timings.phase("outer"):
        with timings.phase("inner"):
            pass
        stop = timings.start("open")
        with timings.phase("child of open"):
            pass
        stop()
    with timings.phase("outer"):
        timings.record("measured elsewhere", 1.5)
    rows = {path: (s, n) for path, s, n in timings.snapshot()}
    assert list(rows) == [("outer",), ("outer", "inner"), ("outer", "open"),
                          ("outer", "open", "child of open"), ("outer", "measured elsewhere")]
    assert rows[("outer",)][1] == 2 and rows[("outer", "measured elsewhere")] == (1.5, 1)
    assert "  inner" in timings.report()
    timings.reset()


def test_triton_jit_is_timed_per_kernel():
    """Triton's JIT hooks (called here as Triton calls them) open and close one phase per
    kernel compile, under the phase that launched it."""
    knobs = pytest.importorskip("triton").knobs
    from kiln.backends.triton.jit_times import time_jit
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    try:
        assert time_jit()

        class Info:
            name = "kiln.backends.triton.norm._rms_norm_kernel"
        timings.reset()
        with timings.phase("first call @forward"):
            assert knobs.runtime.jit_cache_hook(key="k", fn=Info()) is False
            knobs.runtime.jit_post_compile_hook(key="k", fn=Info())
        paths = [p for p, _, _ in timings.snapshot()]
        assert ("first call @forward", "triton jit _rms_norm_kernel") in paths
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before
        timings.reset()


def test_dump_dir_gets_timings_and_never_reads_the_cache(compile_cache_dir, tmp_path):
    compile_text()
    script = textwrap.dedent(f"""
        import kiln
        from kiln.ir import parse
        cg = kiln.compile(parse({GRAPH!r}))
        assert not cg.cached   # a dump shows every pass: never from the cache
    """)
    env = {**os.environ, "KILN_CACHE_DIR": str(compile_cache_dir.parent),
           "KILN_DUMP_DIR": str(tmp_path / "dump")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    text = (tmp_path / "dump" / "timings.txt").read_text()
    assert "compile @f" in text and "passes" in text and "fuse.norm" in text
    assert list((tmp_path / "dump").glob("f_*/0*_fuse.norm.kir"))
