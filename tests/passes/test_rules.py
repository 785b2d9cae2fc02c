"""The rewrite-rule language and its matcher, on hand-written IR: what matches, what must
not, how the rewrite keeps values (checked with the reference interpreter), and the
errors a rule author sees."""
from __future__ import annotations

import re
import textwrap

import pytest
import torch

from kiln.ir import parse, print_graph, run, verify
from kiln.passes import PassContext
from kiln.passes import rules as rules_mod
from kiln.passes.pattern import KilnRuleError, PatternBuilder, apply_patterns
from kiln.passes.rules import apply_rules, list_rules, load_rules, parse_rules, rule_files

RMS_RULE = """
// x * rsqrt(mean(x^2) + eps) * w
rule rms {
  match (%x, %w, $eps) {
    %xf = cast?(%x)
    %0 = aten.pow(%xf, 2)
    %1 = aten.mean(%0, dim=[-1], keepdim=true)
    %2 = aten.add(%1, $eps)
    %3 = aten.rsqrt(%2)
    %4 = aten.mul(%xf, %3)
    %5 = aten.mul(%w, cast?(%4))
    yield %5
  }
  where rank(%w) == 1, dim(%w, 0) == dim(%x, -1), is_float($eps), $eps > 0, $eps < 0.1
  where dtype(%x) in {f32, bf16, f16}, dtype(%w) == dtype(%x)
  replace {
    %r = kiln.rms_norm(%x, %w, eps=$eps)
    yield %r
  }
}
"""

RMS_GRAPH = """func @f(%x: f32[s0, 16], %w: f32[16]) -> f32[s0, 16]
    where s0 in [1, 64] {
  %0 = aten.pow(%x, 2) : f32[s0, 16]
  %1 = aten.mean(%0, dim=[-1], keepdim=true) : f32[s0, 1]
  %2 = aten.add(%1, EPS) : f32[s0, 1]
  %3 = aten.rsqrt(%2) : f32[s0, 1]
  %4 = aten.mul(MUL_A, MUL_B) : f32[s0, 16]
  %5 = aten.mul(%w, %4) : f32[s0, 16]
  return %5
}
"""


def graph(eps="1e-06", mul=("%x", "%3")):
    return parse(RMS_GRAPH.replace("EPS", eps).replace("MUL_A", mul[0]).replace("MUL_B", mul[1]))


def inputs(g):
    return [torch.randn(5, *[d if isinstance(d, int) else 5 for d in v.type.shape][1:],
                        dtype=v.type.dtype) if v.type.rank > 1 else
            torch.randn(v.type.shape[0], dtype=v.type.dtype) for v in g.inputs]


def rewrite_keeps_values(g, patterns, ins=None, tol=1e-6, **kw) -> int:
    ins = ins or inputs(g)
    before = run(g, ins)
    n = apply_patterns(g, patterns, **kw)
    verify(g)
    after = run(g, ins)
    for a, b in zip(before, after):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < tol, (rel, print_graph(g))
    return n


def ops(g):
    return [n.op for n in g.nodes]


# ---------------------------------------------------------------- matching

def test_rule_fuses_and_keeps_values():
    g = graph()
    assert rewrite_keeps_values(g, parse_rules(RMS_RULE)) == 1
    assert ops(g) == ["kiln.rms_norm"]
    assert g.nodes[0].attrs == {"eps": 1e-06}


def test_commutative_operands_match_in_either_order():
    g = graph(mul=("%3", "%x"))
    assert rewrite_keeps_values(g, parse_rules(RMS_RULE)) == 1
    assert ops(g) == ["kiln.rms_norm"]


def test_optional_casts_match_present_or_absent():
    bf16 = parse("""func @f(%x: bf16[3, 16], %w: bf16[16]) -> bf16[3, 16] {
  %0 = aten._to_copy(%x, dtype=f32) : f32[3, 16]
  %1 = aten.pow(%0, 2) : f32[3, 16]
  %2 = aten.mean(%1, dim=[-1], keepdim=true) : f32[3, 1]
  %3 = aten.add(%2, 1e-05) : f32[3, 1]
  %4 = aten.rsqrt(%3) : f32[3, 1]
  %5 = aten.mul(%0, %4) : f32[3, 16]
  %6 = prims.convert_element_type(%5, dtype=bf16) : bf16[3, 16]
  %7 = aten.mul(%w, %6) : bf16[3, 16]
  return %7
}
""")
    pats = parse_rules(RMS_RULE)
    assert rewrite_keeps_values(bf16, pats, tol=1e-2) == 1
    assert ops(bf16) == ["kiln.rms_norm"]
    g = graph()
    assert apply_patterns(g, pats) == 1


