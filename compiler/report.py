"""`kiln report`: one self-contained HTML page that shows what the compiler did.

The page holds every compiled graph and every pass in order with its time and stats; the
IR after each pass with the change from the pass before (each added and removed line
attributed to the rule that made it, linked to the rule's file and line); a picture of the
graph after each pass laid out by Graphviz's `dot`; the generated kernels and the wrapper;
and, where a profile JSON lies beside the dump, kernels per step and time per kernel.

It reads what kiln already writes and executes none of it (an artifact's wrapper.py is
shown, never run): a `KILN_DUMP_DIR` tree or a `kiln dump -o` directory (a folder per
graph with `NNN_<pass>.kir`, `wrapper.py`, `passes.txt`), one such graph folder, or an
artifact (`kiln compile -o`: `ir/`, `wrapper.py`, `passes.txt`, `manifest.json`). The CLI
compiles a model into the same records in process (`kiln.cli.cmd_report`).

Rewrites per rule. The pass manager counts rewrites per pass; which rule made each one is
recovered here: a pass that applies a rule file (its doc names `rules/<file>.kiln`, as
`kiln passes` shows) is applied again to the IR before it, one rule at a time, and the
result must print exactly as the IR the pass wrote; only then are the per-rule counts, the
nodes each rule replaced and, for a rule that matched nothing, where its closest attempt
failed, shown. A pass that applies its rules only under some condition (a target, an
option) or a run cut short by KILN_PASS_LIMIT does not reproduce, and says so.

Size. IR texts, the wrapper and the pictures are stored deflated and base64-encoded, and
inflated by the browser (DecompressionStream) when a view first needs them; identical IR
texts (passes that changed nothing) are stored once. In a picture, weights and values used
more than `PICTURE_FANOUT` times are not drawn as edges (a size symbol feeding hundreds of
reshapes makes `dot` take minutes), and graph inputs are drawn beside each use; the IR
lines name them all.
"""
from __future__ import annotations

import ast
import base64
import difflib
import json
import os
import re
import shutil
import subprocess
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

SNAPSHOT_FILE = re.compile(r"^(\d+)_(.+)\.kir$")
STATS_LINE = re.compile(r"^(?P<name>\S+): replaced (?P<rewrites>\d+) \((?P<ms>[\d.]+) ms, "
                        r"(?P<nodes>\d+) nodes\)$")
RULE_FILE_IN_DOC = re.compile(r"rules/(\w+)\.kiln")
VALUE_NUMBER = re.compile(r"%\d+\b")
PICTURE_FANOUT = 3          # values with more users are not drawn as edges
PICTURE_MAX_NODES = 5000    # larger graphs get no picture (dot would take minutes)
DOT_TIMEOUT_S = 60
PROFILE_KINDS = ("step profile (bench/step_profile.py --out)",
                 "kiln bench serve --profile --json report")


class ReportError(ValueError):
    """Nothing to report on at the path given; the message says what kiln report reads."""


@dataclass
class GraphRecord:
    """One compiled graph as kiln wrote it down."""
    name: str
    snapshots: list[tuple[str, str]]         # (pass, IR text after it); the first is "input"
    stats: list = field(default_factory=list)   # PassStats per pass after the input, if recorded
    wrapper: str | None = None               # the generated wrapper.py
    prepare: str | None = None               # prepare_weights.kir, when weights are prepared
    options: dict = field(default_factory=dict)   # the compile options known (target, quant)
    folder: Path | None = None               # where it was read from, for messages


@dataclass
class Compilation:
    """What one report shows: the graphs, where they came from, fallbacks to eager."""
    source: str
    graphs: list[GraphRecord]
    details: dict = field(default_factory=dict)   # shown in the header: target, model, ...
    fallbacks: list[str] = field(default_factory=list)
    profile_dir: Path | None = None          # where to look for profile JSON files
    timings: str | None = None               # a KILN_DUMP_DIR's timings.txt


# ---------------------------------------------------------------- reading what kiln wrote

