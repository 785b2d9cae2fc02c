"""SmolLM2 compiled once per session into a temporary artifact, by the real `kiln compile`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import KILN, kiln_env  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "smollm2.kiln"
    r = subprocess.run(KILN + ["compile", "smollm2", "-t", "cpu", "-o", str(out)], env=kiln_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "manifest.json").is_file()
    return out
