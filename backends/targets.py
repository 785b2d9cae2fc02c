"""Targets as data: one entry per hardware target; everything else derives from this table.

`kernels` maps each fused kiln op to the function that implements it on the target
("module:function"); an op with no entry runs its reference implementation from
`kiln.ir.kiln_ref`. `verified` says how the target's lowering has been checked, and only
that: "run on" names hardware it ran on, anything else names the tools that check it
without the hardware. `kiln targets` prints these rows and the README's support matrix
is `support_matrix()` (a test keeps them equal), so neither can claim more than the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    name: str
    device_type: str
    triton_backend: str | None = None         # GPUTarget backend name
    archs: tuple = ()                          # GPUTarget archs: sm as int, gfx as str
    warp_size: int = 32
    fp8_dtype: torch.dtype | None = None
    # The graph class the runtime captures and replays ("torch.cuda.CUDAGraph"); the module
    # before its name provides graph(), graph_pool_handle() and synchronize() too
    # (kiln.backends.cudagraphs.GraphAPI).
    graph_capture: str | None = None
    # Serving graphs (kiln.runtime.model_runner): batches with prefill chunks are captured
    # too only where every kernel finds the batch's layout in device memory (cuda/hip: the
    # Triton paged attention). xpu's and npu's attention read a prefill batch's layout on
    # the host, which a graph would freeze: there only decode buckets are captured and
    # prefill runs eagerly.
    graph_captures_prefill: bool = True
    # "module:function" mapping a decode step's sequence lengths to the host arguments of
    # the captured graph's operators, set before every replay (npu: the lengths its fused
    # attention operator takes as a host list; NPUGraph.update); None: the graph's kernels
    # read everything from device memory.
    graph_host_arguments: str | None = None
    # Speculative decoding: decode buckets in multiples of 1 + k rows (the verify step of a
    # sequence is 1 + k decode rows), so a step whose sequences all draft k fills its
    # bucket, as vllm-ascend sizes its ACL graphs for MTP.
    verify_group_buckets: bool = False
    kernels: dict[str, str] = field(default_factory=dict)
    lowering: str = ""           # what runs the fused ops, in words (README, kiln targets)
    verified: str = ""           # how this lowering is checked (see the module docstring)
    first_run: str = ""          # the command a first user with the hardware runs first
    # "module:function(to_run)" returning torch.device(device_type) for a device type torch
    # knows only once its plug-in named it (npu); None: torch always knows it.
    declare_device: str | None = None
    # fuse.parallel_linear: one GEMM for q/k/v and for gate/up saves launches, which a GPU
    # decode step is bound by; a CPU's batch-1 GEMV streams the same weight bytes either
    # way, so there it buys nothing and costs a copy of those weights.
    merge_parallel_linears: bool = True
    # quant="int4_weight_only": the dtype of each group's (scale, zero) that the target's
    # kiln.weight_int4_mm reads (torch's CPU int4 GEMM: its activations' dtype, bf16).
    int4_scale_dtype: torch.dtype = torch.float32
    # Bytes: the boundary the target's kernels assume a weight vector starts on (the CPU's
    # TVM kernels load with aligned vector moves: kiln.backends.cpu_kernels). Weights
    # mapped from safetensors files sit at the file's offsets: the pass prepare.align has
    # weight preparation copy the vectors fused ops read once. 0: no such assumption.
    weight_alignment: int = 0

    def kernel(self, op: str) -> str:
        """"module:function" implementing kiln op `op` (e.g. "kiln.rms_norm")."""
        short = op.split(".", 1)[1]
        return self.kernels.get(short, f"kiln.ir.kiln_ref:{short}")

    def torch_device(self, to_run: bool = False) -> torch.device:
        """torch.device(device_type), after making torch know the name where it needs to
        (graphs and artifacts for the target name their device on any machine). `to_run`:
        also what running on it needs (npu: torch_npu), or one error saying what is missing."""
        if self.declare_device is None:
            return torch.device(self.device_type)
        import importlib
        module, fn = self.declare_device.split(":")
        return getattr(importlib.import_module(module), fn)(to_run)

    def describe(self) -> str:
        arch = ", ".join(str(a) for a in self.archs) or "-"
        fp8 = str(self.fp8_dtype).replace("torch.", "") if self.fp8_dtype else "-"
        return (f"{self.name:5s} device={self.device_type:4s} triton={self.triton_backend or '-':5s} "
                f"archs=[{arch}] warp={self.warp_size} fp8={fp8} capture={self.graph_capture or '-'}\n"
                f"      kernels:  {self.lowering}\n"
                f"      verified: {self.verified}\n"
                f"      first run on the hardware: {self.first_run}")


# Collectives run as torch.distributed functional collectives on every target that runs.
_COLLECTIVES = {op: f"kiln.backends.collectives:{op}"
                for op in ("all_reduce", "all_gather", "reduce_scatter", "all_reduce_add_rms_norm")}
_CPU_KERNELS = {"attention": "kiln.backends.cpu_kernels:attention",
                # TVM kernels where they beat torch (kiln.backends.cpu_kernels.TVM_OPS)
                **{op: f"kiln.backends.cpu_kernels:{op}"
                   for op in ("rms_norm", "fused_add_rms_norm", "rope", "silu_mul")},
                "weight_int8_mm": "kiln.backends.cpu_kernels:weight_int8_mm",
                "weight_int8_grouped_mm": "kiln.backends.cpu_kernels:weight_int8_grouped_mm",
                "quant_int4": "kiln.backends.cpu_kernels:quant_int4",
                "weight_int4_mm": "kiln.backends.cpu_kernels:weight_int4_mm",
                "paged_attention": "kiln.backends.paged_attention:paged_attention",
                **_COLLECTIVES}
# Triton modules and the fused ops each implements (launcher named like the op).
_TRITON_MODULES = {
    "norm": ("rms_norm", "fused_add_rms_norm"),
    "rope": ("rope", "rope_pair", "rope_pair_store"),
    "activation": ("silu_mul",),
    "attention": ("attention",),
    "paged_attention": ("paged_attention",),
    "moe": ("fused_moe",),
    "quant": ("quant_fp8", "quant_int8", "rms_norm_quant", "fused_add_rms_norm_quant",
              "silu_mul_quant"),
    "gemm": ("scaled_mm",),
    "gemv": ("rms_norm_mm", "fused_add_rms_norm_mm", "silu_mul_mm", "mm"),
}
_TRITON_KERNELS = {op: f"kiln.backends.triton.{module}:{op}"
                   for module, ops in _TRITON_MODULES.items() for op in ops}
_TRITON_KERNELS.update(_COLLECTIVES, all_reduce_add_rms_norm=
                       "kiln.backends.collectives:all_reduce_add_rms_norm_triton")

# Devices without a kernel generator here (xpu): the fused ops with a torch-op version
# that keeps shapes static (paged attention's decode path: graph-capturable); the others
# run their reference implementations, which are torch ops too.
_TORCH_KERNELS = {"paged_attention": "kiln.backends.paged_attention:paged_attention",
                  **_COLLECTIVES}
# npu: each fused op as the torch_npu operators that implement it (backends/npu.py).
_NPU_OPS = ("rms_norm", "fused_add_rms_norm", "rope", "rope_pair", "silu_mul", "attention",
            "paged_attention", "fused_moe", "quant_int8")
_NPU_KERNELS = {op: f"kiln.backends.npu:{op}" for op in _NPU_OPS}



def _first_run(target: str) -> str:
    """Compile SmolLM2 for `target`, then generate from the artifact on the device: every
    stage a user of that hardware needs (wrapper, kernels, weights on the device)."""
    return (f"kiln compile smollm2 -t {target} -o smollm2-{target}.kiln && kiln generate "
            f"smollm2-{target}.kiln --prompt 'What is the capital of France?'")


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("cpu", "cpu", kernels=_CPU_KERNELS, merge_parallel_linears=False,
           int4_scale_dtype=torch.bfloat16, weight_alignment=64,
           lowering="torch ops; CPU kernels for attention, paged attention, int8/int4 GEMMs",
           verified="run on this CPU (CI: every test)",
           first_run="kiln generate smollm2 --prompt 'What is the capital of France?'"),
    Target("cuda", "cuda", "cuda", (80, 90), 32, torch.float8_e4m3fn, "torch.cuda.CUDAGraph",
           kernels=_TRITON_KERNELS,
           lowering="Triton (sm_80, sm_90) for every fused op, generated Triton kernels, "
                    "GEMMs through torch (cuBLAS)",
           verified="run on H200 (make test-gpu; BENCHMARKS.md); CI: compiled for sm_90 "
                    "+ Triton interpreter",
           first_run="make test-gpu"),
    Target("hip", "cuda", "hip", ("gfx942", "gfx950"), 64, torch.float8_e4m3fnuz,
           "torch.cuda.CUDAGraph", kernels=_TRITON_KERNELS,
           lowering="Triton AMD (gfx942, gfx950) for every fused op, tiles sized for "
                    "MI300's 64 KiB LDS, generated Triton kernels, GEMMs through torch "
                    "(hipBLAS); fp8 as e4m3fnuz (gfx942's: gfx950 upcasts it to fp16); HIP "
                    "graphs through torch.cuda on ROCm builds",
           verified="compiled for gfx942/gfx950 + its wrapper run under the Triton "
                    "interpreter + its --aot output built and linked against the HIP runtime "
                    "by a C host program, run up to HIP's no-device error (CI); never run on "
                    "an AMD GPU",
           first_run=_first_run("hip")),
    Target("xpu", "xpu", None, (), 16, torch.float8_e4m3fn, "torch.xpu.XPUGraph",
           kernels=_TORCH_KERNELS, graph_captures_prefill=False,
           lowering="torch ops for every fused op (kiln's Triton kernels compile to SPIR-V "
                    "with Intel's Triton backend, but none ran on an Intel GPU, so the target "
                    "does not launch them); XPU graphs for decode buckets, prefill eager",
           verified="wrapper run on the CPU vs HF eager (xpu device literals mapped to the "
                    "CPU, test-only) + serving graphs captured and replayed through "
                    "torch.xpu's graph calls on a CPU-backed test device + every Triton "
                    "kernel compiled to SPIR-V for PVC by triton-xpu (CI); never run on an "
                    "Intel GPU",
           first_run=_first_run("xpu")),
    Target("npu", "npu", None, (), 32, None, "torch.npu.NPUGraph", kernels=_NPU_KERNELS,
           graph_captures_prefill=False, verify_group_buckets=True,
           graph_host_arguments="kiln.backends.npu:graph_host_arguments",
           declare_device="kiln.backends.npu:declare_device",
           lowering="torch_npu operators for the fused ops, torch ops for the rest; ACL "
                    "graphs for decode buckets (the fused attention's host lengths set before "
                    "each replay; multiples of 1 + k rows with speculation), prefill eager",
           verified="schema-checked against torch-npu 2.14.0's operator schemas + CPU "
                    "reference operators + serving graphs captured and replayed through "
                    "torch.npu's graph calls (torch_npu 2.14's update) on a CPU-backed test "
                    "device (CI); never run on an Ascend NPU",
           first_run=_first_run("npu")),
]}


def support_matrix() -> str:
    """The README's support matrix (Markdown), one row per target of TARGETS."""
    rows = ["| target | kernels | graph capture | verified | first command on the hardware |",
            "| --- | --- | --- | --- | --- |"]
    for t in TARGETS.values():
        rows.append(f"| `{t.name}` | {t.lowering} | {f'`{t.graph_capture}`' if t.graph_capture else '-'} "
                    f"| {t.verified} | `{t.first_run}` |")
    return "\n".join(rows)


def target_of_device(device_type: str) -> Target:
    """The first target of TARGETS running on `device_type`: what a runner on that device
    captures graphs with. cuda and hip share the device type "cuda" and capture alike
    (torch.cuda's API on either build of torch)."""
    for target in TARGETS.values():
        if target.device_type == device_type:
            return target
    raise ValueError(f"no target runs on device type {device_type!r}; targets run on "
                     f"{', '.join(sorted({t.device_type for t in TARGETS.values()}))} "
                     f"(`kiln targets` lists them)")


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} "
                         f"(`kiln targets` lists them)") from None
