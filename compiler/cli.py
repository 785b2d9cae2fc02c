"""The `kiln` command line."""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

# kiln.passes.quantize.QUANT_MODES, spelled here so that building the parser imports no
# torch (a test keeps the two equal)
CLI_QUANT_MODES = ("fp8", "int8", "int8_weight_only", "int8_weight_only_g32",
                   "int8_weight_only_g64", "int8_weight_only_g128", "int4_weight_only",
                   "int4_weight_only_g64", "int4_weight_only_g128")
# --quant's default, "auto", and "none": kiln.quant_choice.
QUANT_HELP = ("weights: auto (the default: on the cpu target int4 when every linear weight is "
              "exactly 4-bit already, as in a Q4 GGUF such as smollm2's, else float32), none "
              "(float32), or a mode: fp8 / int8 (weights and activations), int8_weight_only (per "
              "output channel), int8_weight_only_g32 (groups of 32; _g64, _g128), "
              "int4_weight_only (groups of 32; _g64, _g128)")


def _load(spec: str, dtype: str = "float32", attn: str = "sdpa"):
    import torch

    from kiln.frontends import hf
    return hf.load(spec, dtype=getattr(torch, dtype), attn_implementation=attn)


def _whole_number(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the flag in its error)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return v


def _serving_config(args):
    from .serving import ServingConfig
    return ServingConfig(
        max_model_len=getattr(args, "max_model_len", None),
        num_blocks=getattr(args, "num_blocks", None),
        kv_cache_gib=getattr(args, "kv_cache_gib", 1.0),
        max_num_seqs=getattr(args, "max_num_seqs", 256),
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", 512),
        max_waiting=getattr(args, "max_waiting", 256),
        enable_prefix_caching=not getattr(args, "no_prefix_caching", False),
        cudagraphs=not getattr(args, "no_cudagraphs", False),
        async_scheduling=False if getattr(args, "no_async_scheduling", False) else None,
        lazy_mixed_graphs=getattr(args, "lazy_mixed_graphs", False),
        background_graphs=getattr(args, "background_graphs", False),
        speculative=_speculative(args),
        batch_invariant=getattr(args, "batch_invariant", "verify"))


def _speculative(args):
    """--speculative METHOD:K as a SpeculativeConfig (None: off); a wrong spelling is a
    SpeculativeError (a ValueError: main prints it) before any model loads."""
    text = getattr(args, "speculative", None)
    if not text:
        return None
    from kiln.runtime.spec_decode import SpeculativeConfig
    return SpeculativeConfig.parse(text)


def _served(args):
    """The engine for MODEL|DIR: an artifact is loaded as is, a model compiled first."""
    from .artifact import Steps
    from .serving import build_served
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    _report_timings(args)
    with Steps() as steps:
        served = build_served(args.model, _serving_config(args), target=args.target,
                              dtype=args.dtype, block_size=getattr(args, "block_size", 16),
                              steps=steps, model_name=getattr(args, "served_model_name", None),
                              trust_artifact=getattr(args, "trust_artifact", False),
                              tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                              quant=getattr(args, "quant", None), on_choice=_say_choice)
    took = ", ".join(f"{k} {v:.1f} s" for k, v in steps.seconds.items())
    print(f"kiln: {served.source} ({took})", file=sys.stderr)
    if getattr(args, "timings", False) and args.command == "serve":   # a server runs until killed
        from .driver import kiln_timings
        print(kiln_timings(), end="", file=sys.stderr)
    return served


def _say_choice(choice) -> None:
    """The weights kiln compiles with, and why (kiln.quant_choice), on stderr."""
    print(f"kiln: {choice.describe()}", file=sys.stderr)


def _run_one(engine, prompt_ids, params, on_text=None):
    """Runs one request through the engine; returns (output, seconds to first token, total)."""
    t0 = time.perf_counter()
    rid = engine.add_request(prompt_ids, params)
    first, text, tokens, last = None, "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != rid:
                continue
            if first is None and out.token_ids:
                first = time.perf_counter() - t0
            tokens += out.token_ids
            text += out.text
            if on_text and out.text:
                on_text(out.text)
            last = out
    return text, tokens, last, first or 0.0, time.perf_counter() - t0


def _follow_as_launched_rank(args) -> bool:
    """Under torchrun, ranks > 0 only follow rank 0's steps (no server, no output)."""
    import os

    size = getattr(args, "tensor_parallel_size", 1)
    if size <= 1:
        return False
    from . import tensor_parallel as tp   # (imports torch: only where ranks are asked for)
    if not tp.launched() or int(os.environ["RANK"]) == 0:
        return False
    tp.check_size(size, "cuda" if args.target in ("cuda", "hip") else "cpu")
    tp.follower_main(int(os.environ["RANK"]), size,
                     (args.model, _serving_config(args), args.target, args.dtype,
                      getattr(args, "block_size", 16)))
    return True