def parse_pass_stats(text: str) -> list:
    """passes.txt (PassManager.summary(): one `PassStats` per line, notes indented) back to
    PassStats objects."""
    from kiln.passes.manager import PassStats
    out = []
    for line in text.splitlines():
        m = STATS_LINE.match(line)
        if m:
            out.append(PassStats(m["name"], int(m["rewrites"]), float(m["ms"]) / 1e3,
                                 int(m["nodes"])))
        elif line.startswith("  note: ") and out:
            out[-1].notes.append(line[len("  note: "):])
    return out


def _snapshot_files(folder: Path) -> list[tuple[int, str, Path]]:
    found = []
    for p in folder.iterdir():
        m = SNAPSHOT_FILE.match(p.name)
        if m and p.is_file():
            found.append((int(m[1]), m[2], p))
    return sorted(found)


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def read_graph_dir(folder: Path, name: str, ir_folder: Path | None = None) -> GraphRecord:
    """A graph folder of a dump (or an artifact, whose IR lives in `ir/`)."""
    snapshots = [(pass_name, p.read_text())
                 for _, pass_name, p in _snapshot_files(ir_folder or folder)]
    stats = parse_pass_stats(_read_text(folder / "passes.txt") or "")
    wrapper = _read_text(folder / "wrapper.py")
    return GraphRecord(name, snapshots, stats, wrapper, _read_text(folder / "prepare_weights.kir"),
                       {"target": wrapper_target(wrapper) if wrapper else None},
                       ir_folder or folder)


def _graph_folder_order(path: Path):
    """forward_0, forward_1, ..., forward_10 in numeric order (KILN_DUMP_DIR names a graph
    folder by the graph's name and a running number; `kiln dump -o` by graph_<k>)."""
    stem, _, number = path.name.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (path.name, -1)


def read_compilation(path: str | os.PathLike) -> Compilation:
    """A KILN_DUMP_DIR tree, a `kiln dump -o` directory, one graph folder of either, or an
    artifact. Raises ReportError naming what it expected."""
    root = Path(path)
    if not root.exists():
        raise ReportError(f"{root}: no such file or directory; kiln report reads a "
                          f"KILN_DUMP_DIR tree, a `kiln dump -o` directory or an artifact "
                          f"(`kiln compile -o`), or compiles a model (smollm2, a Hugging Face "
                          f"directory, a .gguf file)")
    if not root.is_dir():
        raise ReportError(f"{root} is a file; kiln report reads a directory (a KILN_DUMP_DIR "
                          f"tree, a `kiln dump -o` directory, an artifact) or a model "
                          f"(smollm2, a Hugging Face directory, a .gguf file)")
    fallbacks = [line for line in (_read_text(root / "fallbacks.txt") or "").splitlines() if line]
    if (root / "manifest.json").is_file():
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except ValueError as e:
            raise ReportError(f"{root / 'manifest.json'} is not JSON ({e}); recompile the "
                              f"artifact with kiln compile") from None
        if not (root / "ir").is_dir() or not _snapshot_files(root / "ir"):
            raise ReportError(f"artifact {root} has no ir/NNN_<pass>.kir files; recompile it "
                              f"with kiln compile")
        versions = manifest.get("versions", {})
        details = {"artifact": str(root), "target": manifest.get("target"),
                   "model": manifest.get("model", {}).get("spec"),
                   "created": manifest.get("created"),
                   "compiled with": ", ".join(f"{k} {versions[k]}" for k in ("kiln", "torch")
                                              if versions.get(k))}
        graph = read_graph_dir(root, "serving", root / "ir")
        graph.options = {"target": manifest.get("target"),
                         "quant": manifest.get("options", {}).get("quant")}
        return Compilation(str(root), [graph], {k: v for k, v in details.items() if v},
                           fallbacks, root)
    if _snapshot_files(root):
        graphs = [read_graph_dir(root, root.name)]
    else:
        folders = sorted((d for d in root.iterdir() if d.is_dir() and _snapshot_files(d)),
                         key=_graph_folder_order)
        graphs = [read_graph_dir(d, d.name) for d in folders]
    if not graphs:
        raise ReportError(f"{root} holds no kiln dump: expected NNN_<pass>.kir files in it or "
                          f"in its sub-folders (write them with KILN_DUMP_DIR={root} or "
                          f"kiln dump MODEL -o {root}), or an artifact's manifest.json")
    return Compilation(str(root), graphs, {"dump": str(root)}, fallbacks, root,
                       _read_text(root / "timings.txt"))


