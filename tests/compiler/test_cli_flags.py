"""Bad numeric flags stop `kiln` before anything loads, with argparse's one-line error that
names the flag, the value and what it must be."""
from __future__ import annotations

import pytest

from kiln.cli import main


@pytest.mark.parametrize("argv,message", [
    (["serve", "--max-num-seqs", "0"], "argument --max-num-seqs: must be at least 1, got 0"),
    (["serve", "--max-num-batched-tokens", "-5"], "argument --max-num-batched-tokens: must be at least 1"),
    (["serve", "--kv-cache-gib", "nan"], "argument --kv-cache-gib: must be a finite number above 0"),
    (["generate", "--max-tokens", "many"], "argument --max-tokens: expected a whole number, got 'many'"),
    (["compile", "--block-size", "0"], "argument --block-size: must be at least 1"),
    (["bench", "serve", "--concurrency", "0"], "argument --concurrency: must be at least 1"),
    (["bench", "serve", "--shared-prefix-len", "-1"], "argument --shared-prefix-len: must be at least 0"),
])
def test_bad_numbers_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,async_scheduling,lazy", [
    ([], None, False),   # async: the engine decides (on for a CUDA runner); graphs at start-up
    (["--no-async-scheduling"], False, False),
    (["--lazy-mixed-graphs"], None, True),
])
def test_serving_flags_reach_the_serving_config(argv, async_scheduling, lazy):
    from kiln.cli import _serving_config, build_parser
    for command in ("serve", "generate", "chat"):
        extra = ["--prompt", "hi"] if command == "generate" else []
        cfg = _serving_config(build_parser().parse_args([command, "smollm2", *extra, *argv]))
        assert cfg.async_scheduling is async_scheduling and cfg.lazy_mixed_graphs is lazy


def test_the_cli_offers_every_quant_mode_and_nothing_else():
    from kiln import cli
    from kiln.passes.quantize import QUANT_MODES
    assert tuple(cli.CLI_QUANT_MODES) == QUANT_MODES


def test_a_bad_quant_mode_is_one_message():
    from kiln.config import CompileOptions
    with pytest.raises(ValueError, match=r"quant must be None or one of fp8, int8, "
                                         r"int8_weight_only, int8_weight_only_g32, "
                                         r"int8_weight_only_g64, int8_weight_only_g128, "
                                         r"int4_weight_only, "
                                         r"int4_weight_only_g64, int4_weight_only_g128; "
                                         r"got 'int4'"):
        CompileOptions.make({"quant": "int4"})
