"""`.ci/gpu-check` (the GPU session's script) on a machine without CUDA: one line on stderr, exit 2, at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch

from tests.runs import ROOT

SCRIPT = ROOT / ".ci" / "gpu-check"


def test_gpu_check_without_cuda_exits_2_with_one_line(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the script would run the GPU check")
    assert os.access(SCRIPT, os.X_OK)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "MEGAVICTOR_GPU_CHECK_DIR": str(tmp_path / "work")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "work").exists()  # nothing installed, prepared or written
    assert time.monotonic() - start < 30


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_is_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
