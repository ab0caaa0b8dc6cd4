"""Where each parameter of the full (reference) model lives in a tensor- and pipeline-parallel `VictorVLM`.

Full names are the reference model's (`decoder.layers.{global}`); a pipeline stage numbers its layers from 0.
Tensor parallelism splits column-parallel weights on dim 0 and row-parallel ones on dim 1; the SwiGLU `linear_fc1`
([gate; up]) is split per half, since each rank holds [gate_shard; up_shard]. Everything else is replicated.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
           "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")
# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def tp_split_dim(name: str) -> int | None:
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def _is_swiglu(name: str) -> bool:
    return name.startswith("decoder.") and ".mlp.linear_fc1." in name


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This tensor-parallel rank's piece of a full parameter."""
    dim = tp_split_dim(name)
    if dim is None or tp == 1:
        return full
    if _is_swiglu(name):
        return torch.cat([half.chunk(tp, dim=0)[tp_rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard`: the full parameter from all tensor-parallel ranks' pieces (in rank order)."""
    dim = tp_split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_swiglu(name):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)
    return torch.cat(shards, dim=dim)


def stage_offsets(layers_per_stage: list[int]) -> list[int]:
    offsets = [0]
    for n in layers_per_stage[:-1]:
        offsets.append(offsets[-1] + n)
    return offsets


def full_name(local_name: str, layer_offset: int) -> str:
    """A stage-local parameter name (local or TE layers) -> the full model's name."""
    for te_name, name in _TE_NORMS.items():
        if local_name.endswith(te_name):
            local_name = local_name[: -len(te_name)] + name
            break
    return _DECODER_LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name)


def local_name(name: str, layer_offset: int, num_layers: int) -> str | None:
    """The full model's name -> this stage's name, or None when the stage does not hold that decoder layer."""
    match = _DECODER_LAYER.match(name)
    if match is None:
        return name
    index = int(match.group(1)) - layer_offset
    if not 0 <= index < num_layers:
        return None
    return _DECODER_LAYER.sub(f"decoder.layers.{index}.", name)


def shard_into(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp: int,
               layer_offset: int, prefix: str = "") -> None:
    """Copy a full state dict into one stage/rank of a parallel model; every local parameter whose name starts
    with `prefix` must be covered."""
    params = {name: p for name, p in model.named_parameters() if name.startswith(prefix)}
    for name, param in params.items():
        source = full.get(full_name(name, layer_offset))
        if source is None:
            raise KeyError(f"no full parameter for {name} (as {full_name(name, layer_offset)})")
        piece = shard(full_name(name, layer_offset), source, tp_rank, tp)
        if piece.shape != param.shape:
            raise ValueError(f"{name}: full-model shard has shape {tuple(piece.shape)}, model has {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(piece)


def full_shape(name: str, local_shape: torch.Size, tp: int) -> tuple[int, ...]:
    shape = list(local_shape)
    dim = tp_split_dim(name)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


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


def load_vision_tower(path: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Pretrained ViT weights (`vision.init_from`): a safetensors file holding exactly the tower's full names
    (`vision.*`) with the shapes `expected` gives."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001  (OSError, or safetensors' own error type for a malformed file)
        raise ValueError(f"vision.init_from={path}: cannot read a safetensors file ({exc}); for the demo, "
                         "`megavictor prep digits` writes vision_encoder.safetensors into the data folder") from exc
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"vision.init_from={path}: tensors do not match this config's vision tower "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"vision.init_from={path}: {name} has shape {tuple(tensors[name].shape)}, the config's "
                             f"vision tower needs {tuple(shape)} (check the vision.* sizes)")
    return tensors
