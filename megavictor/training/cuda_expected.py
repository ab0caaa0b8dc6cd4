"""What a training job expects of CUDA: a job that asked for GPUs stops with one line when it finds none, instead
of training on the CPU; and `train.attention_backend: null` becomes the best backend the machine has.

Without this, a GPU job whose CUDA is not visible (wrong CUDA_VISIBLE_DEVICES, a driver mismatch, a CPU-only torch
wheel) would pick gloo and megavictor's CPU compatibility layer and run, silently, orders of magnitude slower.
CUDA is expected when `megavictor launch --gpus-per-node` started the job (it sets MEGAVICTOR_EXPECT_CUDA=1 on every
task; so can a user's own launcher) or when the config names a GPU-only feature.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from megavictor.config import AttentionBackend, Config, Engine
from megavictor.errors import UserError, notice

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


def resolve_attention_backend(cfg: Config) -> None:
    """Fill in `train.attention_backend: null` for this machine, as the training job starts (each rank, so that a
    login node without GPUs decides nothing for the GPU nodes): Transformer Engine's THD attention (fused
    FlashAttention / cuDNN kernels, no [S, S] mask) on CUDA where Transformer Engine is installed, or with
    `train.fp8`, which needs it; megatron's local layers otherwise, and for the deepspeed engine (SDPA) and FastV
    (which reads attention probabilities). On CUDA without Transformer Engine it says so in one line."""
    t, gpu = cfg.train, torch.cuda.is_available()
    if t.attention_backend is None:
        t.attention_backend = _best_attention_backend(cfg, gpu)
    if gpu and t.attention_backend == AttentionBackend.LOCAL and not _softmax_kernels_available():
        notice("train.attention_backend=local: APEX's fused softmax kernels (scaled_masked_softmax_cuda) are not "
               "installed, so the local attention's softmax runs unfused (slower, more memory)")


def _softmax_kernels_available() -> bool:
    from megavictor.model.specs import softmax_kernels_available  # megatron: only on GPU nodes, which train anyway

    return softmax_kernels_available()


def _best_attention_backend(cfg: Config, gpu: bool) -> AttentionBackend:
    if cfg.train.engine == Engine.DEEPSPEED or cfg.peer.reads_attention:
        return AttentionBackend.LOCAL
    if cfg.train.fp8 is not None or (gpu and importlib.util.find_spec("transformer_engine") is not None):
        return AttentionBackend.TE
    if gpu:
        notice("train.attention_backend=null: Transformer Engine is not installed, so attention runs on megatron's "
               "local layers (an explicit [S, S] mask); install transformer-engine for the THD attention path, or set "
               "train.attention_backend=local")
    return AttentionBackend.LOCAL