def test_interior_value_used_outside_blocks_the_rewrite():
    text = RMS_GRAPH.replace("EPS", "1e-06").replace("MUL_A", "%x").replace("MUL_B", "%3")
    text = text.replace("-> f32[s0, 16]", "-> (f32[s0, 16], f32[s0, 1])").replace(
        "return %5", "return %5, %3")
    g = parse(text)
    pats = parse_rules(RMS_RULE)
    assert apply_patterns(g, pats) == 0
    with pytest.raises(KilnRuleError, match=r"rule rms: matched nothing.*is a graph output"):
        apply_patterns(g, pats, require_match=True)
    verify(g)
    assert "kiln.rms_norm" not in ops(g)
    g = parse(text.replace("return %5, %3", "%6 = aten.neg(%3) : f32[s0, 1]\n  return %5, %6"))
    with pytest.raises(KilnRuleError, match=r"interior value %3 \(aten.rsqrt\) is also used "
                                           r"by aten.neg outside the match"):
        apply_patterns(g, pats, require_match=True)
    verify(g)


def test_where_constraints_reject():
    pats = parse_rules(RMS_RULE)
    g = graph(eps="0.5")                      # $eps < 0.1 fails
    assert apply_patterns(g, pats) == 0
    with pytest.raises(KilnRuleError, match=r"where \$eps < 0.1. is false"):
        apply_patterns(g, pats, require_match=True)
    g = parse(RMS_GRAPH.replace("EPS", "1e-06").replace("MUL_A", "%x").replace("MUL_B", "%3")
              .replace("%w: f32[16]", "%w: f32[1]").replace("aten.mul(%w, %4) : f32[s0, 16]",
                                                            "aten.mul(%w, %4) : f32[s0, 16]"))
    assert apply_patterns(g, pats) == 0      # dim(%w, 0) == dim(%x, -1) fails


def test_attributes_must_match_unless_default_or_ellipsis():
    text = """func @f(%x: f32[4, 8]) -> f32[4, 1] {
  %0 = aten.mean(%x, dim=[-1], keepdim=true, dtype=f32) : f32[4, 1]
  %1 = aten.neg(%0) : f32[4, 1]
  return %1
}
"""
    strict = """rule r { match (%x) { %0 = aten.mean(%x, dim=[-1], keepdim=true) %1 = aten.neg(%0)
      yield %1 } replace { %r = aten.sum(%x, dim=[-1], keepdim=true) %s = aten.div(%r, -8)
      yield %s } }"""
    loose = strict.replace("keepdim=true)", "keepdim=true, ...)", 1)
    g = parse(text)
    assert apply_patterns(g, parse_rules(strict)) == 0      # the node also has dtype=
    assert rewrite_keeps_values(g, parse_rules(loose)) == 1
    # `default`: a node without the attribute matches as if it had the default
    g = parse(text.replace(", keepdim=true, dtype=f32", ", keepdim=true"))
    dflt = strict.replace("aten.mean(%x, dim=[-1], keepdim=true)",
                          "aten.mean(%x, dim=[-1], keepdim=true, dtype=$d default none)")
    dflt = dflt.replace("match (%x)", "match (%x, $d)")
    assert rewrite_keeps_values(g, parse_rules(dflt)) == 1


def test_multi_output_pattern_keeps_outside_uses_of_yielded_values():
    g = parse("""func @f(%x: f32[3, 16], %r: f32[3, 16], %w: f32[16]) -> (f32[3, 16], f32[3, 16]) {
  %0 = aten.add(%r, %x) : f32[3, 16]
  %1 = kiln.rms_norm(%0, %w, eps=1e-06) : f32[3, 16]
  %2 = aten.mul(%0, 2.0) : f32[3, 16]
  return %1, %2
}
""")
    pats = [p for p in load_rules("norm") if p.name == "fused_add_rms_norm"]
    assert rewrite_keeps_values(g, pats) == 1
    assert ops(g) == ["kiln.fused_add_rms_norm", "aten.mul"]
    assert g.nodes[1].args[0] is g.nodes[0].results[1]


def test_yielded_value_used_before_the_match_end_is_placed_before_its_user():
    # the sum's outside user sits between the add and the norm
    g = parse("""func @f(%x: f32[3, 16], %r: f32[3, 16], %w: f32[16]) -> (f32[3, 16], f32[3, 16]) {
  %0 = aten.add(%r, %x) : f32[3, 16]
  %1 = aten.mul(%0, 2.0) : f32[3, 16]
  %2 = kiln.rms_norm(%0, %w, eps=1e-06) : f32[3, 16]
  return %2, %1
}
""")
    pats = [p for p in load_rules("norm") if p.name == "fused_add_rms_norm"]
    assert rewrite_keeps_values(g, pats) == 1
    assert ops(g) == ["kiln.fused_add_rms_norm", "aten.mul"]


