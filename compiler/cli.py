"""The `kiln` command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _load(spec: str, dtype: str = "float32", attn: str = "sdpa"):
    import torch

    from kiln.frontends import hf
    return hf.load(spec, dtype=getattr(torch, dtype), attn_implementation=attn)


def cmd_generate(args) -> int:
    import torch

    from .generate import chat_input_ids, compile_model, greedy
    t0 = time.perf_counter()
    model, tok = _load(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    ids = chat_input_ids(tok, args.prompt, chat=not args.no_chat)
    fn = compile_model(model, args.backend, {"target": args.target} if args.backend == "kiln" else None)
    torch.manual_seed(0)
    gen = greedy(fn, model, ids, args.max_tokens, eos_token_id=tok.eos_token_id)
    text = tok.decode(gen.tokens, skip_special_tokens=True)
    print(text.strip())
    print(f"\n[{args.backend}, {args.target}] load {load_s:.1f} s | prompt {gen.prompt_tokens} tokens, "
          f"first call {gen.prefill_seconds:.2f} s | {len(gen.tokens)} tokens | "
          f"decode {gen.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


def _capture(args):
    """Compiles the model on a short prompt, recording the IR after every pass, for the
    prefill graph and (with one decode step) the decode graph."""
    import torch

    from .generate import chat_input_ids, greedy
    model, tok = _load(args.model)
    compiled = []
    opts = {"target": args.target, "observer": compiled.append, "record": True}
    if args.disable:
        opts["disable_passes"] = args.disable
    fn = torch.compile(model, backend="kiln", options=opts)
    ids = chat_input_ids(tok, args.prompt)
    greedy(fn, model, ids, 2)
    return compiled


def _graph_text(compiled, which: str, after: str | None) -> str:
    index = {"prefill": 0, "decode": -1}[which]
    cg = compiled[index]
    snaps = cg.snapshots
    if after is None:
        return snaps[-1][1]
    for name, text in snaps:
        if name == after:
            return text
    ran = ", ".join(n for n, _ in snaps)
    raise SystemExit(f"kiln dump: pass {after!r} did not run; passes that ran: {ran}")


def cmd_dump(args) -> int:
    from kiln.passes import pass_names
    if args.after and args.after not in pass_names() + ["input"]:
        print(f"kiln dump: unknown pass {args.after!r}; known: input, {', '.join(pass_names())}",
              file=sys.stderr)
        return 2
    compiled = _capture(args)
    if args.output:
        out = Path(args.output)
        for k, cg in enumerate(compiled):
            d = out / f"graph_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i, (name, text) in enumerate(cg.snapshots):
                (d / f"{i:03d}_{name}.kir").write_text(text)
            (d / "wrapper.py").write_text(cg.source)
        print(f"wrote {len(compiled)} graphs to {out}")
        return 0
    text = _graph_text(compiled, args.graph, args.after)
    if args.format == "dot":
        from kiln.ir import parse
        text = to_dot(parse(text))
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


def cmd_diff(args) -> int:
    import difflib
    a, b = Path(args.a).read_text(), Path(args.b).read_text()
    sys.stdout.writelines(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                               args.a, args.b))
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
    from kiln.backends.targets import TARGETS
    for t in TARGETS.values():
        print(t.describe())
    return 0


def cmd_rules(args) -> int:
    from kiln.passes import rules
    for file, name, doc in rules.list_rules():
        print(f"{file:20s} {name:28s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: a declarative graph compiler for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a model compiled by kiln")
    g.add_argument("model", nargs="?", default="smollm2", help="smollm2, a local HF directory or a GGUF file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--backend", default="kiln", choices=["kiln", "eager", "inductor"])
    g.add_argument("--target", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("dump", help="print the IR of a model after a pass")
    d.add_argument("model", nargs="?", default="smollm2")
    d.add_argument("--after", help="pass name (default: the end of the pipeline); 'input' for the captured graph")
    d.add_argument("--format", default="kir", choices=["kir", "dot"])
    d.add_argument("--graph", default="prefill", choices=["prefill", "decode"])
    d.add_argument("--prompt", default="Hello")
    d.add_argument("--target", default="cpu")
    d.add_argument("--disable", help="comma-separated passes to switch off")
    d.add_argument("-o", "--output", help="write every pass of every graph (and the wrapper) here")
    d.set_defaults(fn=cmd_dump)

    df = sub.add_parser("diff", help="unified diff of two IR dumps")
    df.add_argument("a")
    df.add_argument("b")
    df.set_defaults(fn=cmd_diff)

    sub.add_parser("passes", help="list the pass pipeline").set_defaults(fn=cmd_passes)
    o = sub.add_parser("ops", help="list the op registry")
    o.add_argument("--family", help="aten, kiln, sym, prims")
    o.set_defaults(fn=cmd_ops)
    sub.add_parser("targets", help="list compilation targets").set_defaults(fn=cmd_targets)
    sub.add_parser("rules", help="list the rewrite rules").set_defaults(fn=cmd_rules)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"kiln {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
