"""A job that asked for GPUs stops with one line when it finds no CUDA, instead of training on the CPU.

Without this, a GPU job whose CUDA is not visible (wrong CUDA_VISIBLE_DEVICES, a driver mismatch, a CPU-only torch
wheel) would pick gloo and megavictor's CPU compatibility layer and run, silently, orders of magnitude slower.
CUDA is expected when `megavictor launch --gpus-per-node` started the job (it sets MEGAVICTOR_EXPECT_CUDA=1 on every
task; so can a user's own launcher) or when the config names a GPU-only feature.
"""

from __future__ import annotations

import os

import torch

from megavictor.config import AttentionBackend, Config
from megavictor.errors import UserError

ENV = "MEGAVICTOR_EXPECT_CUDA"


class CudaMissing(UserError):
    """The job expects CUDA and none is visible."""


def cuda_expected_by(cfg: Config) -> str | None:
    """What makes this job expect CUDA (a phrase for the error line), or None."""
    if os.environ.get(ENV, "") not in ("", "0"):
        return f"{ENV}={os.environ[ENV]} (set by megavictor launch --gpus-per-node)"
    if cfg.train.attention_backend in (AttentionBackend.TE, AttentionBackend.FLASH):
        return f"train.attention_backend={cfg.train.attention_backend}"
    if cfg.train.fp8 is not None:
        return f"train.fp8={cfg.train.fp8}"
    return None


def require_cuda_if_expected(cfg: Config) -> None:
    """Raise `CudaMissing` (one line, exit 2) when the job expects CUDA and torch sees no GPU."""
    reason = cuda_expected_by(cfg)
    if reason is not None and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise CudaMissing(f"{reason} expects CUDA GPUs, but torch sees none (torch {torch.__version__}, "
                          f"CUDA_VISIBLE_DEVICES={visible!r}); fix the node's GPUs/driver or the torch install, "
                          "or run without GPUs (no --gpus-per-node, train.attention_backend=local, train.fp8=null)")
