"""Which parameters train in LLaVA's two stages (shared by the megatron model and its reference twin)."""

from __future__ import annotations

from torch import nn

from megavictor.config import Config


def is_trainable(name: str, cfg: Config) -> bool:
    """LLaVA stage 1 trains projector + registers (+ LLaVA-NeXT's image newline, part of the image path into the
    LLM like the projector); stage 2 also the LLM; the ViT only when `vision.freeze` is off."""
    if name.startswith("vision."):
        return not cfg.vision.freeze
    if name.startswith("projector.") or name in ("registers", "image_newline"):
        return True
    return cfg.train.llava_stage == 2


def apply_freezing(model: nn.Module, cfg: Config) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, cfg))
