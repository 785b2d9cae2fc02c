"""C launchers for AOT-compiled Triton kernels, so that a C/C++ program can run them
without Python.

From the `CompiledBinary` records of `aot.compile_specs` this writes, per binary, one
readable C file `<spec>.<target>.c` holding

- the cubin (cuda) or hsaco (hip) as a byte array;
- `kiln_<spec>_load()`: loads the module once (cuModuleLoadData / hipModuleLoadData, under
  a mutex), looks the kernel up and, on cuda, raises the dynamic shared memory limit when
  the kernel needs more than 48 KiB; `kiln_<spec>_unload()` undoes it;
- `kiln_<spec>(stream, gridX, gridY, gridZ, <args>)`: loads on first use, packs the
  arguments and calls cuLaunchKernel / hipModuleLaunchKernel with num_warps * warp_size
  threads and the kernel's shared memory; returns the driver's error code.

plus `kiln_kernels.h` declaring every function (and each kernel's constexprs as macros:
a caller needs e.g. ROWS to size the grid), `kiln_kernels.<target>.c` with
`kiln_<target>_load_all()`, and README.txt saying how to build a shared library.

The arguments are the kernel's non-constexpr parameters in signature order: pointers as
CUdeviceptr / hipDeviceptr_t, i32/i64/... as int32_t/int64_t/..., fp32 as float, fp64 as
double, fp16/bf16 as uint16_t bit patterns. Constexprs are compiled in.

The Triton ABI, as Triton 3.6's and 3.9's own launchers use it (backends/{nvidia,amd}/
driver.py and driver.c; 3.6 generates its launcher's C in `make_launcher`, 3.9 packs the
arguments in driver.c): the kernel takes its non-constexpr parameters in order (fp32
scalars as 4 bytes), then two hidden pointers, global scratch and profile scratch, on cuda
and hip alike, each NULL when the metadata's size for it is 0 (3.6's hip launcher always
passes NULL global scratch). Blocks are num_warps * warp_size threads and the dynamic
shared memory is `metadata["shared"]`. Older releases had fewer hidden pointers, so
rather than trusting a version number `kernel_abi` reads the parameter list of the
compiled kernel itself (the PTX `.entry`, or the AMDGPU metadata's `.args`) and checks
that it is the launcher's arguments followed by at most two pointer-sized parameters; only
when the assembly is absent does it fall back to the metadata's scratch keys. A kernel needing global scratch gets a
`global_scratch` argument (its size: `KILN_<SPEC>_GLOBAL_SCRATCH_BYTES` per program);
kernels needing profile scratch (instrumented), clusters (num_ctas > 1), cooperative or
PDL launches are refused: none of kiln's kernels uses them.

CLI: `python -m kiln.backends.triton.launcher -t cuda -o DIR [-k FILTER] [-j N]` compiles
the specs and writes binaries, manifest.json and the C files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass

from . import aot

HEADER = "kiln_kernels.h"
README = "README.txt"

# Triton scalar types -> (C type, size in bytes). fp16/bf16 travel as their bit patterns.
SCALAR_TYPES = {
    "i1": ("int8_t", 1), "i8": ("int8_t", 1), "i16": ("int16_t", 2), "i32": ("int32_t", 4),
    "i64": ("int64_t", 8), "u1": ("uint8_t", 1), "u8": ("uint8_t", 1), "u16": ("uint16_t", 2),
    "u32": ("uint32_t", 4), "u64": ("uint64_t", 8), "fp16": ("uint16_t", 2),
    "bf16": ("uint16_t", 2), "fp32": ("float", 4), "f32": ("float", 4), "fp64": ("double", 8),
}
HIDDEN = ("global_scratch", "profile_scratch")   # trailing hidden pointers, in this order

_C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for goto "
    "if inline int long register restrict return short signed sizeof static struct switch "
    "typedef union unsigned void volatile while bool true false NULL".split())
# Names the launch function itself uses for its first parameters.
_LAUNCH_NAMES = frozenset({"stream", "gridX", "gridY", "gridZ", "global_scratch"})
# Every local of the generated functions starts with kiln_, as do the file-level names, and
# a kernel parameter whose name does gets "_arg" appended: they cannot collide.


@dataclass(frozen=True)
class DriverApi:
    """The spelling of one target's driver API in C."""
    target: str
    macro: str          # defined by the target's .c files before including the header
    include: str
    result: str
    success: str
    stream: str
    module: str
    function: str
    devptr: str
    load: str
    get_function: str
    launch: str
    unload: str
    null: str           # a null device pointer