def test_shared_statement_may_have_other_users_and_stays():
    g = parse("""func @f(%a: f32[4], %b: f32[4], %c: f32[4]) -> (f32[4], f32[4]) {
  %0 = aten.exp(%c) : f32[4]
  %1 = aten.mul(%a, %0) : f32[4]
  %2 = aten.mul(%b, %0) : f32[4]
  %3 = aten.neg(%1) : f32[4]
  %4 = aten.neg(%2) : f32[4]
  return %3, %4
}
""")
    rule = """rule neg_mul_exp {
  match (%x, %c) {
    shared %e = aten.exp(%c)
    %m = aten.mul(%x, %e)
    %n = aten.neg(%m)
    yield %n
  }
  replace { %e2 = aten.exp(%c) %r = aten.mul(%x, %e2) %s = aten.mul(%r, -1.0) yield %s }
}"""
    unshared = rule.replace("shared %e", "%e")
    assert apply_patterns(parse(print_graph(g)), parse_rules(unshared)) == 0
    assert rewrite_keeps_values(g, parse_rules(rule)) == 2


def test_optional_op_and_fragment_with_guarded_constraints():
    rules = """
fragment scaled {
  match (%v, $s) { %0 = aten.mul(%v, $s) yield %0 }
  where $s > 0
}
rule exp_of_scaled {
  match (%x) {
    %a = scaled?(%x)
    %b = aten.exp(%a)
    %c = aten.relu?(%b)
    yield %c
  }
  where not present(%c)
  replace { %r = aten.sigmoid(%x) yield %r }
}
"""
    pats = parse_rules(rules)

    def after(scale):
        g = parse(f"""func @f(%x: f32[4]) -> f32[4] {{
  %0 = aten.mul(%x, {scale}) : f32[4]
  %1 = aten.exp(%0) : f32[4]
  return %1
}}
""")
        assert apply_patterns(g, pats) == 1
        verify(g)
        return ops(g), g
    # present: the fragment's `where $s > 0` holds and the mul is part of the match
    assert after("2.0")[0] == ["aten.sigmoid"]
    # -2 fails the fragment's condition: it is absent, and %x binds to the mul's result
    got, g = after("-2.0")
    assert got == ["aten.mul", "aten.sigmoid"] and g.nodes[1].args[0] is g.nodes[0].results[0]
    # the optional relu: `where not present(%c)` rejects the match that covers it
    g = parse("""func @f(%x: f32[4]) -> f32[4] {
  %0 = aten.exp(%x) : f32[4]
  %1 = aten.relu(%0) : f32[4]
  return %1
}
""")
    assert apply_patterns(g, pats) == 1
    assert ops(g) == ["aten.sigmoid", "aten.relu"]


def test_a_rule_never_rewrites_its_own_output():
    same = parse_rules("rule same { match (%x) { %0 = aten.exp(%x) yield %0 } "
                       "replace { %r = aten.exp(%x) yield %r } }")
    g = parse("""func @f(%x: f32[4]) -> f32[4] {
  %0 = aten.exp(%x) : f32[4]
  return %0
}
""")
    assert apply_patterns(g, same) == 1


def test_python_pattern_api_ends_in_the_same_matcher():
    p = PatternBuilder("rms_py")
    x, w = p.inputs("x", "w")
    eps = p.const("eps")
    xf = p.cast(x)
    sq = p.op("aten.pow", xf, 2)
    mean = p.op("aten.mean", sq, dim=[-1], keepdim=True)
    r = p.op("aten.rsqrt", p.op("aten.add", mean, eps))
    out = p.op("aten.mul", w, p.cast(p.op("aten.mul", xf, r)))
    p.where(lambda m: m["eps"] < 0.1, "$eps < 0.1")
    p.replace(lambda m, b: b.op("kiln.rms_norm", m["x"], m["w"], eps=m["eps"]))
    pattern = p.build(out)
    a, b = graph(), graph()
    assert apply_patterns(a, [pattern]) == 1
    assert apply_patterns(b, parse_rules(RMS_RULE)) == 1
    assert print_graph(a) == print_graph(b)


def test_pass_limit_bounds_rewrites():
    text = RMS_GRAPH.replace("EPS", "1e-06").replace("MUL_A", "%x").replace("MUL_B", "%3")
    two = text.replace("-> f32[s0, 16]", "-> (f32[s0, 16], f32[s0, 16])").replace(
        "  return %5\n", "  %6 = aten.mul(%x, 3.0) : f32[s0, 16]\n"
                        "  %7 = aten.pow(%6, 2) : f32[s0, 16]\n"
                        "  %8 = aten.mean(%7, dim=[-1], keepdim=true) : f32[s0, 1]\n"
                        "  %9 = aten.add(%8, 1e-06) : f32[s0, 1]\n"
                        "  %10 = aten.rsqrt(%9) : f32[s0, 1]\n"
                        "  %11 = aten.mul(%6, %10) : f32[s0, 16]\n"
                        "  %12 = aten.mul(%w, %11) : f32[s0, 16]\n"
                        "  return %5, %12\n")
    g = parse(two)
    ctx = PassContext(rewrite_limit=1)
    assert apply_patterns(g, parse_rules(RMS_RULE), ctx) == 1
    verify(g)
    assert ops(g).count("kiln.rms_norm") == 1
    assert apply_patterns(parse(two), parse_rules(RMS_RULE)) == 2