def names_a_model(source: str) -> bool:
    """Whether `kiln report SOURCE` compiles a model (smollm2, a .gguf file, a Hugging Face
    directory with config.json) rather than reading what kiln wrote."""
    from kiln.frontends.hf import DEFAULT
    path = Path(source).expanduser()
    return (source == DEFAULT or path.suffix.lower() == ".gguf"
            or (path.is_dir() and (path / "config.json").is_file()))


def compilation_of(compiled: list, args, fallbacks: list[str],
                   names: list[str] | None = None) -> Compilation:
    """The Compilation of CompiledGraphs that `kiln dump`'s capture recorded (`args`: the
    command line's model, target and prompt)."""
    records = records_from_compiled(compiled, names)
    for record in records:
        record.options = {"target": args.target}
    return Compilation(str(args.model), records,
                       {"model": str(args.model), "target": args.target,
                        "prompt": repr(args.prompt)}, list(fallbacks))


def records_from_compiled(compiled: list, names: list[str] | None = None) -> list[GraphRecord]:
    """GraphRecords of CompiledGraphs compiled with `record=True` (kiln dump's capture).
    Their pass statistics are the summary text, as passes.txt and the compile cache keep it."""
    from kiln.ir import print_graph
    out = []
    for k, cg in enumerate(compiled):
        out.append(GraphRecord(names[k] if names else f"graph_{k}", list(cg.snapshots),
                               parse_pass_stats(cg.stats), cg.source,
                               print_graph(cg.prepare) if cg.prepare is not None else None))
    return out


# ---------------------------------------------------------------- one pass, analysed

def node_lines(text: str) -> list[int]:
    """0-based line numbers of the nodes of the first function in printed IR, in node order
    (printer.py: a node is a line indented by two spaces; `return` ends the function)."""
    out = []
    for i, line in enumerate(text.splitlines()):
        if line.startswith("  return") or line == "}":
            break
        if line.startswith("  ") and not line.startswith("   "):
            out.append(i)
    return out


def line_diff(before: str, after: str) -> list[list]:
    """The changed line ranges [tag, a0, a1, b0, b1] from `before` to `after`. Lines are
    compared with SSA numbers blanked: a pass that removes one node renumbers every value
    after it, and that is no change."""
    a = [VALUE_NUMBER.sub("%", line) for line in before.splitlines()]
    b = [VALUE_NUMBER.sub("%", line) for line in after.splitlines()]
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return [[tag, a0, a1, b0, b1] for tag, a0, a1, b0, b1 in ops if tag != "equal"]


@dataclass
class RuleCount:
    name: str
    file: str
    line: int | None
    rewrites: int
    why_not: str | None = None     # a rule that matched nothing: where its closest attempt failed


@dataclass
class Replay:
    """A rule pass applied again, rule by rule, to the IR before it."""
    rules: list[RuleCount]
    removed_by: dict[int, str]     # line of the IR before -> the rule that removed that node
    added_by: dict[int, str]       # line of the IR after -> the rule whose replacement it is
    graph: object                  # the IR after the pass, as a Graph


def rule_file_of(pass_name: str) -> str | None:
    """The rule file a pass applies, as its doc names it (`rules/<file>.kiln`)."""
    from kiln.passes import PIPELINE
    for p in PIPELINE:
        if p.name == pass_name:
            m = RULE_FILE_IN_DOC.search(p.doc)
            return m[1] if m else None
    return None


class NotReproduced(Exception):
    """Applying a pass's rules again did not give the IR the pass wrote."""


def replay_context(options: dict):
    """A PassContext with the compile options the rules may read (RuleContext.options):
    those the dump or artifact records (target, quant); the rest as compile_graph's defaults."""
    from kiln.backends.targets import get_target
    from kiln.passes import PassContext
    target = options.get("target")
    try:
        target = get_target(target) if target else None
    except (KeyError, ValueError):
        target = None
    return PassContext({"target": target, "quant": options.get("quant")})