API = {
    "cuda": DriverApi("cuda", "KILN_TARGET_CUDA", "<cuda.h>", "CUresult", "CUDA_SUCCESS",
                      "CUstream", "CUmodule", "CUfunction", "CUdeviceptr", "cuModuleLoadData",
                      "cuModuleGetFunction", "cuLaunchKernel", "cuModuleUnload", "0"),
    "hip": DriverApi("hip", "KILN_TARGET_HIP", "<hip/hip_runtime_api.h>", "hipError_t",
                     "hipSuccess", "hipStream_t", "hipModule_t", "hipFunction_t",
                     "hipDeviceptr_t", "hipModuleLoadData", "hipModuleGetFunction",
                     "hipModuleLaunchKernel", "hipModuleUnload", "NULL"),
}


class LauncherError(ValueError):
    """A compiled kernel that these launchers cannot run, with the reason."""


@dataclass(frozen=True)
class Param:
    name: str           # the kernel's parameter name
    c_name: str         # the C argument name
    triton_type: str    # "*fp16", "i32", ... ("*" marks pointers)
    c_type: str
    size: int


@dataclass(frozen=True)
class KernelAbi:
    """What a launcher must pass to one compiled kernel."""
    params: tuple[Param, ...]       # the launcher's arguments, in kernel order
    hidden: tuple[str, ...]         # trailing hidden pointers (names from HIDDEN)
    threads: int                    # per block
    shared: int                     # dynamic shared memory, bytes
    global_scratch: int             # bytes per program; 0: pass NULL
    source: str                     # where `hidden` was read: "ptx", "amdgcn" or "metadata"


def c_identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return "_" + ident if ident[:1].isdigit() else ident


def symbol(spec_name: str) -> str:
    """The launch function's name; `<symbol>_load` / `_unload` go with it."""
    return "kiln_" + c_identifier(spec_name)


def _c_name(name: str) -> str:
    ident = c_identifier(name)
    if ident in _C_KEYWORDS or ident in _LAUNCH_NAMES or ident.startswith("kiln_"):
        ident += "_arg"
    return ident


def launcher_params(b: aot.CompiledBinary) -> list[Param]:
    """The launcher's arguments: the kernel signature minus its constexprs."""
    api = API[aot.family(b.target)]
    params = []
    for name, ty in b.signature.items():
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            c_type, size = api.devptr, 8
        elif ty in SCALAR_TYPES:
            c_type, size = SCALAR_TYPES[ty]
        else:
            raise LauncherError(f"kernel {b.spec_name!r}: parameter {name!r} has type {ty!r}, "
                                f"which the C launcher does not pass (supported: pointers, "
                                f"{', '.join(sorted(SCALAR_TYPES))})")
        params.append(Param(name, _c_name(name), ty, c_type, size))
    names = [p.c_name for p in params]
    if len(set(names)) != len(names):
        raise LauncherError(f"kernel {b.spec_name!r}: parameter names collide in C: {names}")
    return params


# ---------------------------------------------------------------- the compiled kernel's ABI

_PTX_SIZES = {"8": 1, "16": 2, "32": 4, "64": 8}


def ptx_param_sizes(ptx: str, kernel_name: str) -> list[int] | None:
    """Byte size of each parameter of `.entry kernel_name(...)` in PTX, or None."""
    m = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        return None
    sizes = []
    for decl in m.group(1).split(","):
        decl = decl.strip()
        if not decl:
            continue
        t = re.match(r"\.param\s+(?:\.ptr\s+)?\.[busf](\d+)\b.*?(?:\[(\d+)\])?$", decl)
        if t is None:
            return None
        sizes.append(_PTX_SIZES[t.group(1)] * int(t.group(2) or 1))
    return sizes