def cmd_generate(args) -> int:
    if args.backend != "kiln":
        if getattr(args, "tensor_parallel_size", 1) > 1:
            print("kiln generate: --tensor-parallel-size runs on the kiln engine; drop "
                  f"--backend {args.backend}", file=sys.stderr)
            return 2
        if args.quant not in ("auto", "none"):
            print(f"kiln generate: --quant {args.quant} compiles for the kiln engine; --backend "
                  f"{args.backend} runs the model's own weights: drop one of the two",
                  file=sys.stderr)
            return 2
        return _generate_static(args)
    if _follow_as_launched_rank(args):
        return 0
    from kiln.runtime.sequence import SamplingParams

    from .generate import chat_input_ids
    served = _served(args)
    ids = chat_input_ids(served.tokenizer, args.prompt, chat=not args.no_chat)[0].tolist()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed, ignore_eos=args.ignore_eos)
    text, tokens, last, ttft, total = _run_one(served.engine, ids, params)
    print(text.strip())
    decode = len(tokens) - 1
    rate = decode / (total - ttft) if decode > 0 and total > ttft else 0.0
    spec = served.engine.spec
    drafted = (f" | {spec.config}: mean accepted length {spec.stats.mean_accepted_length:.2f}"
               if spec is not None else "")
    print(f"\n[kiln engine, {served.engine.runner.device}, weights {served.quant or 'float32'}] "
          f"prompt {len(ids)} tokens, first token {ttft:.2f} s | "
          f"{len(tokens)} tokens ({last.finish_reason if last else '-'}) | decode {rate:.1f} tokens/s"
          f"{drafted}", file=sys.stderr)
    return 0