def replay_rules(before, before_text: str, after_text: str, rule_file: str,
                 ctx=None) -> Replay:
    """The rules of `rule_file` applied to a copy of `before` in file order, each with its
    spellings, then dead code dropped, as rule_pass does. Raises NotReproduced when that
    fails or does not print as `after_text` (the pass chose not to apply them, the options
    it saw differ from `ctx`'s, KILN_PASS_LIMIT cut it, or the rules changed since)."""
    from kiln.ir import print_graph
    from kiln.passes.canonicalize import dce
    from kiln.passes.pattern import KilnRuleError, apply_patterns
    from kiln.passes.rules import load_rules
    g = before.copy()
    # Keyed by the nodes themselves, not id(): a removed node is freed and its id reused.
    origin = dict(zip(g.nodes, node_lines(before_text)))
    groups: list[list] = []
    for p in load_rules(rule_file):
        if groups and groups[-1][0].name == p.name:
            groups[-1].append(p)
        else:
            groups.append([p])
    counts, removed_by, total = [], {}, 0
    for group in groups:
        present = set(g.nodes)
        why_not = None
        try:
            n = apply_patterns(g, group, ctx, require_match=True)
        except KilnRuleError as e:
            if not e.bare.startswith("matched nothing"):
                raise NotReproduced(str(e)) from None
            n, why_not = 0, e.bare
        except Exception as e:   # a rule's Python function failing where the pass's did not
            raise NotReproduced(f"rule {group[0].name}: {type(e).__name__}: {e}") from None
        total += n
        for gone in present.difference(g.nodes) & origin.keys():
            removed_by[origin[gone]] = group[0].name
        counts.append(RuleCount(group[0].name, group[0].file, group[0].line, n, why_not))
    if total:
        present = set(g.nodes)
        dce(g)
        for gone in present.difference(g.nodes) & origin.keys():   # left unused by the rewrites
            removed_by[origin[gone]] = "dce"
    if print_graph(g) != after_text:
        raise NotReproduced("the result differs from the IR after the pass")
    added_by = {line: n.meta["rule"] for n, line in zip(g.nodes, node_lines(after_text))
                if n not in origin and "rule" in n.meta}
    return Replay(counts, removed_by, added_by, g)


# ---------------------------------------------------------------- pictures

KINDS = {   # kind -> (fill colour, what the legend says)
    "aten": ("#dbe7fb", "ATen op"),
    "fused": ("#fbd9a6", "kiln fused op"),
    "opaque": ("#f4c0c0", "opaque op (no kiln schema)"),
    "kernel": ("#bfe6c4", "kernel group (kiln.call)"),
    "input": ("#ececec", "graph input"),
}


def node_kind(op: str) -> str:
    if op == "kiln.call":
        return "kernel"
    if op.startswith("kiln."):
        return "fused"
    if op.startswith("torch."):
        return "opaque"
    return "aten"


@dataclass
class Picture:
    """A graph for `dot`: its DOT source, and per DOT node the label and kind the page draws."""
    source: str
    nodes: dict[str, tuple[str, str]]


def picture_of_graph(graph, text: str) -> Picture:
    """A box per node, named `L<its IR line>` and coloured by kind; inputs other than
    weights as ellipses beside their uses (`L<line>_<operand>`). Labels are op (or callee)
    and first result, one a line."""
    from kiln.ir.printer import value_names
    from kiln.ir.roles import is_weight
    users: dict = {}
    for n in graph.nodes:
        for v in set(n.operands()):
            users[v] = users.get(v, 0) + 1
    names = value_names(graph)
    out = [f"digraph {_dot_string(graph.name)} {{",
           "  graph [nodesep=0.12, ranksep=0.22];",
           '  node [shape=box, fontname="DejaVu Sans Mono", fontsize=9, height=0.2, '
           'margin="0.05,0.02"];',
           "  edge [arrowsize=0.4];"]
    nodes: dict[str, tuple[str, str]] = {}
    ids: dict = {}
    drawn_inputs = {v for v in graph.inputs if not is_weight(v)
                    and 0 < users.get(v, 0) <= PICTURE_FANOUT}
    for n, line in zip(graph.nodes, node_lines(text)):
        node_id = f"L{line + 1}"
        label = n.attrs["callee"] if n.op == "kiln.call" else n.op
        if n.results:
            label += f"\n%{names[n.results[0]]}: {n.results[0].type}"
            if len(n.results) > 1:
                label += f" (+{len(n.results) - 1})"
        widest = max((users.get(r, 0) for r in n.results), default=0)
        if widest > PICTURE_FANOUT:
            label += f"\n{widest} uses, not drawn"
        nodes[node_id] = (label, node_kind(n.op))
        out.append(f"  {node_id} [label={_dot_string(label)}];")
        for k, v in enumerate(dict.fromkeys(n.operands())):
            if v in drawn_inputs:   # beside each use: an input at the top would draw edges
                input_copy = f"{node_id}_{k}"   # down the whole graph, which dot lays out slowly
                nodes[input_copy] = ("%" + v.name, "input")
                out.append(f"  {input_copy} [label={_dot_string(nodes[input_copy][0])}, shape=ellipse];")
                out.append(f"  {input_copy} -> {node_id};")
            elif v in ids:
                out.append(f"  {ids[v]} -> {node_id};")
        for r in n.results:
            if users.get(r, 0) <= PICTURE_FANOUT:
                ids[r] = node_id
    out.append("}")
    return Picture("\n".join(out) + "\n", nodes)