# ---------------------------------------------------------------- errors

def test_syntax_error_names_rule_line_and_column():
    bad = RMS_RULE.replace("%3 = aten.rsqrt(%2)", "%3 = aten.rsqrt(%2")
    with pytest.raises(KilnRuleError) as e:
        parse_rules(bad, "bad.kiln")
    msg = str(e.value)
    line = bad.splitlines().index("    %4 = aten.mul(%xf, %3)") + 1
    assert re.match(rf"bad\.kiln:{line}:\d+: rule rms: unexpected", msg), msg
    assert e.value.line == line and e.value.column is not None and e.value.rule == "rms"


@pytest.mark.parametrize("edit, pattern", [
    (("aten.rsqrt(%2)", "aten.rsqrtt(%2)"), r"rule rms: .*unknown op aten.rsqrtt"),
    (("aten.pow(%xf, 2)", "aten.pow(%zz, 2)"), r"rule rms: %zz is used before it is defined"),
    (("match (%x, %w, $eps)", "match (%x, %w, %u, $eps)"), r"parameter %u is never used"),
    (("%r = kiln.rms_norm(%x, %w, eps=$eps)", "%r = kiln.rms_norm(%3, %w, eps=$eps)"),
     r"%3 is removed by the rewrite"),
    (("    yield %r\n", "    yield %r, %r\n"), r"yields 1 values, the replacement 2"),
    (("where rank(%w) == 1", "where rnk(%w) == 1"), r"unknown function rnk"),
])
def test_semantic_errors_are_located(edit, pattern):
    bad = RMS_RULE.replace(*edit)
    assert bad != RMS_RULE
    with pytest.raises(KilnRuleError, match=pattern) as e:
        parse_rules(bad, "bad.kiln")
    assert e.value.line is not None and str(e.value).startswith("bad.kiln:")


def test_unreachable_statement_is_an_error():
    bad = RMS_RULE.replace("    %5 = aten.mul", "    %9 = aten.neg(%x)\n    %5 = aten.mul")
    with pytest.raises(KilnRuleError, match=r"rule rms: .*not reachable from the first yield"):
        parse_rules(bad)


def test_replacement_of_the_wrong_type_fails_cleanly():
    bad = RMS_RULE.replace("%r = kiln.rms_norm(%x, %w, eps=$eps)\n    yield %r",
                           "%q = kiln.rms_norm(%x, %w, eps=$eps)\n"
                           "    %r = aten._to_copy(%q, dtype=f16)\n    yield %r")
    g = graph()
    before = print_graph(g)
    with pytest.raises(KilnRuleError, match=r"rule rms: the replacement yields f16\[s0, 16\] "
                                           r"for %5, which has type f32\[s0, 16\]"):
        apply_patterns(g, parse_rules(bad))
    assert print_graph(g) == before
    verify(g)


def test_rule_matching_nothing_says_how_far_it_got():
    g = parse(RMS_GRAPH.replace("EPS", "1e-06").replace("MUL_A", "%x").replace("MUL_B", "%3")
              .replace("aten.rsqrt(%2)", "aten.sqrt(%2)"))
    with pytest.raises(KilnRuleError, match=r"rule rms: matched nothing in @f.*aten\.sqrt"):
        apply_patterns(g, parse_rules(RMS_RULE), require_match=True)
    verify(g)


# ---------------------------------------------------------------- the packaged rules

def test_packaged_rule_files_load_and_list():
    files = rule_files()
    assert {"norm", "rope", "attention", "activation", "moe", "quant", "quantize"} <= set(files)
    listed = list_rules()   # one line per rule, not per spelling
    assert len(listed) == sum(len({p.name for p in load_rules(f)}) for f in files)
    assert len(load_rules("attention")) > len({p.name for p in load_rules("attention")})
    for file, name, doc in listed:
        assert file.endswith(".kiln") and name and doc, (file, name)


def test_docstring_example_is_a_valid_rule():
    doc = rules_mod.__doc__
    start = doc.index("    // Llama RMSNorm")
    end = doc.index("\nReference")
    (pat,) = parse_rules(textwrap.dedent(doc[start:end]))
    g = graph()
    assert rewrite_keeps_values(g, [pat]) == 1


def test_apply_rules_from_a_file(tmp_path):
    path = tmp_path / "mine.kiln"
    path.write_text(RMS_RULE)
    g = graph()
    assert apply_rules(g, str(path)) == 1
    with pytest.raises(KilnRuleError, match=r"mine\.kiln:\d+: rule rms: matched nothing"):
        apply_rules(g, str(path))