def _generate_static(args) -> int:
    """The StaticCache loop of `kiln.generate` over an uncompiled / inductor / kiln
    torch.compile model: a baseline to compare the engine with."""
    import torch

    from .generate import chat_input_ids, compile_model, greedy
    from .generate import LOOP_METHODS
    speculative = _speculative(args)
    if speculative is not None and speculative.method not in LOOP_METHODS:
        print(f"kiln generate: --backend {args.backend} runs the StaticCache loop, which drafts "
              f"with {' or '.join(LOOP_METHODS)}; --speculative {speculative} drafts in the "
              f"engine: use --backend kiln", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, tok = _load(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    ids = chat_input_ids(tok, args.prompt, chat=not args.no_chat)
    backend = "kiln" if args.backend == "kiln-static" else args.backend
    options = {"target": args.target} if backend == "kiln" else None
    fn = compile_model(model, backend, options)
    draft = None
    if speculative is not None and speculative.method == "draft":
        draft = _loop_draft_model(speculative, tok, args, backend, options)
    torch.manual_seed(0)
    gen = greedy(fn, model, ids, args.max_tokens, eos_token_id=tok.eos_token_id,
                 speculative=speculative, draft=draft)
    text = tok.decode(gen.tokens, skip_special_tokens=True)
    print(text.strip())
    print(f"\n[{args.backend}, {args.target}] load {load_s:.1f} s | prompt {gen.prompt_tokens} tokens, "
          f"first call {gen.prefill_seconds:.2f} s | {len(gen.tokens)} tokens | "
          f"decode {gen.decode_tokens_per_second:.1f} tokens/s"
          + (f" | {speculative}: mean accepted length {gen.mean_accepted_length:.2f}"
             if speculative is not None else ""), file=sys.stderr)
    return 0


def _loop_draft_model(speculative, target_tokenizer, args, backend: str, options):
    """(compiled, model) of draft:PATH:K for the StaticCache loop: PATH loaded as a model
    (the loop runs HF models, not artifacts) and compiled with the target's backend."""
    from .artifact import is_artifact
    from .generate import compile_model
    from .serving import check_draft_tokenizer
    if is_artifact(Path(speculative.draft_model).expanduser()):
        raise ValueError(f"--speculative {speculative}: --backend {args.backend} runs the "
                         f"StaticCache loop over HF models, and {speculative.draft_model} is an "
                         f"artifact; draft with the model it was compiled from, or use --backend "
                         f"kiln")
    model, tok = _load(speculative.draft_model, args.dtype)
    check_draft_tokenizer(tok, target_tokenizer, speculative, args.model)
    return compile_model(model, backend, options), model


def _report_timings(args) -> None:
    """--timings: where the time goes (kiln.ir.timings), printed when the command exits."""
    if getattr(args, "timings", False):
        from .driver import report_timings_at_exit
        report_timings_at_exit(True)


def cmd_compile(args) -> int:
    from .artifact import Steps, compile_artifact
    _report_timings(args)
    with Steps() as steps:
        out = compile_artifact(args.model, args.target, args.output, block_size=args.block_size,
                               dtype=args.dtype, quant=args.quant,
                               disable_passes=args.disable.split(",") if args.disable else None,
                               aot=args.aot, steps=steps, on_choice=_say_choice)
    took = ", ".join(f"{k} {v:.1f} s" for k, v in steps.seconds.items())
    print(f"kiln: wrote {out} ({took}); serve it with: kiln serve {out}")
    return 0


def served_engine(args):
    """The engine process's factory (runtime.engine_process): the engine, and what the
    server needs to know about it."""
    served = _served(args)
    runner = served.engine.runner
    return served.engine, {"model_name": served.model_name, "num_blocks": runner.num_blocks,
                           "block_size": runner.block_size}


def cmd_serve(args) -> int:
    import os

    from .extras import require
    require("serve", "kiln serve")
    from kiln.runtime.server import ServerLimits, create_app, serve
    limits = ServerLimits(max_body_bytes=args.max_body_bytes,
                          max_prompt_chars=args.max_prompt_chars).validate()
    if _follow_as_launched_rank(args):
        return 0
    from .artifact import check_artifact, is_artifact
    if is_artifact(args.model):
        # The engine's process loads (and checks) the artifact; what needs no torch and no
        # IR parse is checked here first, so that a stale artifact is one error at once.
        check_artifact(args.model, trust=getattr(args, "trust_artifact", False))
    if args.engine_thread:
        from kiln.runtime.engine import AsyncEngine
        engine, info = served_engine(args)
        client = AsyncEngine(engine)
    else:
        from kiln.runtime.engine_process import EngineProcess
        client = EngineProcess(served_engine, args)
        info = client.info
    api_key = args.api_key or os.environ.get("KILN_API_KEY") or None
    app = create_app(client, info["model_name"], api_key=api_key, limits=limits, docs=args.docs)
    print(f"kiln: serving {info['model_name']!r} on http://{args.host}:{args.port}/v1 "
          f"(max {client.max_model_len} tokens per sequence, {info['num_blocks']} KV blocks of "
          f"{info['block_size']}; the engine in {'a thread' if args.engine_thread else 'its own process'})",
          file=sys.stderr)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_chat(args) -> int:
    from kiln.runtime.sequence import SamplingParams
    served = _served(args)
    tok = served.tokenizer
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("kiln chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        text = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) + args.max_tokens > served.engine.max_model_len:
            print("kiln chat: the conversation is longer than the model's context; /reset",
                  file=sys.stderr)
            history.pop()
            continue
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                seed=args.seed)
        sys.stdout.write("kiln> ")
        reply, tokens, last, ttft, total = _run_one(
            served.engine, ids, params, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        sys.stdout.write("\n")
        rate = (len(tokens) - 1) / (total - ttft) if len(tokens) > 1 and total > ttft else 0.0
        print(f"[{len(tokens)} tokens, {rate:.1f} tokens/s]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply})


def cmd_bench_serve(args) -> int:
    import json

    from .bench import BenchConfig, code_version, format_report, run
    cfg = BenchConfig(url=args.url, model=args.model, concurrency=args.concurrency,
                      num_requests=args.num_requests, seed=args.seed, input_len=args.input_len,
                      output_len=args.output_len, range_ratio=args.range_ratio,
                      api_key=args.api_key, shared_prefix_len=args.shared_prefix_len,
                      num_prefixes=args.num_prefixes, warmup=args.warmup, profile=args.profile)
    rep = run(cfg)
    rep["code_version"], rep["command"] = code_version(), "kiln " + " ".join(sys.argv[1:])
    print(format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    return 0 if rep["failed"] == 0 else 1


def _capture(args):
    """Compiles the model on a short prompt, recording the IR after every pass, for the
    prefill graph and (with one decode step) the decode graph."""
    import os

    import torch

    from kiln.backends.targets import get_target

    from .generate import chat_input_ids, greedy
    if get_target(args.target).triton_backend and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"-t {args.target} compiles by running the model on the CPU, where "
                         f"Triton kernels run only under Triton's interpreter: set "
                         f"TRITON_INTERPRET=1 (slow), or compile without running (kiln compile "
                         f"{args.model} -t {args.target} -o DIR) and read DIR (kiln report DIR)")
    model, tok = _load(args.model)
    compiled = []
    opts = {"target": args.target, "observer": compiled.append, "record": True}
    if args.disable:
        opts["disable_passes"] = args.disable
    fn = torch.compile(model, backend="kiln", options=opts)
    ids = chat_input_ids(tok, args.prompt)
    greedy(fn, model, ids, 2)
    return compiled


def _snapshot_index(cg, after: str | None) -> int:
    names = [name for name, _ in cg.snapshots]
    if after is None:
        return len(names) - 1
    if after not in names:
        raise SystemExit(f"kiln dump: pass {after!r} did not run; passes that ran: {', '.join(names)}")
    return names.index(after)


def _graph_text(compiled, which: str, after: str | None) -> str:
    cg = compiled[{"prefill": 0, "decode": -1}[which]]
    return cg.snapshots[_snapshot_index(cg, after)][1]


def _mlir_text(kir_text: str, args) -> str:
    from kiln.frontends.mlir import to_mlir
    from kiln.ir import parse
    return to_mlir(parse(kir_text), args.mlir_fused_ops or "custom", args.mlir_symbolic_shapes)


def _dump_draft(args) -> int:
    """`kiln dump --graph draft --speculative layerskip:K`: the layer-skip draft graph
    (passes/spec.py), as the serving pipeline compiles it."""
    from kiln.runtime.spec_decode import SpeculativeConfig

    from .serving import compile_layer_skip
    spec = SpeculativeConfig.parse(args.speculative or "")
    if spec.method == "draft":
        return _dump_draft_model(args, spec)
    if spec.method == "mtp":
        return _dump_mtp(args, spec)
    if spec.method != "layerskip":
        print(f"kiln dump: --speculative {spec} drafts without a graph of its own; only "
              f"layerskip:K, draft:PATH:K and mtp:K have a draft graph (the verify step runs the "
              f"serving graph: kiln compile {args.model} -o DIR writes it as DIR/serving.kir)",
              file=sys.stderr)
        return 2
    model, _ = _load(args.model)
    skipped = spec.skipped_layers(model.config.num_hidden_layers)
    cg = compile_layer_skip(model, skipped, args.target, record=True)
    print(f"kiln dump: the {spec} draft graph: decoder layers {skipped[0]}-{skipped[-1]} of "
          f"{model.config.num_hidden_layers} skipped", file=sys.stderr)
    sys.stdout.write(cg.snapshots[_snapshot_index(cg, args.after)][1])
    return 0


def _dump_draft_model(args, spec) -> int:
    """`kiln dump --graph draft --speculative draft:PATH:K`: the draft model's serving graph,
    as `kiln serve --speculative` compiles it (an artifact's, as it was compiled)."""
    from . import artifact as art
    from .serving import compile_serving
    path = Path(spec.draft_model).expanduser()
    if art.is_artifact(path):   # it keeps the IR after every pass: ir/NNN_<pass>.kir
        passes = {f.stem.partition("_")[2]: f for f in sorted((path / "ir").glob("*.kir"))}
        if args.after and args.after not in passes:
            print(f"kiln dump: pass {args.after!r} did not run in artifact {path}; passes that "
                  f"ran: {', '.join(passes)}", file=sys.stderr)
            return 2
        print(f"kiln dump: the {spec} draft graph: artifact {path}", file=sys.stderr)
        sys.stdout.write((passes[args.after] if args.after else path / art.FINAL_IR).read_text())
        return 0
    model, _ = _load(spec.draft_model)
    cg = compile_serving(model, args.target, record=True)
    print(f"kiln dump: the {spec} draft graph: the serving graph of {spec.draft_model}",
          file=sys.stderr)
    sys.stdout.write(cg.snapshots[_snapshot_index(cg, args.after)][1])
    return 0


def _dump_mtp(args, spec) -> int:
    """`kiln dump --graph draft --speculative mtp:K`: the model's MTP module as the serving
    graph it drafts with (kiln.mtp), as `kiln serve --speculative mtp:K` compiles it."""
    from kiln.frontends import mtp

    from .mtp import compile_mtp
    _, _, modules = mtp.load(args.model)   # (an MTPError is a ValueError: main prints it)
    cg = compile_mtp(modules[0], args.target, record=True)
    print(f"kiln dump: the {spec} draft graph: the MTP module of {args.model} (its decoder "
          f"layer a {type(modules[0].layer).__name__}), chained {spec.k} time(s) a step",
          file=sys.stderr)
    sys.stdout.write(cg.snapshots[_snapshot_index(cg, args.after)][1])
    return 0


def cmd_dump(args) -> int:
    from kiln.passes import pass_names
    if args.graph == "draft":
        return _dump_draft(args)
    if args.after and args.after not in pass_names() + ["input"]:
        print(f"kiln dump: unknown pass {args.after!r}; known: input, {', '.join(pass_names())}",
              file=sys.stderr)
        return 2
    if args.format == "mlir":
        from .extras import require
        require("mlir", "kiln dump --format mlir")   # before the capture, not after it
    elif args.mlir_fused_ops or args.mlir_symbolic_shapes:
        print("kiln dump: --mlir-fused-ops and --mlir-symbolic-shapes go with --format mlir",
              file=sys.stderr)
        return 2
    import kiln
    kiln.stats(reset=True)
    compiled = _capture(args)
    fallbacks = kiln.stats()
    # On stderr, so that stdout stays exactly the IR text.
    print(f"kiln dump: {len(compiled)} graph(s) compiled, {fallbacks['fallbacks']} fallback(s) "
          f"to eager" + "".join(f"\n  {m}" for m in fallbacks["events"]), file=sys.stderr)
    if args.output:
        out = Path(args.output)
        for k, cg in enumerate(compiled):
            d = out / f"graph_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i, (name, text) in enumerate(cg.snapshots):
                (d / f"{i:03d}_{name}.kir").write_text(text)
            (d / "wrapper.py").write_text(cg.source)
            (d / "passes.txt").write_text(cg.stats + "\n")
            if args.format == "mlir":
                i = _snapshot_index(cg, args.after)
                (d / f"{i:03d}_{cg.snapshots[i][0]}.mlir").write_text(
                    _mlir_text(cg.snapshots[i][1], args))
            if cg.prepare is not None:
                from kiln.ir import print_graph
                (d / "prepare_weights.kir").write_text(print_graph(cg.prepare))
        (out / "fallbacks.txt").write_text("".join(m + "\n" for m in fallbacks["events"]))
        if args.format == "html":
            from .report import compilation_of, write_report
            write_report(compilation_of(compiled, args, fallbacks["events"]), out / "report.html")
        print(f"wrote {len(compiled)} graphs to {out}")
        return 0
    if args.format == "html":
        from .report import build_data, compilation_of, render
        index = {"prefill": 0, "decode": len(compiled) - 1}[args.graph]
        comp = compilation_of([compiled[index]], args, fallbacks["events"], [args.graph])
        start = _snapshot_index(compiled[index], args.after) if args.after else None
        sys.stdout.write(render(build_data(comp, start_pass=start)))
        return 0
    text = _graph_text(compiled, args.graph, args.after)
    if args.format == "dot":
        from kiln.ir import parse
        text = to_dot(parse(text))
    elif args.format == "mlir":
        text = _mlir_text(text, args)
    sys.stdout.write(text)
    return 0


def to_dot(graph) -> str:
    import json
    lines = [f"digraph {json.dumps(graph.name)} {{", "  node [shape=box, fontname=monospace];"]
    ids = {}
    for i, v in enumerate(graph.inputs):
        ids[v] = f"in{i}"
        lines.append(f"  in{i} [label={json.dumps('%' + v.name + ': ' + str(v.type))}, shape=ellipse];")
    for i, n in enumerate(graph.nodes):
        label = n.op + "\\n" + ", ".join(str(r.type) for r in n.results)
        lines.append(f'  n{i} [label="{label}"];')
        for r in n.results:
            ids[r] = f"n{i}"
        for v in n.operands():
            lines.append(f"  {ids[v]} -> n{i};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def cmd_cache(args) -> int:
    """kiln cache ls | clear: the compile cache (kiln.compile_cache)."""
    from . import compile_cache
    root = compile_cache.directory()
    if args.cache_command == "clear":
        removed, freed = compile_cache.clear()
        print(f"kiln cache: removed {removed} entries and Triton's kernels, {freed / 2**20:.1f} "
              f"MiB, from {root}")
        return 0
    rows = compile_cache.entries()
    now = time.time()
    print(f"{'key':16s} {'MiB':>7s} {'age':>8s}  {'target':6s} model")
    for r in rows:
        a = r["about"]
        age = now - r["created"]
        age_text = (f"{age / 86400:.1f} d" if age >= 86400 else f"{age / 3600:.1f} h"
                    if age >= 3600 else f"{age / 60:.0f} min")
        what = r.get("problem") or (
            f"{a.get('model') or '-'} @{a.get('graph')} ({a.get('nodes')} nodes, "
            f"{(a.get('weights') or 0) / 1e6:.1f}M weights"
            f"{', serving' if a.get('serving') else ''}{', captured graph' if a.get('capture') else ''}"
            f"{', ' + a['quant'] if a.get('quant') else ''})")
        print(f"{r['key'][:16]:16s} {r['bytes'] / 2**20:7.2f} {age_text:>8s}  "
              f"{a.get('target', '?'):6s} {what}")
    total = sum(r["bytes"] for r in rows) + compile_cache.triton_bytes()
    print(f"{len(rows)} entries in {root}, {total / 2**20:.1f} MiB with Triton's kernels "
          f"({compile_cache.triton_bytes() / 2**20:.1f} MiB)"
          + ("; the cache is off (KILN_CACHE=0)" if not compile_cache.enabled() else ""))
    return 0


def cmd_diff(args) -> int:
    import difflib
    a, b = Path(args.a).read_text(), Path(args.b).read_text()
    sys.stdout.writelines(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                               args.a, args.b))
    return 0


def cmd_report(args) -> int:
    """kiln report: the page of a dump or an artifact, or of a model compiled here as
    `kiln dump` compiles it (its prefill and decode graphs)."""
    from .report import compilation_of, find_profiles, names_a_model, read_compilation, write_report
    if names_a_model(args.model):
        import kiln
        kiln.stats(reset=True)
        compiled = _capture(args)
        comp = compilation_of(compiled, args, kiln.stats()["events"])
    else:
        comp = read_compilation(args.model)
    data = write_report(comp, args.output, find_profiles(comp.profile_dir, args.profile))
    size = Path(args.output).stat().st_size / 2**20
    passes = sum(len(g["passes"]) - 1 for g in data["graphs"])
    print(f"kiln report: wrote {args.output} ({size:.1f} MiB; {len(data['graphs'])} graph(s), "
          f"{passes} passes, {len(data['profiles'])} profile(s)); open it in a browser"
          + "".join(f"\n  note: {n}" for n in data["notes"]))
    return 0


def cmd_passes(args) -> int:
    from kiln.passes import PIPELINE
    for i, p in enumerate(PIPELINE, start=1):
        tag = " (serving only)" if p.serving_only else ""
        print(f"{i:2d}. {p.name:22s} {p.doc}{tag}")
    return 0


def cmd_ops(args) -> int:
    from kiln.ir import REGISTRY
    from kiln.ir.ops import describe
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        if args.family and not name.startswith(args.family + "."):
            continue
        line = describe(op)
        if op.doc:
            line += "  " + op.doc
        print(line)
    return 0


def cmd_targets(args) -> int:
    from kiln.backends.targets import TARGETS, support_matrix
    if getattr(args, "markdown", False):
        print(support_matrix())
        return 0
    for t in TARGETS.values():
        print(t.describe())
    return 0


def cmd_rules(args) -> int:
    from kiln.passes import rules
    if getattr(args, "rules_command", None) == "trace":
        print(trace_rule(args.target_fn, args.inputs), end="")
        return 0
    for file, name, doc in rules.list_rules():
        print(f"{file:20s} {name:28s} {doc}")
    return 0


TRACED_PASSES = ["canonicalize", "canonicalize.forms"]


def trace_rule(target: str, inputs: list[str]) -> str:
    """`FILE:FUNC` captured by kiln (dynamo, then the passes that fusion rules see:
    TRACED_PASSES) on random inputs of the given `name=dtype[dims]`, printed as a
    `.kiln` fragment (passes.rules.fragment_of)."""
    import importlib.util
    import inspect
    from pathlib import Path

    import torch

    from kiln.ir.types import DTYPES
    from kiln.passes.rules import fragment_of
    file, sep, func = target.rpartition(":")
    if not sep or not file or not func:
        raise ValueError(f"expected FILE:FUNC (a Python file and a function in it), got {target!r}")
    if not Path(file).is_file():
        raise FileNotFoundError(f"no such file: {file}")
    spec = importlib.util.spec_from_file_location(f"kiln_traced_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"{file} has no function {func}")
    given = {}
    for item in inputs:
        m = re.fullmatch(r"(\w+)=(\w+)\[([\d, ]*)\]", item.strip())
        if not m or m.group(2) not in DTYPES:
            raise ValueError(f"bad --input {item!r}: write name=dtype[dims], like x=f32[2, 8, 64] "
                             f"(dtypes: {', '.join(sorted(DTYPES))})")
        dims = [int(d) for d in m.group(3).replace(" ", "").split(",") if d]
        dtype = DTYPES[m.group(2)]
        if dtype == torch.bool:
            given[m.group(1)] = torch.rand(dims) > 0.5
        elif dtype.is_floating_point:
            given[m.group(1)] = torch.randn(dims).to(dtype)
        else:
            given[m.group(1)] = torch.randint(0, 16, dims, dtype=dtype)
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty]
    missing = [p for p in params if p not in given]
    if missing:
        raise ValueError(f"{func} needs --input for {', '.join(missing)} (name=dtype[dims])")
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="kiln", options={
        "passes": TRACED_PASSES, "observer": graphs.append, "fallback": "error"})
    with torch.no_grad():
        compiled(**given)
    torch._dynamo.reset()
    if len(graphs) != 1:
        raise ValueError(f"{func} was captured as {len(graphs)} graphs (a graph break); a rule "
                         f"matches inside one graph")
    return fragment_of(graphs[0].graph, func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: a declarative graph compiler for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)

    def engine_args(q, serving=False):
        q.add_argument("model", nargs="?", default="smollm2",
                       help="a compiled artifact directory (kiln compile -o DIR), or a model: "
                            "smollm2, a local HF directory or a GGUF file (compiled first)")
        q.add_argument("-t", "--target", default="cpu", help="target when compiling a model")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        q.add_argument("--quant", default="auto", choices=("auto", "none", *CLI_QUANT_MODES),
                       help=QUANT_HELP + " (when compiling a model; an artifact keeps its own)")
        q.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block "
                       "(when compiling a model)")
        q.add_argument("--max-model-len", type=positive_int, help="longest sequence (default: the "
                       "model's, at most 4096)")
        q.add_argument("--num-blocks", type=positive_int, help="KV-cache blocks (default: --kv-cache-gib)")
        q.add_argument("--kv-cache-gib", type=positive_float, default=1.0, help="KV-cache memory")
        q.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences running at once (on a GPU, "
                       "decode batches up to this many replay CUDA graphs)")
        q.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                       help="new tokens per step (prefill chunks + decodes)")
        q.add_argument("--no-prefix-caching", action="store_true")
        q.add_argument("--no-cudagraphs", action="store_true", help="targets with graph capture (cuda, hip, xpu, npu): run every step eagerly")
        q.add_argument("--lazy-mixed-graphs", action="store_true", help="cuda: capture the graphs "
                       "of batches with prefill chunks when first met instead of at start-up "
                       "(a faster start; each such bucket stalls its first step)")
        q.add_argument("--background-graphs", action="store_true", help="cuda: capture the "
                       "CUDA graphs while the engine is idle, smallest decode batch first, "
                       "instead of at start-up (ready sooner; a request that arrives during a "
                       "capture waits for that one)")
        q.add_argument("--no-async-scheduling", action="store_true", help="cuda: read each step's "
                       "tokens before planning the next (by default step N+1 is planned and "
                       "launched while step N runs)")
        q.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
        q.add_argument("--speculative", metavar="METHOD:K",
                       help="speculative decoding: draft K tokens a step and verify them in one "
                            "model step (greedy output unchanged, see --batch-invariant; sampling "
                            "keeps its distribution); ngram:K drafts by prompt lookup (no extra "
                            "weights), "
                            "layerskip:K[:layers=A-B] with the model minus decoder layers A-B "
                            "(default: the middle half; a model, not an artifact), "
                            "draft:PATH:K with a smaller model of the same tokenizer (PATH: a "
                            "model as for MODEL, or an artifact), mtp:K with the model's own "
                            "multi-token-prediction module (DeepSeek-V3 / GLM-4.5 style "
                            "checkpoints; a model, not an artifact)")
        q.add_argument("--batch-invariant", choices=("verify", "all", "off"), default="verify",
                       help="cuda/hip: compute decode rows (up to 64 a step) exactly as in a "
                            "batch of one: in speculation's verify steps (verify, the default: "
                            "greedy output token for token that of plain decoding, in bf16 too), "
                            "in every step (all: a sequence's tokens do not depend on what it is "
                            "batched with; slower at large batches, which re-read weights from "
                            "L2 per row), or never (off: verify rows round like any batch of "
                            "their size)")
        q.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                       help="shard the model over N ranks, one process per GPU (NCCL; gloo on "
                            "the CPU); under torchrun, the ranks the launcher started")
        q.add_argument("--trust-artifact", action="store_true",
                       help="load an artifact kiln did not build on this machine (or by this "
                            "user): its wrapper.py is Python that will run, so read it first; "
                            "file hashes are checked either way")
        q.add_argument("--timings", action="store_true", help="print where start-up time "
                       "goes (capture, passes, kernel compilation, graph capture, ...) at exit")
        if serving:
            q.add_argument("--max-waiting", type=positive_int, default=256,
                           help="queued requests before the server answers 429")

    g = sub.add_parser("generate", help="answer one prompt through the serving engine")
    engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    g.add_argument("--seed", type=int)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--backend", default="kiln", choices=["kiln", "kiln-static", "eager", "inductor"],
                   help="kiln: the engine over the compiled serving graph; the others run the "
                        "StaticCache loop (kiln-static: torch.compile with the kiln backend)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("compile", help="compile a model into an artifact directory for kiln serve")
    c.add_argument("model", nargs="?", default="smollm2", help="smollm2, a local HF directory or a GGUF file")
    c.add_argument("-t", "--target", default="cpu")
    c.add_argument("-o", "--output", required=True, help="artifact directory (replaced atomically)")
    c.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--quant", default="auto", choices=("auto", "none", *CLI_QUANT_MODES),
                   help=QUANT_HELP)
    c.add_argument("--disable", help="comma-separated passes to switch off")
    c.add_argument("--aot", action="store_true",
                   help="GPU targets: also write aot/, the binaries of the graph's Triton kernels "
                        "with C launchers (for a C/C++ server; kiln serve does not need it)")
    c.add_argument("--timings", action="store_true", help="print where the time goes: load, "
                   "capture (dynamo, AOTAutograd), each pass, codegen, the compile cache")
    c.set_defaults(fn=cmd_compile)

    sv = sub.add_parser("serve", help="OpenAI-compatible server for an artifact or a model")
    engine_args(sv, serving=True)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or $KILN_API_KEY)")
    sv.add_argument("--served-model-name", help="the model name clients send (default: the model's)")
    sv.add_argument("--engine-thread", action="store_true",
                    help="run the engine in a thread of the server's process instead of a process "
                         "of its own (which keeps the HTTP layer off the engine's interpreter lock)")
    sv.add_argument("--max-body-bytes", type=positive_int, default=4 * 2**20,
                    help="largest request body; larger ones get 413 before they are read "
                         "(default 4 MiB)")
    sv.add_argument("--max-prompt-chars", type=positive_int,
                    help="longest prompt (characters, chat messages together) the server "
                         "tokenizes (default: 64 per token of --max-model-len)")
    sv.add_argument("--docs", action="store_true",
                    help="serve /docs, /redoc and /openapi.json (behind --api-key when set)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(fn=cmd_serve)

    ch = sub.add_parser("chat", help="interactive chat through the serving engine")
    engine_args(ch)
    ch.add_argument("--max-tokens", type=positive_int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--seed", type=int)
    ch.add_argument("--system", help="system prompt")
    ch.set_defaults(fn=cmd_chat)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("serve", help="load generator for a running OpenAI-compatible server")
    bs.add_argument("--url", default="http://127.0.0.1:8000")
    bs.add_argument("--model", help="default: the server's first model")
    bs.add_argument("--concurrency", type=positive_int, default=4)
    bs.add_argument("--num-requests", type=positive_int, default=32)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--input-len", type=positive_int, default=128)
    bs.add_argument("--output-len", type=positive_int, default=64)
    bs.add_argument("--range-ratio", type=float, default=0.5)
    bs.add_argument("--shared-prefix-len", type=non_negative_int, default=0,
                    help="prefix caching: every prompt starts with the same N random tokens, then "
                         "its own ~--input-len; the report splits cold from warm (cached) requests")
    bs.add_argument("--num-prefixes", type=positive_int, default=1,
                    help="distinct shared prefixes, each for a contiguous run of the requests")
    bs.add_argument("--api-key")
    bs.add_argument("--warmup", action="store_true", help="send `concurrency` untimed requests "
                    "first (a GPU server captures its CUDA graphs on first use)")
    bs.add_argument("--profile", action="store_true", help="add the server's engine step profile "
                    "(host time per phase, device time, batch shape) from its /metrics")
    bs.add_argument("--json", help="also write the report as JSON here")
    bs.set_defaults(fn=cmd_bench_serve)

    d = sub.add_parser("dump", help="print the IR of a model after a pass")
    d.add_argument("model", nargs="?", default="smollm2")
    d.add_argument("--after", help="pass name (default: the end of the pipeline); 'input' for the captured graph")
    d.add_argument("--format", default="kir", choices=["kir", "dot", "mlir", "html"],
                   help="mlir: torch-mlir's torch dialect (with -o: beside the .kir files, for "
                        "the --after pass of each graph); html: kiln report's page for the graph, "
                        "opened at the --after pass (with -o: DIR/report.html for every graph)")
    d.add_argument("--mlir-fused-ops", choices=["custom", "decompose"],
                   help="kiln's fused ops as custom ops (torch.operator \"torch.kiln.rms_norm\"; the "
                        "default) or as their reference implementation in ATen ops")
    d.add_argument("--mlir-symbolic-shapes", action="store_true",
                   help="also the relations and ranges of dynamic sizes (torch.symbolic_int, "
                        "torch.bind_symbolic_shape: IREE reads them, torch-mlir's linalg "
                        "lowering does not)")
    d.add_argument("--graph", default="prefill", choices=["prefill", "decode", "draft"],
                   help="draft: the serving draft graph of --speculative layerskip:K, "
                        "draft:PATH:K or mtp:K")
    d.add_argument("--speculative", metavar="METHOD:K", help="with --graph draft: layerskip:K"
                   "[:layers=A-B], draft:PATH:K or mtp:K")
    d.add_argument("--prompt", default="Hello")
    d.add_argument("--target", default="cpu")
    d.add_argument("--disable", help="comma-separated passes to switch off")
    d.add_argument("-o", "--output", help="write every pass of every graph (and the wrapper) here")
    d.set_defaults(fn=cmd_dump)

    ca = sub.add_parser("cache", help="the compile cache in $KILN_CACHE_DIR/compile: ls | clear")
    ca.add_argument("cache_command", choices=["ls", "clear"],
                    help="ls: entries, sizes, ages, model and target; clear: remove them all")
    ca.set_defaults(fn=cmd_cache)

    rp = sub.add_parser("report", help="one self-contained HTML page of what the compiler did: "
                                       "every pass, its changes by rule, graph pictures, kernels")
    rp.add_argument("model", nargs="?", default="smollm2", metavar="DIR_OR_MODEL",
                    help="a KILN_DUMP_DIR tree or kiln dump -o directory, an artifact (kiln "
                         "compile -o), or a model to compile as kiln dump does: smollm2, a "
                         "local HF directory or a GGUF file")
    rp.add_argument("-o", "--output", default="report.html", help="the page (default: report.html)")
    rp.add_argument("--profile", action="append", default=[], metavar="JSON",
                    help="a step profile (bench/step_profile.py --out) or kiln bench serve --json "
                         "report to show; *.json profiles in DIR are found by themselves")
    rp.add_argument("--target", "-t", default="cpu", help="target when compiling a model")
    rp.add_argument("--prompt", default="Hello", help="prompt when compiling a model")
    rp.add_argument("--disable", help="comma-separated passes to switch off when compiling a model")
    rp.set_defaults(fn=cmd_report)

    df = sub.add_parser("diff", help="unified diff of two IR dumps")
    df.add_argument("a")
    df.add_argument("b")
    df.set_defaults(fn=cmd_diff)

    sub.add_parser("passes", help="list the pass pipeline").set_defaults(fn=cmd_passes)
    o = sub.add_parser("ops", help="list the op registry")
    o.add_argument("--family", help="aten, kiln, sym, prims")
    o.set_defaults(fn=cmd_ops)
    tg = sub.add_parser("targets", help="list compilation targets: kernels, graph capture, how "
                                        "each is verified, the first command on its hardware")
    tg.add_argument("--markdown", action="store_true",
                    help="print the README's support matrix instead")
    tg.set_defaults(fn=cmd_targets)
    rl = sub.add_parser("rules", help="list the rewrite rules (or: kiln rules trace FILE:FUNC)")
    rl.set_defaults(fn=cmd_rules)
    rsub = rl.add_subparsers(dest="rules_command")
    tr = rsub.add_parser("trace", help="print a Python function as kiln captures it, as a .kiln "
                                       "fragment to start a rule from")
    tr.add_argument("target_fn", metavar="FILE:FUNC")
    tr.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=DTYPE[DIMS]",
                    help="an argument of FUNC and its random example, like x=f32[2, 8, 64] (one "
                         "per argument)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:   # StaleArtifact is a ValueError
        print(f"kiln {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
