"""Which code a benchmark measured, for every result it writes.

KILN_CODE_VERSION when set, else `git describe --always --dirty` of the checkout. On the
lent GPU machine the copy of the working tree carries a `.git` from the start of the
session, so git there names an older commit: `.ci/gpu-prepare` (run here, right before the
device calls) writes this checkout's describe to `.carry/code-version`, and the device
command exports it (`export KILN_CODE_VERSION=$(cat .carry/code-version)`; the GPU bench
scripts do)."""
from __future__ import annotations

from kiln.bench import code_version  # noqa: F401 - one definition, shared with kiln bench serve
