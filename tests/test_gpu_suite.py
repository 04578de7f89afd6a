"""bench/gpu_suite.sh on a machine without an NVIDIA GPU: it exits at once with status 2
and says why, running and writing nothing (CI and developer machines have no GPU)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "bench" / "gpu_suite.sh"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_suite_exits_quickly_and_clearly_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(SUITE), str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "gpu_suite: no NVIDIA GPU here" in done.stderr and "nothing run" in done.stderr
    assert time.monotonic() - start < 10.0
    assert not out.exists()
