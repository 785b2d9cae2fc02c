"""Which weights the command line compiles with when `--quant` is left out (issue #14,
part 3): the CPU's fast path, int4 weights, when the accuracy check holds.

`kiln compile`, `kiln generate`, `kiln serve` and `kiln chat` take `--quant MODE`; its
default, "auto", becomes a mode once the model is loaded (`choose`):

- "int4_weight_only" when the target is cpu and every linear weight of the model (the LM
  head aside) is exactly representable in kiln's int4 groups of 32: kiln_ref.int4_codes
  gives each weight back to within a thousandth of its group's step. That is true of a
  checkpoint that was 4-bit already, as the default SmolLM2 is (a Q4_1 GGUF: every block of
  32 is d * q + m); the int4 path then loses nothing of the weights kiln loaded. What it
  does lose is measured, not assumed: the CPU kernel reads scale and zero in bf16 and
  computes in bf16 x bf16 -> fp32 (the activations fed as two bf16 halves), and the LM head
  is int8 with its 16 best logits recomputed from the fp32 weight. On SmolLM2 that agrees
  with fp32 on >= 99% of teacher-forced tokens (BENCHMARKS.md; tests/passes/test_quantize.py
  asserts it).
- None (float32 weights) otherwise, with the reason: on weights that were never 4-bit,
  int4 (or per-channel int8: 94-97% on SmolLM2) is a trade of accuracy for speed that
  the user makes with `--quant int4_weight_only` / `int8_weight_only`.

"none" is None. Only the command line says "auto": `kiln.compile`, `torch.compile(backend=
"kiln")` and kiln's Python builders keep `quant=None` unless their options name a mode.
"""
from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
NONE = "none"
CPU_DEFAULT = "int4_weight_only"
GROUP_SIZE = 32
# |int4 round trip - weight| allowed, in steps of the weight's group: fp32 rounding only.
EXACT_STEPS = 1e-3


@dataclass(frozen=True)
class QuantChoice:
    quant: str | None       # the compile option
    reason: str             # why, for the one line the command prints

    def describe(self) -> str:
        return f"weights {self.quant or 'not quantised'} ({self.reason})"


def choose(requested: str | None, model, target: str) -> QuantChoice:
    """`requested`: a quant mode, None / "none" (float32 weights) or "auto"."""
    if requested in (None, NONE):
        return QuantChoice(None, "--quant none" if requested == NONE else "no quantisation asked")
    if requested != AUTO:
        return QuantChoice(requested, "--quant")
    if target != "cpu":
        return QuantChoice(None, f"auto: quantised weights are the default on the cpu target "
                                 f"only, not {target}; --quant MODE asks for them")
    why_not = int4_inexact(model)
    if why_not is not None:
        return QuantChoice(None, f"auto: {why_not}, so int4 would change the model; "
                                 f"--quant {CPU_DEFAULT} asks for it anyway")
    return QuantChoice(CPU_DEFAULT, f"auto: every linear weight is on a 4-bit grid in its "
                                    f"groups of {GROUP_SIZE}, so int4 keeps it exactly; "
                                    f"--quant none keeps the model's dtype")


def int4_inexact(model) -> str | None:
    """None when every nn.Linear weight of `model` but the LM head comes back from kiln's
    int4 (groups of GROUP_SIZE, float32 scales) to within EXACT_STEPS of a step; otherwise
    the first weight that does not, and why."""
    import torch

    from kiln.ir import kiln_ref
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    if not linears:
        return "the model has no linear layers"
    for name, m in linears:
        w = m.weight.detach()
        if w.dtype != torch.float32:
            return f"its weights are {str(w.dtype).replace('torch.', '')}, not float32"
        n, k = w.shape
        why = kiln_ref.int4_fits(n, k, GROUP_SIZE)
        if why is not None:
            return f"{name}.weight {tuple(w.shape)} does not fit kiln's int4 layout ({why})"
        codes, scale, zero = kiln_ref.int4_codes(w, GROUP_SIZE)
        g = codes.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
        back = (g - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        off = ((back - w.reshape(g.shape)).abs() > EXACT_STEPS * scale.unsqueeze(-1)).any(-1)
        if off.any():
            return (f"{name}.weight is not on a 4-bit grid ({off.float().mean().item():.0%} of "
                    f"its groups of {GROUP_SIZE} are not)")
    return None