# -- optional ops name what stands for them; constraints and caps fail loudly ----------------------
WHERE_NEG = """
rule sigmoid_of_negated_select {
  match (%m, %z, %v) {
    %0 = aten.where?(%m, %z, %v) PASSTHROUGH
    %1 = aten.neg(%0)
    yield %1
  }
  replace { %r = aten.sigmoid(%v) yield %r }
}
"""


def test_an_absent_optional_op_stands_for_the_operand_named_by_else():
    pats = parse_rules(WHERE_NEG.replace("PASSTHROUGH", "else %v"))
    g = parse("""func @f(%x: f32[4]) -> f32[4] {
  %0 = aten.neg(%x) : f32[4]
  return %0
}
""")
    assert apply_patterns(g, pats) == 1
    (node,) = g.nodes   # sigmoid of %x itself: %v took the negated value, %m and %z none
    assert node.op == "aten.sigmoid" and node.args[0] is g.inputs[0]
    g = parse("""func @f(%c: bool[4], %x: f32[4], %y: f32[4]) -> f32[4] {
  %0 = aten.where(%c, %x, %y) : f32[4]
  %1 = aten.neg(%0) : f32[4]
  return %1
}
""")
    assert apply_patterns(g, pats) == 1
    (node,) = g.nodes
    assert node.op == "aten.sigmoid" and node.args[0] is g.inputs[2]


@pytest.mark.parametrize("passthrough,error", [
    ("", r":4:10: rule sigmoid_of_negated_select: optional aten.where\? has 3 value operands: "
         r"name the one .* else %v"),
    ("else %w", r":4:39: .*`else %w`: %w must be one of aten.where's operands"),
])
def test_optional_op_misuse_is_a_located_error(passthrough, error):
    with pytest.raises(KilnRuleError, match=error):
        parse_rules(WHERE_NEG.replace("PASSTHROUGH", passthrough))
    with pytest.raises(KilnRuleError, match=r"`else` follows an optional op only"):
        parse_rules("rule r { match (%x) { %0 = aten.neg(%x) else %x yield %0 } "
                    "replace { %r = aten.relu(%x) yield %r } }")


def test_a_constraint_that_raises_is_a_located_error():
    rule = """
rule typo {
  match (%x) {
    %0 = aten.relu(%x)
    yield %0
  }
  where dim(%x, 7) == 4
  replace { %r = aten.sigmoid(%x) yield %r }
}
"""
    g = parse("func @f(%x: f32[4]) -> f32[4] {\n  %0 = aten.relu(%x) : f32[4]\n  return %0\n}\n")
    with pytest.raises(KilnRuleError, match=r":7: rule typo: `where dim\(%x, 7\) == 4` raised "
                                            r"IndexError.*\(matching %0 in @f\)"):
        apply_patterns(g, parse_rules(rule))
    assert [n.op for n in g.nodes] == ["aten.relu"]   # nothing was rewritten


def test_hitting_a_cap_is_noted_in_the_pass_stats(monkeypatch):
    from kiln.passes.manager import PassStats
    from kiln.passes.pattern import Matcher
    pats = parse_rules("rule relu_relu { match (%x) { %0 = aten.relu(%x) %1 = aten.relu(%0) "
                       "yield %1 } replace { %r = aten.relu(%x) yield %r } }")
    chain = "\n".join(f"  %{i + 1} = aten.relu(%{i}) : f32[4]" for i in range(8))
    text = f"func @f(%0: f32[4]) -> f32[4] {{\n{chain}\n  return %8\n}}\n"
    ctx = PassContext()
    assert apply_patterns(parse(text), pats, ctx, max_rounds=1) >= 1
    assert len(ctx.notes) == 1 and "relu_relu: still rewriting after 1 rounds in @f" in ctx.notes[0]
    ctx = PassContext()
    apply_patterns(parse(text), pats, ctx)
    assert ctx.notes == []   # the default rounds finish the chain
    monkeypatch.setattr(Matcher, "MAX_STATES", 0)
    ctx = PassContext()
    assert apply_patterns(parse(text), pats, ctx) == 0
    assert "relu_relu: gave up on" in ctx.notes[0] and "a match there may be missed" in ctx.notes[0]
    assert "note: rule relu_relu: gave up" in str(PassStats("fuse.x", 0, 0.0, 8, ctx.notes))


# -- one rule, several spellings ---------------------------------------------------------------------
SPELLINGS = """
// exp of x, maybe scaled first
rule scaled_exp {
  match (%x, $s) {
    %0 = aten.mul(%x, $s)
    %1 = aten.exp(%0)
    yield %1
  }
  match (%x) {
    %1 = aten.exp(%x)
    yield %1
  }
  where is_none($s) or $s > 0
  replace {
    %a = aten.mul(%x, coalesce($s, 1.0))
    %r = aten.sigmoid(%a)
    yield %r
  }
}
"""


