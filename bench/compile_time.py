"""Cold and warm start-up, each in fresh processes: time to the first token through
`torch.compile(backend="kiln")`, `kiln compile` of an artifact, and `kiln serve ARTIFACT`
until /health answers (issue #16).

    python bench/compile_time.py --model smollm2 --target cpu --out bench/results/compile_time_cpu.json
    python bench/compile_time.py --model smollm2-shape,llama-3.2-1b --target cuda --dtype bfloat16 \\
        --out bench/results/compile_time_h200.json

"Cold" runs against an empty compile cache (a fresh KILN_CACHE_DIR whose models/ links to
the real one, so a GGUF is not converted again, and Triton's kernel cache inside it), "warm"
is the next process over the cache the cold one filled. Times are wall seconds from the
process's launch, so they include Python's imports and loading the model; each row also
keeps the child's own split (imports, load, first call) and kiln's phase tree
(kiln.timings()). A model is `smollm2`, a .gguf file, an HF directory, or a shape of
bench/decode.py (smollm2-shape, llama-3.2-1b, llama-3-8b), written once with random weights
by bench/make_shape_model.py into --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
# Nothing heavy at the top (bench/decode.py imports torch): the child times its imports.

PROMPT = "What is the capital of France?"


# -- the child: one process, one first token through torch.compile ----------------------------------
def first_token(args, started: float) -> None:
    """Runs in a fresh process: load, torch.compile, one greedy token; prints one JSON line
    with wall-clock marks (time.time(), comparable with the parent's launch time)."""
    marks = {"start": started}
    import torch

    import kiln
    from kiln.frontends import hf
    from kiln.generate import chat_input_ids, greedy
    marks["imported"] = time.time()
    model, tok = hf.load(args.model, dtype=getattr(torch, args.dtype))
    device = "cuda" if args.target in ("cuda", "hip") else "cpu"
    model = model.to(device)
    if args.model in ("smollm2",) or str(args.model).endswith(".gguf"):
        ids = chat_input_ids(tok, PROMPT).to(device)
    else:   # shape models: a word-level tokenizer of random weights; any 32 ids
        ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    marks["loaded"] = time.time()
    fn = torch.compile(model, backend="kiln", options={"target": args.target})
    gen = greedy(fn, model, ids, 1)
    marks["first_token"] = time.time()
    print(json.dumps({"marks": marks, "prefill_s": gen.prefill_seconds, "token": gen.tokens[0],
                      "cache": kiln.stats()["compile_cache"], "timings": kiln.timings()}))


# -- the parent ------------------------------------------------------------------------------------
def cold_cache(work: Path, real_root: Path) -> Path:
    """An empty kiln cache root whose models/ is the real one (converted GGUFs)."""
    root = Path(tempfile.mkdtemp(prefix="kiln-cold-", dir=work))
    (real_root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(real_root / "models", target_is_directory=True)
    return root


def child_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(KILN_CACHE_DIR=str(root), KILN_CACHE="1",
               TRITON_CACHE_DIR=str(root / "compile" / "triton"), PYTHONUNBUFFERED="1")
    env.pop("KILN_DUMP_DIR", None)
    return env


def run_first_token(spec: str, args, root: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--model", spec,
           "--target", args.target, "--dtype", args.dtype]
    t0 = time.time()
    proc = subprocess.run(cmd, env=child_env(root), capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    m = out["marks"]
    return {"seconds": round(m["first_token"] - t0, 3),
            "split": {"python_start": round(m["start"] - t0, 3),
                      "imports": round(m["imported"] - m["start"], 3),
                      "load_model": round(m["loaded"] - m["imported"], 3),
                      "first_call": round(m["first_token"] - m["loaded"], 3)},
            "cache": out["cache"], "hit": out["cache"]["hit"] > 0, "timings": out["timings"]}


def run_kiln_compile(spec: str, args, root: Path, artifact: Path) -> dict:
    cmd = [sys.executable, "-m", "kiln.cli", "compile", spec, "-t", args.target, "--dtype",
           args.dtype, "-o", str(artifact), "--timings"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=child_env(root), capture_output=True, text=True,
                          timeout=args.timeout)
    seconds = time.time() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    steps = re.search(r"kiln: wrote \S+ \((.*?)\); serve", proc.stdout)
    tree = proc.stderr[proc.stderr.find("kiln timings"):]
    return {"seconds": round(seconds, 3), "steps": steps.group(1) if steps else None,
            "hit": bool(re.search(r"compile cache .*: [1-9]\d* hit", tree)), "timings": tree}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(artifact: Path, args, root: Path) -> dict:
    """`kiln serve ARTIFACT` from launch until /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port", str(port),
           "--log-level", "warning", "--timings", *args.serve_args.split()]
    log = tempfile.TemporaryFile(mode="w+")
    t0 = time.time()
    server = subprocess.Popen(cmd, env=child_env(root), stdout=log, stderr=subprocess.STDOUT)
    ready = None
    try:
        while time.time() - t0 < args.timeout and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        ready = time.time() - t0
                        break
            except OSError:
                time.sleep(0.1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    log.seek(0)
    text = log.read()
    if ready is None:
        return {"error": text[-3000:]}
    steps = re.search(r"kiln: artifact \S+ \((.*?)\)\n", text)
    return {"seconds": round(ready, 3), "steps": steps.group(1) if steps else None,
            "timings": text[text.find("kiln timings"):] if "kiln timings" in text else None}


def model_spec(name: str, args, work: Path) -> str:
    """A shape name becomes a random-weight HF directory (written once); others stay."""
    from decode import SHAPES
    if name not in SHAPES:
        return name
    folder = work / f"{name}-{args.dtype}"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, str(BENCH / "make_shape_model.py"), name, "-o", str(folder),
                        "--dtype", args.dtype], check=True)
    return str(folder)


def bench_model(name: str, args, work: Path, real_root: Path) -> dict:
    spec = model_spec(name, args, work)
    row = {"model": name, "spec": spec}
    measures = args.measure.split(",")
    if "first-token" in measures:
        root = cold_cache(work, real_root)
        row["first_token"] = {"cold": run_first_token(spec, args, root),
                              "warm": [run_first_token(spec, args, root)
                                       for _ in range(args.repeats)]}
        shutil.rmtree(root, ignore_errors=True)
    if "compile" in measures or "serve" in measures:
        root = cold_cache(work, real_root)
        artifact = root / "artifact.kiln"
        row["kiln_compile"] = {"cold": run_kiln_compile(spec, args, root, artifact),
                               "warm": [run_kiln_compile(spec, args, root, artifact)
                                        for _ in range(args.repeats)]}
        if "serve" in measures and artifact.is_dir():
            # The first serve compiles the kernels (Triton's JIT; kiln compile launches
            # none), the next ones find them in the cache.
            row["serve_ready"] = {"cold": run_serve(artifact, args, root),
                                  "warm": [run_serve(artifact, args, root)
                                           for _ in range(args.repeats)]}
        shutil.rmtree(root, ignore_errors=True)
    return row


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    return "FAILED" if "error" in result else f"{result['seconds']:.2f}"


def print_table(rows: list[dict], args) -> None:
    from provenance import code_version
    print(f"\ntarget={args.target} dtype={args.dtype} commit={code_version()} "
          f"({len(rows)} models; seconds from process launch, warm = best of {args.repeats} "
          f"that hit the cache)")
    print(f"{'model':16s} {'measure':32s} {'cold s':>8s} {'warm s':>8s}")
    labels = {"first_token": "torch.compile first token", "kiln_compile": "kiln compile (process)",
              "serve_ready": "kiln serve ARTIFACT ready"}
    for row in rows:
        for key, label in labels.items():
            if key not in row:
                continue
            runs = row[key]["warm"]
            # A warm run whose compile missed the cache (kiln's sources changed between the
            # runs: an edited checkout) is not warm; serving never compiles.
            warm = [w for w in runs if "error" not in w and w.get("hit", True)]
            best = min(warm, key=lambda w: w["seconds"]) if warm else (runs or [None])[0]
            note = "" if len(warm) == len(runs) else f"  ({len(runs) - len(warm)} of {len(runs)} warm runs missed or failed)"
            print(f"{row['model']:16s} {label:32s} {_cell(row[key]['cold']):>8s} "
                  f"{_cell(best) if warm else 'no hit':>8s}{note}")
    for row in rows:
        for key in labels:
            for which in ("cold", "warm"):
                runs = row.get(key, {}).get(which)
                for r in ([runs] if isinstance(runs, dict) else runs or []):
                    if "error" in r:
                        print(f"\n{row['model']} {key} {which} FAILED:\n{r['error']}")


def main() -> int:
    started = time.time()
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        ap = argparse.ArgumentParser()
        ap.add_argument("child")
        ap.add_argument("--model", required=True)
        ap.add_argument("--target", required=True)
        ap.add_argument("--dtype", required=True)
        first_token(ap.parse_args(), started)
        return 0
    from decode import SHAPES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="comma-separated: smollm2, a .gguf file, "
                    f"an HF directory, or a shape ({', '.join(SHAPES)})")
    ap.add_argument("--target", default="cpu", choices=["cpu", "cuda", "hip"])
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on a GPU")
    ap.add_argument("--measure", default="first-token,compile,serve",
                    help="comma-separated: first-token, compile, serve")
    ap.add_argument("--repeats", type=int, default=1, help="warm runs of each measure")
    ap.add_argument("--serve-args", default="", help="extra kiln serve flags, e.g. '--max-num-seqs 64'")
    ap.add_argument("--work", help="shape models and scratch caches (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per process")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.target == "cpu" else "bfloat16")
    from kiln.frontends.hf import cache_root
    real_root = cache_root()
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-compile-time-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.model.split(","):
        rows.append(bench_model(name, args, work, real_root))
        print_table(rows[-1:], args)
    from provenance import code_version
    result = {"command": "python " + " ".join(sys.argv), "commit": code_version(),
              "date": time.strftime("%Y-%m-%d"), "target": args.target, "dtype": args.dtype,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_after": os.getloadavg(),
              "gpu": _gpu_name(args.target), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if len(rows) > 1:
        print_table(rows, args)
    return 0


def _gpu_name(target: str) -> str | None:
    if target == "cpu":
        return None
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
