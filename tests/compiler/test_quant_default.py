"""The command line's default weights (kiln.quant_choice, issue #14 part 3): int4 on the cpu
target when every linear weight is exactly 4-bit already, float32 otherwise; `--quant none`
turns it off; a bad mode is one message. Python's own entry points keep quant=None."""
from __future__ import annotations

import json

import pytest
import torch

import models
from kiln.cli import build_parser, main
from kiln.ir import kiln_ref
from kiln.quant_choice import choose


def _four_bit(model):
    """Every linear weight but the LM head that kiln's int4 layout takes replaced by its
    int4 round trip (fp32 scales): a model whose checkpoint was 4-bit, as a Q4_1 GGUF's is."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not head and \
                    kiln_ref.int4_fits(*m.weight.shape, 32) is None:
                w_q, w_sz = kiln_ref.quant_int4(m.weight, 32)
                m.weight.copy_(kiln_ref.int4_dequantize(w_q, w_sz, 32))
    return model


def test_auto_takes_int4_on_the_cpu_for_4_bit_weights_only():
    model = _four_bit(models.tiny_llama())
    c = choose("auto", model, "cpu")
    assert c.quant == "int4_weight_only" and "4-bit grid" in c.reason
    assert choose("auto", model, "cuda").quant is None
    assert choose("none", model, "cpu").quant is None
    assert choose(None, model, "cpu").quant is None
    assert choose("int8_weight_only", model, "cpu").quant == "int8_weight_only"
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 7] += 1e-3   # one weight off its grid
    c = choose("auto", model, "cpu")
    assert c.quant is None
    assert "model.layers.1.mlp.up_proj.weight is not on a 4-bit grid" in c.reason
    assert "--quant int4_weight_only asks for it anyway" in c.reason


def test_auto_keeps_float32_for_weights_int4_would_change():
    c = choose("auto", models.tiny_llama(), "cpu")                  # random weights
    assert c.quant is None and "is not on a 4-bit grid (100% of its groups" in c.reason
    c = choose("auto", _four_bit(models.tiny_llama_gqa()), "cpu")   # k/v: 32 outputs
    assert c.quant is None and "does not fit kiln's int4 layout" in c.reason
    c = choose("auto", _four_bit(models.tiny_llama()).to(torch.bfloat16), "cpu")
    assert c.quant is None and "bfloat16, not float32" in c.reason


@pytest.mark.parametrize("command", ["compile", "generate", "serve", "chat"])
def test_quant_flag(command, capsys):
    extra = {"compile": ["-o", "out"], "generate": ["--prompt", "hi"]}.get(command, [])
    parse = build_parser().parse_args
    assert parse([command, "smollm2", *extra]).quant == "auto"
    assert parse([command, "smollm2", *extra, "--quant", "none"]).quant == "none"
    assert parse([command, "smollm2", *extra, "--quant", "int4_weight_only_g64"]).quant == \
        "int4_weight_only_g64"
    with pytest.raises(SystemExit) as e:
        parse([command, "smollm2", *extra, "--quant", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --quant: invalid choice: 'int3'" in err and "'none'" in err
    assert "'int4_weight_only'" in err


def test_generate_with_another_backend_refuses_a_quant_mode(capsys):
    assert main(["generate", "smollm2", "--prompt", "hi", "--backend", "eager",
                 "--quant", "int4_weight_only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quant int4_weight_only compiles for the kiln engine" in err


@pytest.mark.slow
def test_compile_and_generate_default_to_int4_for_a_4_bit_model(tmp_path, capsys):
    """The CLI end to end on a tiny Llama whose weights are 4-bit: `kiln compile` says what it
    chose and records it; `kiln generate` names the weights beside its tokens/s; an explicit
    mode that differs from the artifact's is one message with the fix; `--quant none`
    compiles float32."""
    d = models.tiny_llama_dir(tmp_path / "tiny")
    from transformers import AutoModelForCausalLM
    _four_bit(AutoModelForCausalLM.from_pretrained(d)).save_pretrained(d)
    out = tmp_path / "tiny.kiln"
    assert main(["compile", str(d), "-t", "cpu", "--block-size", "8", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "kiln: weights int4_weight_only (auto: every linear weight is on a 4-bit grid" in err
    assert json.loads((out / "manifest.json").read_text())["options"]["quant"] == "int4_weight_only"
    ir = (out / "ir").glob("*.kir")
    assert "kiln.weight_int4_mm" in sorted(ir)[-1].read_text()
    assert main(["generate", str(out), "--prompt", "hello", "--no-chat", "--max-tokens", "3",
                 "--num-blocks", "16", "--max-model-len", "64"]) == 0
    err = capsys.readouterr().err
    assert "[kiln engine, cpu, weights int4_weight_only]" in err and "tokens/s" in err
    assert main(["generate", str(out), "--prompt", "hello", "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was compiled with weights int4_weight_only" in err
    assert f"kiln compile {d} -t cpu --quant none -o DIR" in err
    plain = tmp_path / "plain.kiln"
    assert main(["compile", str(d), "-t", "cpu", "--block-size", "8", "--quant", "none",
                 "-o", str(plain)]) == 0
    assert "kiln: weights not quantised (--quant none)" in capsys.readouterr().err
    assert json.loads((plain / "manifest.json").read_text())["options"]["quant"] is None
