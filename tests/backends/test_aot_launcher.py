"""C launchers for AOT-compiled kernels (kiln.backends.triton.launcher), on a CPU machine:
the generated C compiles with gcc -Wall -Werror against the cuda.h and HIP headers the
Triton wheel ships, embeds the binary byte for byte, and its launch functions take the
kernel signature minus constexprs, followed in the parameter array by exactly the hidden
pointers that the compiled kernel (PTX / AMDGPU metadata) declares. A handful of specs
only: test_triton_aot.py compiles every one."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import triton

from kiln.backends.triton import aot, launcher

SPECS = ("rms_norm_f16_d4096",             # the simplest: pointers, i32 strides, fp32 eps
         "scaled_mm_int8_bf16_small_m",    # > 48 KiB shared memory on both targets
         "quant_e4m3fnuz_f16_d4096")       # hip only
BACKENDS = Path(triton.__file__).parent / "backends"
INCLUDE = {"cuda": BACKENDS / "nvidia" / "include", "hip": BACKENDS / "amd" / "include"}
HEADER_OF = {"cuda": "cuda.h", "hip": "hip/hip_runtime_api.h"}
CC = shutil.which("gcc") or shutil.which("cc")


@pytest.fixture(scope="module")
def binaries():
    specs = [s for s in aot.all_specs() if s.name in SPECS]
    assert sorted(s.name for s in specs) == sorted(SPECS)
    return aot.compile_specs(specs, ("cuda", "hip"), jobs=2)


@pytest.fixture(scope="module")
def out_dir(binaries, tmp_path_factory):
    return Path(launcher.write_aot(binaries, str(tmp_path_factory.mktemp("aot") / "aot")))


def _launch_args(source: str, sym: str) -> list[tuple[str, str]]:
    """(C type, name) of the launch function's parameters, from its C definition or
    declaration."""
    m = re.search(r"\b" + sym + r"\((.*?)\)\s*[{;]", source, re.S)
    assert m, sym
    return [tuple(a.strip().rsplit(None, 1)) for a in m.group(1).split(",")]


def _param_slots(source: str) -> list[str]:
    m = re.search(r"void \*kiln_params\[\] = \{(.*?)\};", source, re.S)
    return [s.strip().lstrip("&") for s in m.group(1).split(",") if s.strip()]


def test_layout_and_manifest(binaries, out_dir):
    import json
    names = {p.name for p in out_dir.iterdir()}
    for b in binaries:
        assert f"{b.spec_name}.{b.target}.c" in names
        assert f"{b.spec_name}.{b.target}.{aot.BINARY_KIND[b.target]}" in names
    assert {"kiln_kernels.h", "README.txt", "manifest.json", "kiln_kernels.cuda.c",
            "kiln_kernels.hip.c"} <= names
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert len(manifest) == len(binaries)
    for e in manifest:
        assert e["launcher"]["file"] == f"{e['spec']}.{e['target']}.c"
        assert e["launcher"]["function"] == "kiln_" + e["spec"]
    readme = (out_dir / "README.txt").read_text()
    assert "cc -shared -fPIC" in readme and "-lcuda" in readme and "-lamdhip64" in readme
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]


def test_embedded_bytes_are_the_binary(binaries, out_dir):
    for b in binaries:
        src = (out_dir / launcher.source_file(b)).read_text()
        m = re.search(r"static const unsigned char kiln_image\[(\d+)\].*?= \{(.*?)\};", src, re.S)
        data = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-f]{2})", m.group(2)))
        assert int(m.group(1)) == len(b.binary) and data == b.binary, b.spec_name


def test_launch_arguments_are_the_signature_minus_constexprs(binaries, out_dir):
    for b in binaries:
        src = (out_dir / launcher.source_file(b)).read_text()
        api = launcher.API[b.target]
        args = _launch_args(src, launcher.symbol(b.spec_name))
        assert args[:4] == [(api.stream, "stream"), ("unsigned int", "gridX"),
                            ("unsigned int", "gridY"), ("unsigned int", "gridZ")]
        want = [(api.devptr if t.startswith("*") else launcher.SCALAR_TYPES[t][0], n)
                for n, t in b.signature.items() if t != "constexpr"]
        assert args[4:] == want, b.spec_name
        # The parameter array: those arguments, then the hidden pointers the compiled kernel
        # declares (Triton >= 3.5: global scratch and profile scratch, both NULL here).
        abi = launcher.kernel_abi(b)
        assert abi.source == {"cuda": "ptx", "hip": "amdgcn"}[b.target]
        assert abi.hidden == launcher.HIDDEN
        assert _param_slots(src) == [n for _, n in want] + ["kiln_" + h for h in abi.hidden]
        assert f"{api.launch}(kiln_function, gridX, gridY, gridZ" in src
        assert abi.threads == b.metadata["num_warps"] * aot.TARGETS[b.target].warp_size
        for c in b.constants:   # constexprs are compiled in, not arguments
            assert c not in [n for _, n in args]


def test_shared_memory_opt_in_on_cuda_only_when_needed(binaries, out_dir):
    for b in binaries:
        src = (out_dir / launcher.source_file(b)).read_text()
        big = b.metadata["shared"] > 48 * 1024
        assert ("CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES" in src) == (big and b.target == "cuda")
    assert any(b.metadata["shared"] > 48 * 1024 for b in binaries if b.target == "cuda")


def test_header_declares_every_kernel_with_its_constexprs(binaries, out_dir):
    h = (out_dir / "kiln_kernels.h").read_text()
    assert "#error" in h   # two targets here: the includer must pick one
    for b in binaries:
        sym = launcher.symbol(b.spec_name)
        assert f"{sym}_load(void);" in h and f"{sym}_unload(void);" in h
        section = h.split(f"#if defined(KILN_TARGET_{b.target.upper()})")[1].split("#endif /*")[0]
        src = (out_dir / launcher.source_file(b)).read_text()
        assert _launch_args(section, sym) == _launch_args(src, sym), b.spec_name
    pre = "KILN_RMS_NORM_F16_D4096"
    assert f"#define {pre}_ROWS 1" in h and f"#define {pre}_HAS_RESIDUAL 0" in h
    assert f"#define {pre}_THREADS 128" in h


def _compile(target: str, out_dir: Path, files: list[str], lang: str = "c"):
    if CC is None:
        pytest.skip("no C compiler")
    if not (INCLUDE[target] / HEADER_OF[target]).is_file():
        pytest.skip(f"this triton wheel ships no {HEADER_OF[target]}")
    cc = CC if lang == "c" else (shutil.which("g++") or pytest.skip("no C++ compiler"))
    for f in files:
        cmd = [cc, "-c", "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE[target]}",
               f"-DKILN_TARGET_{target.upper()}", "-o", os.devnull]
        cmd += ["-x", "c++", str(out_dir / f)] if lang == "c++" else ["-std=c11", str(out_dir / f)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("target", ["cuda", "hip"])
def test_generated_c_compiles_with_warnings_as_errors(binaries, out_dir, target):
    files = sorted(p.name for p in out_dir.glob(f"*.{target}.c"))
    assert len(files) == sum(b.target == target for b in binaries) + 1   # + load_all
    src = "".join((out_dir / f).read_text() for f in files)
    for fn in {"cuda": ("cuModuleLoadData", "cuModuleGetFunction", "cuLaunchKernel"),
               "hip": ("hipModuleLoadData", "hipModuleGetFunction", "hipModuleLaunchKernel")}[target]:
        assert fn + "(" in src
    _compile(target, out_dir, files)
    _compile(target, out_dir, ["kiln_kernels.h"], lang="c++")   # the header from C++ too


def test_single_target_header_needs_no_macro(binaries, tmp_path):
    cuda = [b for b in binaries if b.target == "cuda"]
    out = Path(launcher.write_aot(cuda, str(tmp_path / "aot")))
    h = (out / "kiln_kernels.h").read_text()
    assert "#error" not in h and "#define KILN_TARGET_CUDA 1" in h and "hip_runtime" not in h
    if CC and (INCLUDE["cuda"] / "cuda.h").is_file():
        (tmp_path / "user.c").write_text('#include "kiln_kernels.h"\n'
                                         "CUresult f(CUstream s, CUdeviceptr p) {\n"
                                         "  return kiln_rms_norm_f16_d4096(s, 1, 1, 1, p, p, p, "
                                         "p, p, 1, 4096, 4096, 4096, 4096, 1e-6f);\n}\n")
        r = subprocess.run([CC, "-c", "-Wall", "-Werror", f"-I{out}", f"-I{INCLUDE['cuda']}",
                            str(tmp_path / "user.c"), "-o", os.devnull],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_abi_mismatch_and_unsupported_kernels_are_refused(binaries):
    b = next(b for b in binaries if b.spec_name == "rms_norm_f16_d4096" and b.target == "cuda")
    sig = dict(b.signature)
    sig.pop("eps")   # the compiled kernel takes one parameter more than the launcher would
    with pytest.raises(launcher.LauncherError, match="not the launcher's arguments"):
        launcher.kernel_abi(dataclasses.replace(b, signature=sig))
    sig = dict(b.signature, eps="fp64")  # 8 bytes where the kernel takes 4
    with pytest.raises(launcher.LauncherError, match="sizes"):
        launcher.kernel_abi(dataclasses.replace(b, signature=sig))
    with pytest.raises(launcher.LauncherError, match="does not pass"):
        launcher.kernel_abi(dataclasses.replace(b, signature=dict(b.signature, eps="nvTmaDesc")))
    for key, value in (("num_ctas", 2), ("profile_scratch_size", 64)):
        with pytest.raises(launcher.LauncherError, match=key.split("_")[0]):
            launcher.kernel_abi(dataclasses.replace(b, metadata={**b.metadata, key: value}))
    # Without assembly the hidden parameters come from the metadata's scratch keys.
    bare = dataclasses.replace(b, asm={})
    assert launcher.kernel_abi(bare).hidden == launcher.HIDDEN
    assert launcher.kernel_abi(bare).source == "metadata"


def test_global_scratch_becomes_an_argument(binaries):
    b = next(b for b in binaries if b.spec_name == "rms_norm_f16_d4096" and b.target == "cuda")
    b = dataclasses.replace(b, metadata={**b.metadata, "global_scratch_size": 256})
    src = launcher.kernel_source(b)
    args = _launch_args(src, launcher.symbol(b.spec_name))
    assert args[4] == ("CUdeviceptr", "global_scratch")
    assert _param_slots(src)[-2:] == ["global_scratch", "kiln_profile_scratch"]
    assert "#define KILN_RMS_NORM_F16_D4096_GLOBAL_SCRATCH_BYTES 256" in launcher.header_source([b])


def test_parameter_names_that_clash_in_c_are_renamed():
    assert launcher._c_name("int") == "int_arg" and launcher._c_name("stream") == "stream_arg"
    assert launcher._c_name("kiln_params") == "kiln_params_arg" and launcher._c_name("X") == "X"


def test_graph_ops_select_their_kernel_modules_specs():
    from kiln.artifact import aot_specs, check_aot_target
    from kiln.ir import parse
    g = parse("""func @f(%x: f16[3, 16], %w: f16[16], %g: f16[3, 32]) -> f16[3, 16] {
  %0 = kiln.silu_mul(%g) : f16[3, 16]
  %1 = kiln.rms_norm(%x, %w, eps=1e-06) : f16[3, 16]
  %2 = kiln.rms_norm(%0, %w, eps=1e-06) : f16[3, 16]
  %3 = aten.add(%1, %2) : f16[3, 16]
  return %3
}
""")
    from kiln.backends.triton import activation, norm
    names = [s.name for s in aot_specs(g, "cuda")]
    assert names == [s.name for s in activation.AOT_SPECS + norm.AOT_SPECS]
    check_aot_target("cuda")
    check_aot_target("hip")
    with pytest.raises(ValueError, match="-t cuda or -t hip"):
        check_aot_target("cpu")


# ------------------------------------------------- running the launchers against a stub driver

# A stand-in for the driver library with the functions the launchers call: it records what
# it is given, so the generated code runs on this CPU machine. Linked into the same library
# with -Bsymbolic, so that a real driver loaded in the process cannot take its place.
STUB = r"""
#include <{header}>
#include <string.h>

