"""Shared by the serving tests: how to run the `kiln` CLI in a child process."""
from __future__ import annotations

import os
import sys

KILN = [sys.executable, "-m", "kiln.cli"]


def kiln_env() -> dict:
    env = dict(os.environ)
    for k in ("KILN_DUMP_DIR", "KILN_DISABLE_PASSES", "KILN_PASS_LIMIT"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env