def amdgcn_param_sizes(amdgcn: str, kernel_name: str) -> list[int] | None:
    """Byte size of each explicit argument of `kernel_name` in the AMDGPU metadata, or None."""
    m = re.search(r"\.amdgpu_metadata\s*\n(---\n.*?\n\.\.\.)\s*\.end_amdgpu_metadata", amdgcn,
                  re.S)
    if m is None:
        return None
    try:
        import yaml
        meta = yaml.safe_load(m.group(1))
    except Exception:  # noqa: BLE001 - no yaml, or text it cannot read: fall back
        return None
    for k in (meta or {}).get("amdhsa.kernels", []):
        if k.get(".name") == kernel_name:
            return [int(a[".size"]) for a in k.get(".args", [])
                    if not str(a.get(".value_kind", "")).startswith("hidden_")]
    return None


def _compiled_param_sizes(b: aot.CompiledBinary) -> tuple[list[int] | None, str]:
    if aot.family(b.target) == "cuda" and "ptx" in b.asm:
        return ptx_param_sizes(b.asm["ptx"], b.kernel_name), "ptx"
    if aot.family(b.target) == "hip" and "amdgcn" in b.asm:
        return amdgcn_param_sizes(b.asm["amdgcn"], b.kernel_name), "amdgcn"
    return None, "metadata"


def kernel_abi(b: aot.CompiledBinary) -> KernelAbi:
    if aot.family(b.target) not in API:
        raise LauncherError(f"no C launcher for target {b.target!r}; known: {sorted(API)}")
    md = b.metadata
    where = f"kernel {b.spec_name!r} ({b.target})"
    for key, ok in (("num_ctas", 1), ("launch_cooperative_grid", False), ("launch_pdl", False)):
        if md.get(key, ok) != ok:
            raise LauncherError(f"{where}: {key}={md[key]!r} is not supported by the C launcher")
    if md.get("profile_scratch_size", 0):
        raise LauncherError(f"{where}: needs profile scratch (an instrumented kernel); "
                            "compile it without instrumentation")
    params = launcher_params(b)
    sizes, source = _compiled_param_sizes(b)
    if sizes is None:
        source = "metadata"
        hidden = tuple(h for h in HIDDEN if f"{h}_size" in md)
    else:
        user, extra = sizes[:len(params)], sizes[len(params):]
        want = [p.size for p in params]
        if user != want or len(extra) > len(HIDDEN) or any(s != 8 for s in extra):
            raise LauncherError(
                f"{where}: the compiled kernel's parameters ({source}: sizes {sizes}) are not "
                f"the launcher's arguments {[p.name for p in params]} (sizes {want}) followed "
                f"by at most {len(HIDDEN)} hidden pointers; this Triton's ABI is not one the "
                f"launcher knows")
        hidden = HIDDEN[:len(extra)]
    scratch = int(md.get("global_scratch_size", 0) or 0)
    if scratch and "global_scratch" not in hidden:
        raise LauncherError(f"{where}: needs global scratch but takes no scratch pointer")
    warp = int(md.get("warp_size") or aot.gpu_target(b.target).warp_size)
    return KernelAbi(tuple(params), hidden, int(md["num_warps"]) * warp, int(md.get("shared", 0)),
                     scratch, source)


# ---------------------------------------------------------------------------------- C text

def _c_value(v) -> str | None:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v) if -2**31 <= v < 2**31 else f"{v}LL"
    if isinstance(v, float):
        return repr(v)
    return None


def _macro_prefix(b: aot.CompiledBinary) -> str:
    return symbol(b.spec_name).upper()


def _launch_signature(b: aot.CompiledBinary, abi: KernelAbi) -> str:
    api = API[aot.family(b.target)]
    args = [f"{api.stream} stream", "unsigned int gridX", "unsigned int gridY",
            "unsigned int gridZ"]
    if abi.global_scratch:
        args.append(f"{api.devptr} global_scratch")
    args += [f"{p.c_type} {p.c_name}" for p in abi.params]
    head = f"{api.result} {symbol(b.spec_name)}("
    lines, line = [], head
    for i, a in enumerate(args):
        piece = a + ("," if i < len(args) - 1 else ")")
        if len(line) + len(piece) + 1 > 96 and line.strip() != head.strip():
            lines.append(line.rstrip())
            line = " " * len(head)
        line += piece + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


