"""Which code a benchmark measured, for every result it writes.

KILN_CODE_VERSION when set, else `git describe --always --dirty` of the checkout. On the
lent GPU machine the copy of the working tree carries a `.git` from the start of the
session, so git there names an older commit: `.ci/gpu-prepare` (run here, right before the
device calls) writes this checkout's describe to `.carry/code-version`, and the device
command exports it (`export KILN_CODE_VERSION=$(cat .carry/code-version)`; the GPU bench
scripts do)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_version() -> str:
    if os.environ.get("KILN_CODE_VERSION"):
        return os.environ["KILN_CODE_VERSION"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
