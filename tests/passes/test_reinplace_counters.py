"""reinplace: a StaticCache layer's length counter, `copy_(n, add(n, k))` at the end of the
graph, becomes an in-place add, and the adds of one scalar become one `_foreach_add_`
(one launch for every layer's counter); the counters end up where the functional graph
leaves them, and the IR text round-trips."""
from __future__ import annotations

import torch

from kiln.ir import parse, print_graph, run, verify
from kiln.passes import PassManager

COUNTERS = """func @f(%x: f32[4], %n0: i64[], %n1: i64[], %n2: i64[]) -> f32[4] {
  %0 = aten.add(%n0, 1) : i64[]
  %1 = aten.add(%n1, 1) : i64[]
  %2 = aten.add(%n2, 2) : i64[]
  %3 = aten.mul(%x, %n0) : f32[4]
  %4 = aten.mul(%3, %n1) : f32[4]
  %5 = aten.copy_(%n0, %0) : i64[]
  %6 = aten.copy_(%n1, %1) : i64[]
  %7 = aten.copy_(%n2, %2) : i64[]
  return %4
}
"""


def _inputs():
    return [torch.arange(4.0), torch.tensor(3), torch.tensor(5), torch.tensor(7)]


def test_counter_copies_become_one_foreach_add_and_update_alike():
    g = parse(COUNTERS)
    PassManager(passes=["reinplace"], verify_each=True).run(g)
    ops = [n.op for n in g.nodes]
    assert ops == ["aten.mul", "aten.mul", "aten._foreach_add_", "aten.add_"], print_graph(g)
    foreach = g.nodes[2]
    assert [v.name for v in foreach.args[0]] == ["n0", "n1"] and foreach.args[1] == 1
    text = print_graph(g)
    assert print_graph(parse(text)) == text
    verify(parse(text))
    want, got = _inputs(), _inputs()
    ref = run(parse(COUNTERS), want)
    out = run(g, got)
    torch.testing.assert_close(out[0], ref[0])
    assert [int(t) for t in got[1:]] == [int(t) for t in want[1:]] == [4, 6, 9]


def test_a_sum_read_elsewhere_keeps_its_copy():
    text = COUNTERS.replace("-> f32[4]", "-> (f32[4], i64[])").replace("return %4", "return %4, %0")
    g = parse(text)
    PassManager(passes=["reinplace"], verify_each=True).run(g)
    ops = [n.op for n in g.nodes]
    assert ops.count("aten.copy_") == 1 and "aten._foreach_add_" not in ops   # n1 and n2 differ in k