def _describe(b: aot.CompiledBinary, abi: KernelAbi) -> list[str]:
    """Comment lines that say what a kernel is."""
    md = b.metadata
    const = ", ".join(f"{k}={v}" for k, v in b.constants.items()) or "none"
    arch = md.get("arch") or aot.gpu_target(b.target).arch
    out = [f"{b.spec_name}: Triton kernel {b.kernel_name} for {b.target} {arch}",
           f"  Triton {md.get('triton_version', '?')}, {md.get('num_warps')} warps, "
           f"{abi.threads} threads a block, {abi.shared} bytes of shared memory",
           f"  constexprs (compiled in): {const}"]
    args = ", ".join(f"{p.name}: {p.triton_type}" for p in abi.params) or "none"
    out.append(f"  arguments: {args}")
    if any(p.triton_type in ("fp16", "bf16") for p in abi.params):
        out.append("  fp16/bf16 scalars are passed as their 16-bit patterns")
    if abi.global_scratch:
        out.append(f"  global_scratch: device memory of {_macro_prefix(b)}_GLOBAL_SCRATCH_BYTES "
                   f"per program (gridX*gridY*gridZ programs), aligned to "
                   f"{md.get('global_scratch_align', 1)} bytes")
    return out


def _comment(lines: list[str]) -> str:
    """A C block comment; long lines wrap, indented under their first word."""
    body = []
    for ln in lines:
        lead = " " * (len(ln) - len(ln.lstrip()))
        body += textwrap.wrap(ln, 88, initial_indent="", subsequent_indent=lead + "  ",
                              break_on_hyphens=False) or [""]
    return "/*\n" + "\n".join(f" * {b}".rstrip() for b in body) + "\n */"


def _byte_array(data: bytes) -> str:
    rows = []
    for i in range(0, len(data), 16):
        rows.append("  " + ", ".join(f"0x{c:02x}" for c in data[i:i + 16]) + ",")
    return "\n".join(rows)


def _context_code(api: DriverApi) -> list[str]:
    """cuda: a module belongs to a context; use the current one, else device 0's primary."""
    if api.target != "cuda":
        return []
    return [
        "    CUcontext ctx = NULL;",
        "    err = cuInit(0);",
        "    if (err == CUDA_SUCCESS) err = cuCtxGetCurrent(&ctx);",
        "    if (err == CUDA_SUCCESS && ctx == NULL) {",
        "      CUdevice dev;",
        "      err = cuDeviceGet(&dev, 0);",
        "      if (err == CUDA_SUCCESS) err = cuDevicePrimaryCtxRetain(&ctx, dev);",
        "      if (err == CUDA_SUCCESS) err = cuCtxSetCurrent(ctx);",
        "    }",
    ]


