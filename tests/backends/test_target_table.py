"""The targets table is the one place that says how each target is verified: `kiln
targets` prints its rows and the README's support matrix is exactly `support_matrix()`;
no target but those that ran on hardware says "run on"."""
from __future__ import annotations

from pathlib import Path

from kiln.backends.targets import TARGETS, support_matrix

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_support_matrix_is_the_targets_table():
    assert support_matrix() in README.read_text(), (
        "README.md's support matrix differs from the targets table: paste the output of "
        "`kiln targets --markdown` under '## Support matrix'")


def test_every_target_says_how_it_is_verified_and_what_to_run_first():
    for t in TARGETS.values():
        assert t.lowering and t.verified and t.first_run, t.name
    ran = {name for name, t in TARGETS.items() if t.verified.startswith("run on")}
    assert ran == {"cpu", "cuda"}   # hip, xpu and npu never ran on their hardware here
    for name in ("hip", "xpu", "npu"):
        assert "never run on" in TARGETS[name].verified


def test_kiln_targets_prints_the_rows(capsys):
    from kiln.cli import main
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for t in TARGETS.values():
        assert f"verified: {t.verified}" in out and t.first_run in out