def _dot_string(text: str) -> str:
    """A DOT quoted string: JSON's escapes for quotes, backslashes and newlines are DOT's."""
    return json.dumps(text, ensure_ascii=False)


def lay_out(dot: str, picture: Picture) -> tuple[str | None, str | None]:
    """(layout, None) or (None, why not). The layout is what `dot -Tplain` computed, in
    points, as JSON the page draws as SVG: {"width", "height", "nodes": [[name, label,
    kind, x, y, width, height]], "edges": [[from, to, spline control points x0, y0, ...]]}
    (centres and points with y growing downwards). Far smaller than dot's own SVG."""
    try:
        r = subprocess.run([dot, "-Tplain"], input=picture.source, capture_output=True,
                           text=True, timeout=DOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"dot took more than {DOT_TIMEOUT_S} s; no picture"
    except OSError as e:
        return None, f"dot could not run ({e}); no picture"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"dot failed ({last}); no picture"
    width = height = 0
    index, nodes, edges = {}, [], []
    point = lambda inches: round(float(inches) * 72)   # noqa: E731
    for line in r.stdout.splitlines():
        word = line.split()
        if not word:
            continue
        if word[0] == "graph":
            width, height = point(word[2]), point(word[3])
        elif word[0] == "node":   # node NAME X Y W H LABEL...: names are L<line>[_<operand>]
            name = word[1]
            index[name] = len(nodes)
            label, kind = picture.nodes[name]
            nodes.append([name, label, kind, point(word[2]), height - point(word[3]),
                          point(word[4]), point(word[5])])
        elif word[0] == "edge":   # edge FROM TO N X1 Y1 ... XN YN STYLE COLOUR
            count = int(word[3])
            xy = word[4:4 + 2 * count]
            points = [point(v) if i % 2 == 0 else height - point(v) for i, v in enumerate(xy)]
            edges.append([index[word[1]], index[word[2]], *points])
    layout = {"width": width, "height": height, "nodes": nodes, "edges": edges}
    return json.dumps(layout, separators=(",", ":")), None


# ---------------------------------------------------------------- kernels

def wrapper_target(wrapper: str) -> str | None:
    """The target named in the wrapper's docstring ("kiln wrapper for @forward, target cuda.")."""
    m = re.search(r"^\"\"\"kiln wrapper for @\S+, target (\w+)\.", wrapper)
    return m[1] if m else None


def generated_kernels(wrapper: str, final_text: str) -> list[dict]:
    """Each kiln.call callee of the final IR with the wrapper code generated for it: on a
    Triton target the @triton.jit kernel, its launcher and the torch version used on host
    tensors (wrapper.py's `<callee>_kernel`, `<callee>`, `<callee>_host`); elsewhere the
    torch function."""
    lines = final_text.splitlines()
    tree = ast.parse(wrapper)
    defs = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            defs[node.name] = (start, node.end_lineno)
    out = []
    heads = [i for i, line in enumerate(lines) if line.startswith("func @")]
    for head in heads[1:]:
        callee = re.match(r"func @(\S+)\(", lines[head])[1]
        end = next(i for i in range(head, len(lines)) if lines[i] == "}")
        parts = sorted(defs[n] for n in (callee + "_host", callee + "_kernel", callee) if n in defs)
        callers = [i for i, line in enumerate(lines[:heads[1]])
                   if f'callee={json.dumps(callee)}' in line]
        out.append({"name": callee, "ir": [head, end + 1], "code": parts, "callers": callers,
                    "triton": any("@triton.jit" in "\n".join(wrapper.splitlines()[a - 1:b])
                                  for a, b in parts)})
    return out


def op_implementations(wrapper: str, graph) -> dict[str, dict]:
    """kiln op -> the function that runs it ("module:function", its import line in the
    wrapper, the Triton kernels its module defines), from the target the wrapper names."""
    from kiln.backends.targets import get_target
    name = wrapper_target(wrapper)
    try:
        target = get_target(name) if name else None
    except (KeyError, ValueError):
        target = None
    if target is None:
        return {}
    import_lines = {}
    for node in ast.parse(wrapper).body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                import_lines[f"{node.module}:{alias.name}"] = node.lineno
    out = {}
    for op in sorted({n.op for n in graph.nodes if node_kind(n.op) == "fused"}):
        fn = target.kernel(op)
        out[op] = {"fn": fn, "line": import_lines.get(fn), "kernels": triton_kernels_of(fn)}
    return out


def triton_kernels_of(fn: str) -> list[str]:
    """Names of the Triton kernels in the module of "module:function" (what a profiler
    calls them), where that module imports here. kiln names its kernels `*_kernel`; the
    @triton.jit helpers they call are never launched."""
    import importlib
    module = fn.split(":")[0]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    return sorted(name for name, v in vars(mod).items() if name.endswith("kernel")
                  and callable(v) and type(v).__module__.startswith("triton."))


def launches(graph, kernels: list[dict], implementations: dict, prepare=None) -> list[dict]:
    """What one call of the graph runs, from its final IR: per op (per callee for kiln.call)
    how many times and what runs it; view ops launch nothing and are counted together. Nodes
    the weight preparation took out of the graph (`prepare`, prepare_weights.kir) run once
    per set of weights instead, and are counted apart."""
    from kiln.ir import REGISTRY
    from kiln.ir.ops import get_op
    rows: dict = {}
    generated = {k["name"] for k in kernels}

    def count(n, field: str) -> None:
        if n.op == "kiln.call":
            key = n.attrs["callee"]
            runs = "generated kernel" if key in generated else "generated function"
        elif n.op in implementations:
            key, runs = n.op, implementations[n.op]["fn"]
        elif n.op.startswith("sym.") or (n.op in REGISTRY and get_op(n.op).has("view")):
            key, runs = "views and sizes", "no kernel"
        else:
            key, runs = n.op, "torch"
        row = rows.setdefault(key, {"op": key, "kind": node_kind(n.op), "runs": runs,
                                    "count": 0, "per_weights": 0})
        row[field] += 1

    for n in graph.nodes:
        count(n, "count")
    for n in prepare.nodes if prepare is not None else ():
        count(n, "per_weights")
    for row in rows.values():   # the final IR still holds what preparation took out
        row["count"] = max(row["count"] - row["per_weights"], 0)
    return sorted(rows.values(), key=lambda r: (r["runs"] == "no kernel", -r["count"], r["op"]))


# ---------------------------------------------------------------- profiles beside the dump

def read_profile(path: Path) -> dict | None:
    """A step profile (bench/step_profile.py --out) or a `kiln bench serve --json` report
    with its step profile, in the form the page shows; None for any other JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    runs = data.get("runs")
    if isinstance(runs, dict) and runs and all(isinstance(r, dict) and "kernels" in r
                                               for r in runs.values()):
        out = []
        for name, r in runs.items():
            steps = max(int(r.get("runner", {}).get("steps") or 0), 1)
            kernels = [{"name": k["name"], "calls_per_step": k["calls"] / steps,
                        "us_per_call": k["self_us"] / max(k["calls"], 1),
                        "us_per_step": k["self_us"] / steps} for k in r["kernels"]]
            out.append({"name": name, "steps": steps, "phases_us": r.get("phases_us", {}),
                        "wall_ms_per_step": r.get("wall_ms_per_step_profiled"),
                        "kernels": kernels})
        return {"file": str(path), "kind": "steps", "device": data.get("device"),
                "code_version": data.get("code_version"), "runs": out}
    if isinstance(data.get("step_profile"), dict):
        sp = data["step_profile"]
        return {"file": str(path), "kind": "serve", "code_version": data.get("code_version"),
                "command": data.get("command"), "steps": sp.get("steps"),
                "phase_us": {k: v * 1e6 for k, v in (sp.get("phase_s") or {}).items()},
                "step_us": None if sp.get("step_s") is None else sp["step_s"] * 1e6,
                "device_us": None if sp.get("device_s") is None else sp["device_s"] * 1e6,
                "tokens_per_step": sp.get("tokens_per_step"),
                "sequences_per_step": sp.get("sequences_per_step"),
                "error": sp.get("error")}
    return None


def find_profiles(folder: Path | None, given: list[str]) -> list[dict]:
    """The profiles named on the command line (each must be one) and the JSON files in
    `folder` that are (others, such as an artifact's manifest, are not profiles)."""
    out = []
    for name in given:
        profile = read_profile(Path(name))
        if profile is None:
            raise ReportError(f"--profile {name}: not a readable profile; expected a "
                              f"{' or a '.join(PROFILE_KINDS)}")
        out.append(profile)
    if folder is not None:
        for path in sorted(folder.glob("*.json")):
            if str(path) not in given and (profile := read_profile(path)) is not None:
                out.append(profile)
    return out


# ---------------------------------------------------------------- the page

class Blobs:
    """Texts stored once each, deflated and base64-encoded (the page inflates them)."""

    def __init__(self):
        self.data: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, text: str | None) -> int | None:
        if text is None:
            return None
        if text not in self.index:
            self.index[text] = len(self.data)
            self.data.append(base64.b64encode(zlib.compress(text.encode(), 9)).decode())
        return self.index[text]


def _pass_stats_by_position(record: GraphRecord) -> list:
    names = [name for name, _ in record.snapshots[1:]]
    if [s.name for s in record.stats] == names:
        return list(record.stats)
    by_name = {s.name: s for s in record.stats}
    return [by_name.get(name) for name in names]


def analyse(record: GraphRecord, blobs: Blobs, pool: ThreadPoolExecutor, dot: str | None) -> dict:
    """The page's data for one graph. Each pass's "picture" is (layout, note) or, while dot
    lays it out on `pool`, a Future of it (`build_data` waits for them)."""
    from kiln.ir import KilnParseError, parse
    from kiln.passes import PIPELINE
    docs = {p.name: p.doc for p in PIPELINE}
    graphs: dict[str, object] = {}    # IR text -> its Graph (parsed, or a replay's result)
    pictures: dict[str, object] = {}  # IR text -> (layout, note), or a Future of it

    def graph_of(text: str):
        if text not in graphs:
            try:
                graphs[text] = parse(text)
            except KilnParseError as e:
                after = next(name for name, t in record.snapshots if t == text)
                first = str(e).splitlines()[0]
                raise ReportError(f"{record.folder or record.name}: the IR after {after} does "
                                  f"not parse ({first}); a dump of another kiln version? Write "
                                  f"it again") from None
        return graphs[text]

    def picture_of(text: str):
        if dot is None:
            return None, None   # the page's notes say why
        if text not in pictures:
            g = graph_of(text)
            if len(g.nodes) > PICTURE_MAX_NODES:
                pictures[text] = (None, f"{len(g.nodes)} nodes: more than {PICTURE_MAX_NODES}, "
                                        f"too many to lay out; the IR tab has them all")
            else:
                pictures[text] = pool.submit(lay_out, dot, picture_of_graph(g, text))
        return pictures[text]

    stats = _pass_stats_by_position(record)
    passes = []
    for i, (name, text) in enumerate(record.snapshots):
        entry = {"name": name, "doc": docs.get(name, "the graph as captured" if i == 0 else ""),
                 "text": blobs.add(text)}
        if i > 0:
            before = record.snapshots[i - 1][1]
            s = stats[i - 1]
            entry["stats"] = None if s is None else {"rewrites": s.rewrites, "ms": s.seconds * 1e3,
                                                     "nodes": s.nodes_after, "notes": s.notes}
            entry["changed"] = text != before
            entry["diff"] = line_diff(before, text) if entry["changed"] else []
            rule_file = rule_file_of(name)
            if rule_file is not None:
                entry["rule_file"] = f"{rule_file}.kiln"
                try:
                    replay = replay_rules(graph_of(before), before, text, rule_file,
                                          replay_context(record.options))
                except NotReproduced as e:
                    entry["rules_note"] = (
                        f"no per-rule counts: applying rules/{rule_file}.kiln again to the IR "
                        f"before this pass does not give the IR after it ({e}); "
                        f"KILN_PASS_LIMIT may have stopped the pass, it may have seen other "
                        f"compile options, or the rules changed since."
                        if entry["changed"] else
                        f"This pass changed nothing: it applies its rules (rules/{rule_file}.kiln)"
                        f" only under a condition (a target, an option) that did not hold here; "
                        f"applied regardless, they would change the IR.")
                else:
                    graphs.setdefault(text, replay.graph)
                    entry["rules"] = [vars(r) for r in replay.rules]
                    entry["removed_by"] = replay.removed_by
                    entry["added_by"] = replay.added_by
        entry["picture"] = picture_of(text)   # after the replay, which may have built its graph
        passes.append(entry)
    final = record.snapshots[-1][1]
    out = {"name": record.name, "passes": passes, "wrapper": blobs.add(record.wrapper),
           "prepare": blobs.add(record.prepare), "kernels": [], "implementations": {},
           "launches": []}
    if record.wrapper is not None:
        final_graph = graph_of(final)
        out["kernels"] = generated_kernels(record.wrapper, final)
        out["implementations"] = op_implementations(record.wrapper, final_graph)
        out["launches"] = launches(final_graph, out["kernels"], out["implementations"],
                                   parse(record.prepare) if record.prepare else None)
        out["target"] = wrapper_target(record.wrapper)
    return out


def build_data(comp: Compilation, profiles: list[dict] | None = None,
               dot: str | None = "dot", start_pass: int | None = None) -> dict:
    """Everything the page shows, as JSON-able data. `dot`: Graphviz's dot, found on PATH
    (None, or not found: no pictures, and the page says why). `start_pass`: the pass of
    the first graph the page opens at (default: the overview)."""
    import kiln
    from kiln.passes.rules import RULES_DIR
    dot = shutil.which(dot) if dot else None
    blobs = Blobs()
    notes = []
    if dot is None:
        notes.append("No graph pictures: Graphviz's dot is not installed here (Debian/Ubuntu: "
                     "apt-get install graphviz; macOS: brew install graphviz). Run kiln report "
                     "again once it is.")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        graphs = [analyse(g, blobs, pool, dot) for g in comp.graphs]
        for g in graphs:
            for p in g["passes"]:
                picture = p["picture"]
                layout, note = picture.result() if isinstance(picture, Future) else picture
                p["picture"], p["picture_note"] = blobs.add(layout), note
    rule_files = sorted({p["rule_file"] for g in graphs for p in g["passes"] if "rule_file" in p})
    rules = {f: {"path": str(RULES_DIR.joinpath(f)),
                 "text": blobs.add(RULES_DIR.joinpath(f).read_text())} for f in rule_files}
    return {"title": f"kiln report: {comp.source}", "source": comp.source,
            "details": comp.details, "kiln": kiln.__version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": notes,
            "fallbacks": comp.fallbacks, "timings": blobs.add(comp.timings),
            "graphs": graphs, "rules": rules,
            "profiles": profiles or [], "kinds": {k: list(v) for k, v in KINDS.items()},
            "start": None if start_pass is None else f"g0/p{start_pass}",
            "blobs": blobs.data}


def render(data: dict) -> str:
    """The page: report.html with `data` in it (a JSON script element, so no `</` in it)."""
    page = files("kiln").joinpath("report.html").read_text()
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return page.replace("/*KILN_REPORT_DATA*/", blob, 1)


def write_report(comp: Compilation, output: str | os.PathLike,
                 profiles: list[dict] | None = None) -> dict:
    """Writes the page to `output` (via a temporary file, so never half-written); returns
    the data it holds."""
    data = build_data(comp, profiles)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its file is private (0600); the page gets the umask's mode, as any file.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render(data))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return data