def test_a_rule_with_several_spellings_shares_its_conditions_and_replacement():
    pats = parse_rules(SPELLINGS)
    assert [p.name for p in pats] == ["scaled_exp", "scaled_exp"] and pats[1].params == ["%x", "$s"]
    assert pats[0].doc == pats[1].doc == "exp of x, maybe scaled first"

    def rewritten(body):
        g = parse(f"func @f(%x: f32[4]) -> f32[4] {{\n{body}\n}}\n")
        assert apply_rules(g, SPELLINGS) == 1   # (require_match: the rule as a whole matched)
        verify(g)
        return [(n.op, n.args[1:]) for n in g.nodes]
    assert rewritten("  %0 = aten.mul(%x, 2.0) : f32[4]\n  %1 = aten.exp(%0) : f32[4]\n  return %1") \
        == [("aten.mul", [2.0]), ("aten.sigmoid", [])]
    # the second spelling: $s is none in it, for `where` and the replacement alike
    assert rewritten("  %0 = aten.exp(%x) : f32[4]\n  return %0") == [("aten.mul", [1.0]), ("aten.sigmoid", [])]
    g = parse("func @f(%x: f32[4]) -> f32[4] {\n  %0 = aten.relu(%x) : f32[4]\n  return %0\n}\n")
    with pytest.raises(KilnRuleError, match="rule scaled_exp: matched nothing in @f"):
        apply_rules(g, SPELLINGS)


def test_each_spelling_is_checked_on_its_own():
    unused = SPELLINGS.replace("match (%x) {", "match (%x, $t) {")
    with pytest.raises(KilnRuleError, match=r"parameter \$t is never used in the match"):
        parse_rules(unused)
    two = SPELLINGS.replace("    %1 = aten.exp(%x)\n    yield %1", "    %1 = aten.exp(%x)\n    yield %1, %1")
    with pytest.raises(KilnRuleError, match=r":9:3: rule scaled_exp: the match yields 2 values, "
                                            r"the replacement 1"):
        parse_rules(two)


RELU_GRAPH = "func @f(%x: f32[8]) -> f32[8] {\n  %0 = aten.relu(%x) : f32[8]\n  return %0\n}\n"


def test_replace_when_picks_the_first_block_whose_condition_holds(monkeypatch):
    monkeypatch.setattr(rules_mod, "FUNCTIONS", dict(rules_mod.FUNCTIONS))
    monkeypatch.setattr(rules_mod, "_CONTEXT_FUNCTIONS", set(rules_mod._CONTEXT_FUNCTIONS))
    rule = """
rule relu_by_option {
  match (%x) {
    %0 = aten.relu(%x)
    yield %0
  }
  replace when option_is("sig") { %r = aten.sigmoid(%x) yield %r }
  replace when option_is("neg") { %r = aten.neg(%x) yield %r }
  replace { %r = aten.tanh(%x) yield %r }
}
"""
    rules_mod.register_function("option_is", lambda cx, v: cx.options.get("mode") == v,
                                context=True)
    pats = parse_rules(rule)
    for mode, op in (("sig", "aten.sigmoid"), ("neg", "aten.neg"), (None, "aten.tanh")):
        g = parse(RELU_GRAPH)
        assert apply_patterns(g, pats, PassContext({"mode": mode})) == 1
        assert ops(g) == [op]


def test_replace_when_errors_are_located():
    head = "rule r {\n  match (%x) {\n    %0 = aten.relu(%x)\n    yield %0\n  }\n"
    with pytest.raises(KilnRuleError, match=r":6:3: rule r: only the last replace block may go "
                                            r"without `when`"):
        parse_rules(head + "  replace { %r = aten.neg(%x) yield %r }\n"
                           "  replace { %r = aten.tanh(%x) yield %r }\n}\n")
    with pytest.raises(KilnRuleError, match=r":6:16: rule r: the last replace block takes no `when`"):
        parse_rules(head + "  replace when rank(%x) == 1 { %r = aten.neg(%x) yield %r }\n}\n")
    pats = parse_rules(head + "  replace when dim(%x, 3) == 1 { %r = aten.neg(%x) yield %r }\n"
                              "  replace { %r = aten.tanh(%x) yield %r }\n}\n")
    g = parse(RELU_GRAPH)
    with pytest.raises(KilnRuleError, match=r":6:16: rule r: `when dim\(%x, 3\) == 1` raised "
                                            r"IndexError"):
        apply_patterns(g, pats)
    assert ops(g) == ["aten.relu"]   # untouched


