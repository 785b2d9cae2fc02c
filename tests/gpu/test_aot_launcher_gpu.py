"""The C launchers of AOT-compiled kernels on a real GPU: the generated C for rms_norm is
built into a shared library with gcc -lcuda, loaded with ctypes and launched on torch
tensors on torch's current stream; its output must be the Python launcher's. Also: a kernel
with more than 48 KiB of shared memory loads (the opt-in), and every kernel of a
`kiln compile -t cuda --aot` artifact loads. Skipped without CUDA (and without gcc).
Written on a CPU-only machine; not yet run on a GPU."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CC = shutil.which("gcc") or shutil.which("cc")
SPEC = "rms_norm_f16_d4096"


def _cuda_include() -> Path:
    import triton
    for d in [Path(triton.__file__).parent / "backends" / "nvidia" / "include"] + \
             [Path(os.environ[k]) / "include" for k in ("CUDA_HOME", "CUDA_PATH") if k in os.environ]:
        if (d / "cuda.h").is_file():
            return d
    pytest.skip("no cuda.h (neither the triton wheel's nor $CUDA_HOME/include)")


def _libcuda_dir() -> str:
    try:
        from triton.backends.nvidia.driver import libcuda_dirs
        dirs = libcuda_dirs()
    except Exception:  # noqa: BLE001 - fall back to the loader cache
        out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
        dirs = [os.path.dirname(ln.split()[-1]) for ln in out.splitlines() if "libcuda.so.1" in ln]
    for d in dirs:
        if os.path.exists(os.path.join(d, "libcuda.so.1")):
            return d
    pytest.skip("libcuda.so.1 not found")


def build_library(aot_dir: Path, out: Path) -> ctypes.CDLL:
    """The README's build command: every *.cuda.c of the directory, linked to libcuda."""
    if CC is None:
        pytest.skip("no C compiler")
    sources = sorted(str(p) for p in aot_dir.glob("*.cuda.c"))
    cmd = [CC, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", f"-I{_cuda_include()}",
           "-o", str(out), *sources, f"-L{_libcuda_dir()}", "-l:libcuda.so.1", "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-3000:]}"
    return ctypes.CDLL(str(out))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from kiln.backends.triton import aot, launcher
    specs = {s.name: s for s in aot.all_specs()}
    binaries = [aot.compile_spec(specs[SPEC], "cuda"),
                aot.compile_spec(specs["scaled_mm_int8_bf16_small_m"], "cuda")]
    assert binaries[1].metadata["shared"] > 48 * 1024
    tmp = tmp_path_factory.mktemp("aot_gpu")
    aot_dir = Path(launcher.write_aot(binaries, str(tmp / "aot")))
    return build_library(aot_dir, tmp / "libkiln_kernels_cuda.so"), binaries


def test_c_launcher_matches_python_launcher(built):
    from kiln.backends.triton import norm
    lib, binaries = built
    b = binaries[0]
    fn = getattr(lib, "kiln_" + SPEC)
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] + [ctypes.c_uint] * 3 + [ctypes.c_uint64] * 5 +
                   [ctypes.c_int32] * 5 + [ctypes.c_float])
    torch.manual_seed(0)
    hidden, rows, eps = b.constants["HIDDEN"], 37, 1e-6
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16)
    w = torch.randn(hidden, device="cuda", dtype=torch.float16)
    y = torch.full_like(x, float("nan"))
    stream = torch.cuda.current_stream().cuda_stream
    grid = (rows + b.constants["ROWS"] - 1) // b.constants["ROWS"]
    # rms_norm(X, R, W, Y, S, n_rows, strides of X R Y S, eps); R and S unused without a
    # residual (HAS_RESIDUAL is compiled in as False), so they get X as kiln's launcher does.
    p = [x.data_ptr(), x.data_ptr(), w.data_ptr(), y.data_ptr(), x.data_ptr()]
    err = fn(stream, grid, 1, 1, *p, rows, x.stride(0), x.stride(0), y.stride(0), x.stride(0), eps)
    assert err == 0, f"kiln_{SPEC} returned CUresult {err}"
    torch.cuda.synchronize()
    want = norm.rms_norm(x, w, eps)
    torch.cuda.synchronize()
    assert not y.isnan().any()
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)
    diff = (y.float() - want.float()).abs().max().item()
    print(f"\nC launcher vs Python launcher: max |diff| {diff:.3g}")
    assert fn(stream, 0, 1, 1, *p, 0, 0, 0, 0, 0, eps) == 0   # an empty grid is a no-op


def test_large_shared_memory_kernel_loads_and_unloads(built):
    lib, _ = built
    for suffix in ("_load", "_load", "_unload", "_load"):   # idempotent; reloads after unload
        f = getattr(lib, "kiln_scaled_mm_int8_bf16_small_m" + suffix)
        f.restype = ctypes.c_int
        assert f() == 0, suffix
    load_all = lib.kiln_cuda_load_all
    load_all.restype, load_all.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_char_p)]
    failed = ctypes.c_char_p()
    assert load_all(ctypes.byref(failed)) == 0, failed.value


def test_every_kernel_of_an_aot_artifact_loads(tmp_path):
    import models
    d = tmp_path / "tiny-llama"
    models.tiny_llama_gqa().save_pretrained(d)
    out = tmp_path / "tiny.kiln"
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(d), "-t", "cuda",
                        "--aot", "--block-size", "16", "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = build_library(out / "aot", tmp_path / "libkiln_kernels_cuda.so")
    load_all = lib.kiln_cuda_load_all
    load_all.restype, load_all.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_char_p)]
    torch.cuda.init()
    failed = ctypes.c_char_p()
    assert load_all(ctypes.byref(failed)) == 0, failed.value
