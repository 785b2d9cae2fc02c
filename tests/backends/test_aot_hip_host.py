"""`kiln compile -t hip --aot` output loaded by a C host program built against the HIP
runtime itself: the headers and libamdhip64 of Debian's libamdhip64-dev (ROCm 5.2; `make
test` installs it through .ci/system-packages), not the headers Triton's wheel carries
(tests/backends/test_aot_launcher.py compiles against those, and runs the launchers
against a stub driver).

The artifact is a tiny Llama's, compiled by the CLI in-process; its aot/ keeps two of the
graph's AOT variants (a fused GEMV and paged decode attention) so that compiling them for
gfx942 stays within CI's time (all of them take minutes on 2 cores; test_triton_aot.py
compiles every variant for both targets). The host program, generated from the artifact's
manifest.json as a C server would use it:
- declares a pointer of the manifest's launcher type for every kernel and assigns it the
  header's function: with -Werror the header must match the manifest argument for
  argument (the C ABI a server builds against);
- links every launcher against the real libamdhip64 (all HIP calls resolve);
- runs: asks the runtime for devices and loads every kernel. On this machine (no GPU) HIP
  answers hipErrorNoDevice and the first kernel's load fails with a HIP error naming it;
  on a machine with an AMD GPU every kernel must load.
Also each launcher asks hipModuleGetFunction for a kernel its embedded hsaco defines (the
function and its .kd descriptor, read with nm).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import models

HIP_INCLUDE = Path("/usr/include")
HIP_HEADER = HIP_INCLUDE / "hip" / "hip_runtime_api.h"
KEEP = ("rms_norm_mm_f16_m1_k4096", "paged_attn_decode_f16_d64_bs16")
CC = shutil.which("gcc") or shutil.which("cc")
NM = shutil.which("nm")


def _hip_runtime_or_skip():
    missing = [what for what, there in (("a C compiler", CC), ("nm", NM),
                                        (str(HIP_HEADER), HIP_HEADER.is_file()))
               if not there]
    if missing:
        reason = (f"needs {', '.join(missing)}: apt-get install libamdhip64-dev binutils gcc "
                  f"(make test does, through .ci/system-packages)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    from kiln import artifact
    from kiln.cli import main
    _hip_runtime_or_skip()
    tmp = tmp_path_factory.mktemp("hip_aot")
    models.tiny_llama_dir(tmp / "model")
    every = artifact.aot_specs

    def two_of_the_graphs(graph, target):
        specs = every(graph, target)
        assert set(KEEP) <= {s.name for s in specs}   # variants this graph really has
        return [s for s in specs if s.name in KEEP]
    mp = pytest.MonkeyPatch()
    mp.setattr(artifact, "aot_specs", two_of_the_graphs)
    try:
        assert main(["compile", str(tmp / "model"), "-t", "hip", "--aot", "--block-size", "16",
                     "-o", str(tmp / "hip.kiln")]) == 0
    finally:
        mp.undo()
    return tmp / "hip.kiln" / "aot"


def _host_program(manifest: list[dict]) -> str:
    lines = ['#include "kiln_kernels.h"', "#include <stdio.h>", ""]
    for k in manifest:
        args = ", ".join(["hipStream_t", "unsigned int", "unsigned int", "unsigned int"]
                         + [a["c_type"] for a in k["launcher"]["args"]])
        lines.append(f"static hipError_t (*const {k['spec']}_launch)({args}) = "
                     f"{k['launcher']['function']};")
    lines += ["", "int main(void) {",
              "  int devices = -1;",
              "  hipError_t counted = hipGetDeviceCount(&devices);",
              "  const char *failed = NULL;",
              "  hipError_t loaded = kiln_hip_load_all(&failed);",
              '  printf("count %s\\ndevices %d\\nload_all %s\\nfailed %s\\n", '
              "hipGetErrorName(counted), devices, hipGetErrorName(loaded), "
              'failed ? failed : "-");']
    lines += [f'  printf("launcher %p\\n", (void *){k["spec"]}_launch);' for k in manifest]
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def test_artifact_kernels_are_what_the_launchers_load(aot_dir):
    manifest = json.loads((aot_dir / "manifest.json").read_text())
    assert sorted(k["spec"] for k in manifest) == sorted(KEEP)
    for k in manifest:
        source = (aot_dir / k["launcher"]["file"]).read_text()
        asked = re.findall(r'hipModuleGetFunction\([^;]*?"([^"]+)"\)', source)
        assert asked == [k["kernel_name"]], asked
        symbols = subprocess.run([NM, str(aot_dir / k["file"])], capture_output=True,
                                 text=True, check=True).stdout.split("\n")
        defined = {line.split()[-1]: line.split()[1] for line in symbols if len(line.split()) == 3}
        assert defined.get(k["kernel_name"]) == "T", (k["kernel_name"], defined)
        assert k["kernel_name"] + ".kd" in defined


def test_host_program_builds_against_the_hip_runtime_and_loads(aot_dir, tmp_path):
    manifest = json.loads((aot_dir / "manifest.json").read_text())
    (tmp_path / "host.c").write_text(_host_program(manifest))
    exe = tmp_path / "host"
    cmd = [CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-D__HIP_PLATFORM_AMD__",
           f"-I{aot_dir}", f"-I{HIP_INCLUDE}", str(tmp_path / "host.c"),
           *sorted(str(p) for p in aot_dir.glob("*.hip.c")), "-lamdhip64", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    said = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    launchers = [line for line in run.stdout.splitlines() if line.startswith("launcher ")]
    assert len(launchers) == len(manifest) and "(nil)" not in run.stdout
    if int(said["devices"]) > 0:   # an AMD GPU: every kernel loads
        assert said["load_all"] == "hipSuccess" and said["failed"] == "-", run.stdout
    else:                          # none: the runtime says so, and the first load fails cleanly
        assert said["count"] == "hipErrorNoDevice", run.stdout
        assert said["load_all"].startswith("hipError"), run.stdout
        assert said["failed"] == manifest[0]["spec"], run.stdout