def kernel_source(b: aot.CompiledBinary) -> str:
    """The C file for one compiled kernel. File-level names are static and start with kiln_,
    so every kernel's file can go into one library."""
    api, abi = API[b.target], kernel_abi(b)
    sym, pre = symbol(b.spec_name), _macro_prefix(b)
    ok = api.success
    kind = aot.BINARY_KIND[b.target]
    out = [_comment(_describe(b, abi) + [
        "",
        f"Generated by kiln.backends.triton.launcher from {b.spec_name}.{b.target}.{kind};",
        f"do not edit. Build: see {README}."]), ""]
    out += [f"#define {api.macro} 1", f'#include "{HEADER}"', "", "#include <pthread.h>",
            "#include <stddef.h>", "#include <stdint.h>", ""]
    out += [f"/* The {kind}, {len(b.binary)} bytes. */",
            f"static const unsigned char kiln_image[{len(b.binary)}]",
            "#if defined(__GNUC__)", "    __attribute__((aligned(16)))", "#endif",
            "    = {", _byte_array(b.binary), "};", "",
            "static pthread_mutex_t kiln_lock = PTHREAD_MUTEX_INITIALIZER;",
            f"static {api.module} kiln_module = NULL;",
            f"static {api.function} kiln_function = NULL;", ""]
    # load
    out += [f"/* Loads the module and looks up {b.kernel_name}, once: later calls only check. */",
            f"{api.result} {sym}_load(void) {{",
            f"  {api.result} err = {ok};",
            "  pthread_mutex_lock(&kiln_lock);",
            "  if (kiln_function == NULL) {"]
    context = _context_code(api)
    out += context
    load = f"err = {api.load}(&kiln_module, kiln_image);"
    out += [f"    if (err == {ok}) {load}" if context else f"    {load}"]
    out += [f"    if (err == {ok}) {{",
            f'      err = {api.get_function}(&kiln_function, kiln_module, "{b.kernel_name}");']
    if b.target == "cuda" and abi.shared > 48 * 1024:
        out += [f"      /* {abi.shared} bytes of shared memory, above the 48 KiB default: "
                "opt in. */",
                "      if (err == CUDA_SUCCESS)",
                "        err = cuFuncSetAttribute(kiln_function, "
                "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,",
                f"                                 {pre}_SHARED_BYTES);"]
    out += [f"      if (err != {ok}) {{",
            f"        {api.unload}(kiln_module);",
            "        kiln_module = NULL;",
            "        kiln_function = NULL;",
            "      }",
            "    }",
            "  }",
            "  pthread_mutex_unlock(&kiln_lock);",
            "  return err;",
            "}", ""]
    # unload
    out += [f"{api.result} {sym}_unload(void) {{",
            f"  {api.result} err = {ok};",
            "  pthread_mutex_lock(&kiln_lock);",
            f"  if (kiln_module != NULL) err = {api.unload}(kiln_module);",
            "  kiln_module = NULL;",
            "  kiln_function = NULL;",
            "  pthread_mutex_unlock(&kiln_lock);",
            "  return err;",
            "}", ""]
    # launch
    locals_, slots = [], [f"&{p.c_name}" for p in abi.params]
    for h in abi.hidden:
        if h == "global_scratch" and abi.global_scratch:
            slots.append("&global_scratch")   # the caller's argument
            continue
        why = ("this kernel needs none" if h == "global_scratch"
               else "only instrumented kernels use it")
        locals_.append(f"  {api.devptr} kiln_{h} = {api.null}; /* {why} */")
        slots.append(f"&kiln_{h}")
    out += [_comment([f"Runs {b.kernel_name} on `stream` over a gridX x gridY x gridZ grid "
                      f"of {abi.threads}-thread",
                      "blocks, loading the module on first use. Returns the driver's error "
                      "code."]),
            _launch_signature(b, abi) + " {"]
    out += locals_
    if slots:
        out.append("  void *kiln_params[] = {")
        line = "     "
        for s in slots:
            if len(line) + len(s) + 2 > 92:
                out.append(line.rstrip())
                line = "     "
            line += f" {s},"
        out += [line, "  };"]
    pad = " " * len(f"  return {api.launch}(")
    out += [f"  {api.result} kiln_err;",
            "  if (gridX == 0 || gridY == 0 || gridZ == 0)",
            f"    return {ok}; /* nothing to run (the driver rejects an empty grid) */",
            f"  kiln_err = {sym}_load();",
            f"  if (kiln_err != {ok}) return kiln_err;",
            f"  return {api.launch}(kiln_function, gridX, gridY, gridZ,",
            f"{pad}{pre}_THREADS, 1, 1,",
            f"{pad}{pre}_SHARED_BYTES,",
            f"{pad}stream, {'kiln_params' if slots else 'NULL'}, NULL);",
            "}", ""]
    return "\n".join(out)


def _declarations(b: aot.CompiledBinary) -> list[str]:
    api, abi = API[b.target], kernel_abi(b)
    sym, pre = symbol(b.spec_name), _macro_prefix(b)
    out = [_comment(_describe(b, abi))]
    out += [f"#define {pre}_THREADS {abi.threads}", f"#define {pre}_SHARED_BYTES {abi.shared}"]
    if abi.global_scratch:
        out.append(f"#define {pre}_GLOBAL_SCRATCH_BYTES {abi.global_scratch}")
    for k, v in b.constants.items():
        val = _c_value(v)
        if val is not None:
            out.append(f"#define {pre}_{c_identifier(k).upper()} {val}")
    out += [f"{api.result} {sym}_load(void);", f"{api.result} {sym}_unload(void);",
            _launch_signature(b, abi) + ";", ""]
    return out