int stub_sizes[64];
unsigned char stub_args[64][16];
unsigned int stub_dims[7];   /* grid x y z, block x y z, shared bytes */
void *stub_stream;
const void *stub_image;
char stub_kernel[128];
int stub_launches, stub_loads, stub_unloads, stub_shared_attr = -1, stub_fail_get;

{result} {load}({module} *m, const void *image) {{
  stub_image = image; stub_loads++; *m = ({module})0x10; return {ok};
}}
{result} {get}({function} *f, {module} m, const char *name) {{
  (void)m;
  if (stub_fail_get) return ({result})stub_fail_get;
  strncpy(stub_kernel, name, sizeof stub_kernel - 1); *f = ({function})0x20; return {ok};
}}
{result} {unload}({module} m) {{ (void)m; stub_unloads++; return {ok}; }}
{result} {launch}({function} f, unsigned int gx, unsigned int gy, unsigned int gz,
                  unsigned int bx, unsigned int by, unsigned int bz, unsigned int shared,
                  {stream} stream, void **params, void **extra) {{
  unsigned int dims[7] = {{gx, gy, gz, bx, by, bz, shared}};
  int i;
  (void)f; (void)extra;
  memcpy(stub_dims, dims, sizeof dims);
  stub_stream = (void *)stream;
  for (i = 0; i < 64 && stub_sizes[i] > 0; i++) memcpy(stub_args[i], params[i], stub_sizes[i]);
  stub_launches++;
  return {ok};
}}
"""
STUB_CUDA = r"""
CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)0x1; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) { (void)c; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *d, int i) { *d = i; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
  (void)d; *c = (CUcontext)0x1; return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
  (void)f;
  if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) stub_shared_attr = v;
  return CUDA_SUCCESS;
}
"""


def _stub_library(target: str, out_dir: Path, tmp: Path):
    import ctypes
    if CC is None or not (INCLUDE[target] / HEADER_OF[target]).is_file():
        pytest.skip("no C compiler or no driver headers")
    api = launcher.API[target]
    stub = STUB.format(header=HEADER_OF[target], result=api.result, ok=api.success,
                       module=api.module, function=api.function, stream=api.stream,
                       load=api.load, get=api.get_function, unload=api.unload, launch=api.launch)
    stub += STUB_CUDA if target == "cuda" else ""
    (tmp / "stub.c").write_text(stub)
    lib = tmp / f"libstub_{target}.so"
    cmd = [CC, "-shared", "-fPIC", "-Wall", "-Werror", "-Wl,-Bsymbolic", f"-I{INCLUDE[target]}",
           "-D__HIP_PLATFORM_AMD__", "-o", str(lib), str(tmp / "stub.c"),
           *sorted(str(p) for p in out_dir.glob(f"*.{target}.c")), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


@pytest.mark.parametrize("target", ["cuda", "hip"])
def test_launchers_pass_what_the_kernel_takes(binaries, out_dir, tmp_path, target):
    import ctypes
    import struct
    lib = _stub_library(target, out_dir, tmp_path)
    stub = {n: ctypes.c_int.in_dll(lib, n) for n in
            ("stub_launches", "stub_loads", "stub_unloads", "stub_shared_attr", "stub_fail_get")}
    b = next(b for b in binaries if b.spec_name == "rms_norm_f16_d4096" and b.target == target)
    abi = launcher.kernel_abi(b)
    ctype = {"int32_t": ctypes.c_int32, "float": ctypes.c_float}
    fn = getattr(lib, launcher.symbol(b.spec_name))
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 3 + [
        ctypes.c_uint64 if p.triton_type.startswith("*") else ctype[p.c_type] for p in abi.params]
    values = [0x1000 * (i + 1) if p.triton_type.startswith("*") else
              (1e-6 if p.c_type == "float" else 7 + i) for i, p in enumerate(abi.params)]
    sizes = (ctypes.c_int * 64).in_dll(lib, "stub_sizes")
    for i, p in enumerate(abi.params):
        sizes[i] = p.size
    for j in range(len(abi.hidden)):
        sizes[len(abi.params) + j] = 8

    assert fn(0xABC, 5, 2, 1, *values) == 0
    assert stub["stub_loads"].value == 1 and stub["stub_launches"].value == 1
    assert ctypes.string_at(ctypes.c_void_p.in_dll(lib, "stub_image"), len(b.binary)) == b.binary
    assert ctypes.string_at(ctypes.addressof((ctypes.c_char * 128).in_dll(lib, "stub_kernel"))) \
        == b.kernel_name.encode()
    dims = list((ctypes.c_uint * 7).in_dll(lib, "stub_dims"))
    assert dims == [5, 2, 1, abi.threads, 1, 1, b.metadata["shared"]]
    assert ctypes.c_void_p.in_dll(lib, "stub_stream").value == 0xABC
    args = (ctypes.c_ubyte * 16 * 64).in_dll(lib, "stub_args")
    for i, (p, v) in enumerate(zip(abi.params, values)):
        fmt = {"*": "<Q", "int32_t": "<i", "float": "<f"}["*" if p.triton_type[0] == "*" else p.c_type]
        assert bytes(args[i])[:p.size] == struct.pack(fmt, v), p.name
    for j in range(len(abi.hidden)):   # the hidden scratch pointers are NULL
        assert bytes(args[len(abi.params) + j])[:8] == bytes(8)
    assert stub["stub_shared_attr"].value == -1   # 16 bytes of shared memory: no opt-in

    assert fn(0xABC, 5, 0, 1, *values) == 0 and stub["stub_launches"].value == 1   # empty grid
    assert fn(0xABC, 1, 1, 1, *values) == 0 and stub["stub_loads"].value == 1      # loaded once

    big = next(b for b in binaries if b.spec_name == "scaled_mm_int8_bf16_small_m"
               and b.target == target)
    load = getattr(lib, launcher.symbol(big.spec_name) + "_load")
    load.restype = ctypes.c_int
    stub["stub_fail_get"].value = 500            # a failing lookup is returned and undone...
    assert load() == 500 and stub["stub_unloads"].value == 1
    stub["stub_fail_get"].value = 0              # ...so the next call loads afresh
    assert load() == 0 and stub["stub_loads"].value == 3
    want = big.metadata["shared"] if target == "cuda" else -1   # opt in above 48 KiB (cuda)
    assert stub["stub_shared_attr"].value == want
    unload = getattr(lib, launcher.symbol(big.spec_name) + "_unload")
    unload.restype = ctypes.c_int
    assert unload() == 0 and stub["stub_unloads"].value == 2
    load_all = getattr(lib, f"kiln_{target}_load_all")
    load_all.restype, load_all.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_char_p)]
    failed = ctypes.c_char_p()
    assert load_all(ctypes.byref(failed)) == 0 and failed.value is None


def test_recompile_hint_keeps_aot():
    from kiln.artifact import recompile_hint
    m = {"model": {"spec": "smollm2"}, "target": "cuda", "options": {"aot": True}}
    assert recompile_hint(m, Path("/a")) == "recompile with: kiln compile smollm2 -t cuda --aot -o /a"