def test_lm_head_and_router_predicates_see_the_uses():
    rule = """
rule mark_head {
  match (%x, %w) {
    %0 = aten.mm(%x, %w)
    yield %0
  }
  where is_lm_head(%0), not feeds_router(%0)
  replace { %r = aten.matmul(%x, %w) yield %r }
}
"""
    pats = parse_rules(rule)
    text = """func @f(%x: f32[4, 8], %w: f32[8, 16], %v: f32[8, 16]) -> (f32[4, 16], f32[4, 2], i64[4, 2]) {
  %0 = aten.mm(%x, %w) : f32[4, 16]
  %1 = aten.mm(%x, %v) : f32[4, 16]
  %2, %3 = aten.topk(%1, k=2) : (f32[4, 2], i64[4, 2])
  %4 = aten.mm(%x, %w) : f32[4, 16]
  %5 = aten.relu(%4) : f32[4, 16]
  return %0, %2, %3
}
"""
    g = parse(text)
    assert apply_patterns(g, pats) == 1   # %0 only: %1 feeds top-k, %4 is not an output
    assert ops(g).count("aten.matmul") == 1 and ops(g).count("aten.mm") == 2


def test_functions_registered_from_python_are_usable_in_conditions(monkeypatch):
    monkeypatch.setattr(rules_mod, "FUNCTIONS", dict(rules_mod.FUNCTIONS))
    rule = """
rule relu_of_wide {
  match (%x) {
    %0 = aten.relu(%x)
    yield %0
  }
  where is_wide(%x, 8)
  replace { %r = aten.sigmoid(%x) yield %r }
}
"""
    with pytest.raises(KilnRuleError, match=r":7:9: rule relu_of_wide: unknown function is_wide"):
        parse_rules(rule)
    rules_mod.register_function("is_wide", lambda v, n: v.type.shape[-1] >= n)
    pats = parse_rules(rule)
    for width, fused in ((8, ["aten.sigmoid"]), (4, ["aten.relu"])):
        g = parse(f"func @f(%x: f32[{width}]) -> f32[{width}] {{\n  %0 = aten.relu(%x) : f32[{width}]\n"
                  f"  return %0\n}}\n")
        apply_patterns(g, pats)
        assert ops(g) == fused
    with pytest.raises(ValueError, match="is_wide is already defined; pass replace=True"):
        rules_mod.register_function("is_wide", len)
    with pytest.raises(ValueError, match="'where' is not a name a rule can call"):
        rules_mod.register_function("where", len)


def test_an_op_alternation_is_one_spelling_per_op():
    rule = """
rule neg_of_reduction {
  match (%x, $d) {
    %0 = aten.{amax, amin}(%x, dim=$d, keepdim=true)
    %1 = aten.{neg, relu}(%0)
    yield %1
  }
  replace { %r = aten.amax(%x, dim=$d, keepdim=true) yield %r }
}
"""
    pats = parse_rules(rule)
    assert len(pats) == 4 and {(p.stmts[0].op, p.stmts[1].op) for p in pats} == {
        ("aten.amax", "aten.neg"), ("aten.amax", "aten.relu"), ("aten.amin", "aten.neg"),
        ("aten.amin", "aten.relu")}
    for red, act in (("amin", "relu"), ("amax", "neg")):
        g = parse(f"""func @f(%x: f32[2, 4]) -> f32[2, 1] {{
  %0 = aten.{red}(%x, dim=[-1], keepdim=true) : f32[2, 1]
  %1 = aten.{act}(%0) : f32[2, 1]
  return %1
}}
""")
        assert apply_rules(g, rule) == 1 and ops(g) == ["aten.amax"]
    with pytest.raises(KilnRuleError, match=r":4:10: rule neg_of_reduction: .*aten.amaxx"):
        parse_rules(rule.replace("amax, amin", "amaxx, amin"))
    with pytest.raises(KilnRuleError, match=r"an op alternation may stand in a rule's match only"):
        parse_rules("fragment f { match (%x) { %0 = aten.{neg, relu}(%x) yield %0 } }")


def test_an_alternation_of_whole_names_and_a_custom_op_not_registered_yet():
    """`{a.b, c.d.e}` alternates whole op names. A spelling that is a torch custom op no
    library has registered yet (no graph can hold it) still parses, and matches a graph
    that holds it; a misspelt kiln or aten op in an alternation is still an error, as is
    an unregistered custom op outside one."""
    rule = """
rule abs_or_custom_to_neg {
  match (%x) {
    %0 = {aten.abs, torch.kiln_test_ns.not_registered.default}(%x)
    yield %0
  }
  replace { %r = aten.neg(%x) yield %r }
}
"""
    pats = parse_rules(rule)
    assert [p.stmts[0].op for p in pats] == ["aten.abs", "torch.kiln_test_ns.not_registered.default"]
    g = parse("func @f(%x: f32[4]) -> f32[4] {\n  %0 = aten.abs(%x) : f32[4]\n  return %0\n}\n")
    assert apply_rules(g, rule) == 1 and ops(g) == ["aten.neg"]
    with pytest.raises(KilnRuleError, match=r"aten.abss"):
        parse_rules(rule.replace("aten.abs,", "aten.abss,"))
    with pytest.raises(KilnRuleError, match=r"torch has no operator kiln_test_ns.not_registered"):
        parse_rules(rule.replace("{aten.abs, torch.kiln_test_ns.not_registered.default}",
                                 "torch.kiln_test_ns.not_registered.default"))


