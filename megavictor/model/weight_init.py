"""Layout-independent initial weights: each full parameter's value depends only on its name, shape and the seed.

So every tp/pp layout, the reference model and the DeepSpeed engine's HF model start from exactly the same weights,
whatever order parameters are built in, which is what makes loss parity across layouts and engines testable.
"""

from __future__ import annotations

import math
import zlib

import torch

from megavictor.model.sharding import full_name, full_shape, shard


def initial_value(name: str, shape: tuple[int, ...], std: float, num_layers: int, seed: int) -> torch.Tensor:
    """The initial value of a full parameter, from a generator seeded by its name.

    Independent of the tp/pp layout and of construction order, so every layout (and the reference model)
    starts from the same weights. Norm weights are 1, biases 0; the decoder's output projections get megatron's
    scaled init (std / sqrt(2 * num_layers)).
    """
    if "layernorm" in name or ".ln_pre." in name:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    if name.startswith("decoder.") and name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    elif name in ("vision.class_token", "vision.position_embeddings.weight"):
        std = 1.0  # as CLIPViTModel initialises them (torch.randn / nn.Embedding)
    elif name == "image_newline":
        std = 1.0 / math.sqrt(shape[0])  # as LLaVA-NeXT (and transformers' LlavaNext) initialise it
    elif name == "vision.conv1.weight":
        std = 1.0 / math.sqrt(math.prod(shape[1:]))  # fan-in scaling, as nn.Conv2d's default
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def initialize(model: torch.nn.Module, std: float, num_layers: int, seed: int, tp_rank: int = 0, tp: int = 1,
               layer_offset: int = 0) -> None:
    """Give every local parameter its shard of the layout-independent initial value."""
    for name, param in model.named_parameters():
        full = full_name(name, layer_offset)
        value = initial_value(full, full_shape(full, param.shape, tp), std, num_layers, seed)
        param.copy_(shard(full, value, tp_rank, tp))
