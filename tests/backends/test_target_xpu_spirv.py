"""kiln's Triton kernels compiled to SPIR-V by Intel's Triton backend, as CI can afford it.

triton-xpu ships its own `triton` package, so it cannot sit beside the triton the cuda/hip
kernels compile with: `make setup` installs it (pinned with hashes in
requirements-xpu-triton.lock, with the SYCL runtime its launcher builds against) under a
prefix of its own, .venv/xpu-triton, and this test compiles in a child process whose
PYTHONPATH puts that prefix's packages first (kiln and torch still come from .venv).
It also needs Level Zero's loader and headers (Debian's libze-dev, .ci/system-packages) and
a C++ compiler (the backend builds its launcher with $CC).

Every kernel compiles all its variants in test_triton_aot.py for cuda and hip; for xpu,
the first AOT variant of each of kiln's Triton kernel functions compiles here (18
kernels, about a minute on 2 cores: all 127 variants take 14 minutes, too long for CI;
they compiled by hand, README). The device description is a Data Center GPU Max (PVC)'s.
The xpu target itself still runs torch ops (the targets table says why); this checks that
the kernels it would run compile for the device.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PREFIX = Path(sys.prefix) / "xpu-triton"   # Makefile: XPU_TRITON
SITE = PREFIX / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
LEVEL_ZERO = Path("/usr/include/level_zero/ze_api.h")
SPIRV_MAGIC = bytes.fromhex("03022307")   # 0x07230203, little-endian

COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from kiln.backends.triton import aot

# Intel Data Center GPU Max (PVC): what the Intel backend reads from a device description.
PVC = {"name": "Intel(R) Data Center GPU Max 1550", "max_work_group_size": 1024,
       "max_num_sub_groups": 64, "sub_group_sizes": [16, 32], "has_fp64": True,
       "has_subgroup_matrix_multiply_accumulate": True,
       "has_subgroup_matrix_multiply_accumulate_tensor_float32": False,
       "has_subgroup_2d_block_io": True, "has_bfloat16_conversions": True}
first = {}
for spec in aot.all_specs():
    if "cuda" in spec.targets:   # (the hip-only ones are e4m3fnuz fp8, which Intel lacks)
        first.setdefault(spec.fn.fn.__module__ + ":" + spec.fn.fn.__name__, spec)
out = {"triton": [triton.__version__, triton.__file__], "kernels": {}}
for kernel, spec in first.items():
    try:
        compiled = triton.compile(aot._make_source(spec), target=GPUTarget("xpu", PVC, 16),
                                  options={"num_warps": spec.num_warps,
                                           "num_stages": spec.num_stages})
        out["kernels"][kernel] = {"spec": spec.name, "spv": compiled.asm["spv"][:4].hex(),
                                  "bytes": len(compiled.asm["spv"]),
                                  "name": compiled.metadata.name}
    except Exception as e:
        out["kernels"][kernel] = {"spec": spec.name, "error": f"{type(e).__name__}: {e}"[:2000]}
print("RESULT" + json.dumps(out))
"""


def _needs(what: str, there: bool):
    if there:
        return
    reason = f"needs {what} (make setup and .ci/system-packages install it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_every_kernel_compiles_to_spirv_with_intels_backend(tmp_path):
    _needs(f"triton-xpu under {PREFIX}", (SITE / "triton" / "backends" / "intel").is_dir())
    _needs("Level Zero's headers and loader (libze-dev)", LEVEL_ZERO.is_file())
    cxx = shutil.which("g++")
    _needs("g++", cxx is not None)
    env = {**os.environ, "CC": cxx, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
           "PYTHONPATH": os.pathsep.join([str(SITE), *[p for p in sys.path if p]])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    version, where = result["triton"]
    assert version.startswith("3.3.0") and Path(where).is_relative_to(SITE), result["triton"]
    kernels = result["kernels"]
    failed = {k: v["error"] for k, v in kernels.items() if "error" in v}
    assert not failed, json.dumps(failed, indent=1)[:6000]
    from kiln.backends.triton import aot
    assert set(kernels) == {f"{s.fn.fn.__module__}:{s.fn.fn.__name__}" for s in aot.all_specs()
                            if "cuda" in s.targets}
    for kernel, got in kernels.items():
        assert bytes.fromhex(got["spv"]) == SPIRV_MAGIC and got["bytes"] > 1000, (kernel, got)
        assert got["name"] == kernel.split(":")[1], (kernel, got)