def test_a_replacement_asks_present_of_an_optional_interior_value():
    rule = """
rule relu_maybe_scaled {
  match (%x, %s) {
    %0 = aten.mul?(%x, %s) else %x
    %1 = aten.relu(%0)
    yield %1
  }
  replace { %r = aten.mul(%x, float(present(%0)) + 1.0) yield %r }
}
"""
    for body, factor in (("  %0 = aten.mul(%x, %s) : f32[4]\n  %1 = aten.relu(%0) : f32[4]\n", 2.0),
                         ("  %1 = aten.relu(%x) : f32[4]\n", 1.0)):
        g = parse(f"func @f(%x: f32[4], %s: f32[4]) -> f32[4] {{\n{body}  return %1\n}}\n")
        assert apply_rules(g, rule) == 1
        (n,) = g.nodes
        assert n.op == "aten.mul" and n.args[1] == factor
    with pytest.raises(KilnRuleError, match=r"%0 is removed by the rewrite"):
        parse_rules(rule.replace("float(present(%0))", "%0"))


def test_moe_rules_load_without_transformers():
    """rules/moe.kiln names transformers' grouped_mm_fallback custom op, which exists only
    once transformers is imported: loading the rules must not need it."""
    import subprocess
    import sys
    code = ("import sys; from kiln.passes.rules import load_rules; "
            "pats = load_rules('moe'); assert 'transformers' not in sys.modules; print(len(pats))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == 8   # (2 grouped_mm spellings)^2 x 2 of empty_permuted


def test_a_named_condition_is_declared_once_and_used_in_several_rules():
    rules = """
// the operand is a float vector at least $n long
condition wide_float(%v, $n) {
  rank(%v) == 1, dim(%v, 0) >= $n,
  dtype(%v) in {f32, bf16}
}
rule relu_wide { match (%x) { %0 = aten.relu(%x) yield %0 }
  where wide_float(%x, 8)
  replace { %r = aten.sigmoid(%x) yield %r } }
rule neg_wide { match (%x, $k) { %0 = aten.mul(%x, $k) %1 = aten.neg(%0) yield %1 }
  where wide_float(%x, $k)
  replace { %r = aten.sigmoid(%x) yield %r } }
"""
    pats = parse_rules(rules)
    for width, want in ((8, ["aten.sigmoid", "aten.sigmoid"]), (4, ["aten.relu", "aten.sigmoid"])):
        g = parse(f"""func @f(%x: f32[{width}]) -> (f32[{width}], f32[{width}]) {{
  %0 = aten.relu(%x) : f32[{width}]
  %1 = aten.mul(%x, 4) : f32[{width}]
  %2 = aten.neg(%1) : f32[{width}]
  return %0, %2
}}
""")
        apply_patterns(g, pats)
        assert ops(g) == want
    with pytest.raises(KilnRuleError, match=r"condition wide_float takes 2 arguments \(%v, \$n\), got 1"):
        parse_rules(rules.replace("wide_float(%x, 8)", "wide_float(%x)"))
    with pytest.raises(KilnRuleError, match=r"its argument for \$n must be a constant like \$c or a literal"):
        parse_rules(rules.replace("wide_float(%x, 8)", "wide_float(%x, %x)"))
    with pytest.raises(KilnRuleError, match=r":5:3: rule wide_float: unknown function dtypo"):
        parse_rules(rules.replace("dtype(%v) in", "dtypo(%v) in"))


@pytest.mark.parametrize("body", [
    "  %0 = aten.sigmoid(%g) : f32[2, 8]\n  %1 = aten.mul(%g, %0) : f32[2, 8]\n",
    "  %1 = aten.silu(%g) : f32[2, 8]\n"], ids=["x_sigmoid_x", "aten_silu"])
def test_silu_mul_is_one_rule_for_both_spellings(body):
    g = parse(f"func @f(%g: f32[2, 8], %u: f32[2, 8]) -> f32[2, 8] {{\n{body}"
              f"  %2 = aten.mul(%1, %u) : f32[2, 8]\n  return %2\n}}\n")
    x, u = torch.randn(2, 8), torch.randn(2, 8)
    (want,) = run(g, [x, u])
    pats = load_rules("activation")
    assert {p.name for p in pats} == {"silu_mul"}   # one rule, a pattern per spelling
    assert apply_patterns(g, pats) == 1 and ops(g) == ["kiln.silu_mul"]
    (got,) = run(g, [x, u])
    torch.testing.assert_close(got, want)
