"""Things a test run builds once for all its xdist workers."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock


def built_once_per_run(tmp_path_factory, name: str, build) -> Path:
    """A directory `build(path)` fills once per test run, shared by every xdist worker (each
    worker's session fixtures would otherwise build their own copy: a compiled SmolLM2 costs
    ~50 s of a 2-core CI machine). The first worker to ask builds it under a file lock; a
    build that failed is retried by the next one, not served half-written."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            done.touch()
    return out