def _targets(binaries: list[aot.CompiledBinary], targets=None) -> list[str]:
    have = {b.target for b in binaries} | set(targets or ())
    unknown = sorted(have - set(API))
    if unknown:
        raise LauncherError(f"no C launcher for target(s) {unknown}; known: {sorted(API)}")
    return [t for t in API if t in have]


def header_source(binaries: list[aot.CompiledBinary], targets=None) -> str:
    targets = _targets(binaries, targets)
    out = [_comment([
        "kiln AOT kernels: Triton kernels compiled ahead of time, with C launchers.",
        "Generated by kiln.backends.triton.launcher; do not edit.",
        "",
        "Each kernel has kiln_<spec>_load() (optional: launching loads on first use),",
        "kiln_<spec>_unload() and kiln_<spec>(stream, gridX, gridY, gridZ, args...),",
        "which return the driver's error code. Modules load into the context current",
        "at first use (cuda: device 0's primary context when none is current).",
        (f"Target: {targets[0]}." if len(targets) == 1 else
         f"Targets: {', '.join(targets)}; define KILN_TARGET_CUDA or KILN_TARGET_HIP to pick one."),
        f"Build: see {README}."]), "",
        "#ifndef KILN_KERNELS_H", "#define KILN_KERNELS_H", "", "#include <stdint.h>", ""]
    if len(targets) == 1:
        out += ["#if !defined(KILN_TARGET_CUDA) && !defined(KILN_TARGET_HIP)",
                f"#define {API[targets[0]].macro} 1", "#endif", ""]
    else:
        out += ["#if !defined(KILN_TARGET_CUDA) && !defined(KILN_TARGET_HIP)",
                '#error "define KILN_TARGET_CUDA or KILN_TARGET_HIP before including '
                f'{HEADER}"', "#endif", ""]
    for t in targets:
        api = API[t]
        out += [f"#if defined({api.macro})"]
        if t == "hip":
            out += ["#if !defined(__HIP_PLATFORM_AMD__) && !defined(__HIP_PLATFORM_NVIDIA__)",
                    "#define __HIP_PLATFORM_AMD__", "#endif"]
        out += [f"#include {api.include}", "", "#ifdef __cplusplus", 'extern "C" {', "#endif",
                "", f"{api.result} kiln_{t}_load_all(const char **failed);", ""]
        for b in binaries:
            if b.target == t:
                out += _declarations(b)
        out += ["#ifdef __cplusplus", "}", "#endif", f"#endif /* {api.macro} */", ""]
    out += ["#endif /* KILN_KERNELS_H */", ""]
    return "\n".join(out)


def load_all_source(target: str, binaries: list[aot.CompiledBinary]) -> str:
    api = API[target]
    mine = [b for b in binaries if b.target == target]
    out = [_comment([f"kiln_{target}_load_all: loads every {target} kernel of this "
                     "directory, so that a server",
                     "fails at start-up rather than at its first launch. On an error, "
                     "*failed (unless",
                     "NULL) names the kernel that failed.",
                     "Generated by kiln.backends.triton.launcher; do not edit."]), "",
           f"#define {api.macro} 1", f'#include "{HEADER}"', "", "#include <stddef.h>", "",
           f"{api.result} kiln_{target}_load_all(const char **failed) {{",
           f"  {api.result} err = {api.success};"]
    for b in mine:
        out += [f"  err = {symbol(b.spec_name)}_load();",
                f"  if (err != {api.success}) {{",
                f'    if (failed != NULL) *failed = "{b.spec_name}";',
                "    return err;", "  }"]
    if not mine:
        out.append("  (void)failed;")
    out += ["  return err;", "}", ""]
    return "\n".join(out)


def readme_text(binaries: list[aot.CompiledBinary], targets=None) -> str:
    targets = _targets(binaries, targets)
    lines = ["kiln AOT kernels",
             "================",
             "",
             "Triton kernels compiled ahead of time (cubin for cuda, hsaco for hip), each with a",
             "C launcher that embeds the binary: a C or C++ program runs them without Python.",
             f"{HEADER} declares every function and documents each kernel's arguments;",
             "manifest.json lists the kernels (symbol, signature, constexprs, metadata).",
             "",
             "Build one shared library per target (no Makefile needed):",
             ""]
    if "cuda" in targets:
        lines += ["  cuda (cuda.h from the CUDA toolkit, or the one Triton ships in",
                  "  triton/backends/nvidia/include):",
                  "",
                  "    cc -shared -fPIC -O2 -I$CUDA_HOME/include -o libkiln_kernels_cuda.so \\",
                  "       *.cuda.c -lcuda -lpthread",
                  ""]
    if "hip" in targets:
        lines += ["  hip (ROCm headers; Triton ships them in triton/backends/amd/include):",
                  "",
                  "    cc -shared -fPIC -O2 -D__HIP_PLATFORM_AMD__ -I$ROCM_PATH/include \\",
                  "       -o libkiln_kernels_hip.so *.hip.c -L$ROCM_PATH/lib -lamdhip64 -lpthread",
                  ""]
    lines += ["Then, in C or C++ (cuda shown):",
              "",
              '    #include "kiln_kernels.h"',
              "    const char *bad = NULL;",
              "    CUresult err = kiln_cuda_load_all(&bad);   /* optional: fail early */",
              "    err = kiln_<spec>(stream, gridX, gridY, gridZ, <arguments>);",
              "",
              "The grid is the caller's: the kernel's constexprs are macros in the header",
              "(KILN_<SPEC>_<NAME>) for computing it as kiln's Python launchers do.",
              ""]
    return "\n".join(lines)


def source_file(b: aot.CompiledBinary) -> str:
    return f"{b.spec_name}.{b.target}.c"


def write_launchers(binaries: list[aot.CompiledBinary], out_dir: str,
                    targets=None) -> list[str]:
    """Write the C files, the header and README.txt into the existing `out_dir`; returns the
    file names written. `targets` adds targets that have no kernel (an empty library still
    builds). Every kernel is checked (kernel_abi) before anything is written."""
    targets = _targets(binaries, targets)
    for b in binaries:
        kernel_abi(b)
    files = {}
    for b in binaries:
        files[source_file(b)] = kernel_source(b)
    for t in targets:
        files[f"kiln_kernels.{t}.c"] = load_all_source(t, binaries)
    files[HEADER] = header_source(binaries, targets)
    files[README] = readme_text(binaries, targets)
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):   # aot.write_artifacts' list: add each kernel's launcher
        with open(manifest) as f:
            entries = json.load(f)
        by_key = {(b.spec_name, b.target): b for b in binaries}
        for e in entries:
            b = by_key.get((e["spec"], e["target"]))
            if b is not None:
                abi = kernel_abi(b)
                e["launcher"] = {"file": source_file(b), "function": symbol(b.spec_name),
                                 "args": [{"name": p.name, "type": p.triton_type,
                                           "c_type": p.c_type} for p in abi.params],
                                 "hidden": list(abi.hidden), "threads": abi.threads,
                                 "shared": abi.shared}
        with open(manifest, "w") as f:
            json.dump(entries, f, indent=1)
    return sorted(files)


def write_aot(binaries: list[aot.CompiledBinary], out_dir: str, targets=None) -> str:
    """Binaries, manifest.json and the C launchers in `out_dir`, replaced as a whole."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".aot-stage-", dir=parent)
    try:
        inner = aot.write_artifacts(binaries, os.path.join(stage, "aot"))
        write_launchers(binaries, inner, targets)
        old = os.path.join(stage, "old")
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        try:
            os.rename(inner, out_dir)
        except OSError:
            if os.path.exists(old):
                os.rename(old, out_dir)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.backends.triton.launcher",
                                description="Compile kiln's Triton kernels ahead of time and "
                                            "write C launchers for them.")
    p.add_argument("-t", "--target", action="append", choices=sorted(API))
    p.add_argument("-o", "--out", required=True, help="directory to write (replaced)")
    p.add_argument("-j", "--jobs", type=int, default=None)
    p.add_argument("-k", "--filter", default="", help="only specs whose name contains this")
    args = p.parse_args(argv)
    specs = [s for s in aot.all_specs() if args.filter in s.name]
    try:
        results = aot.compile_specs(specs, tuple(args.target or API), args.jobs)
        out = write_aot(results, args.out, args.target)
    except (aot.AotCompileError, LauncherError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {len(results)} kernels with C launchers to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
