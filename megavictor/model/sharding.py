"""Where each parameter of the full (reference) model lives in a tensor- and pipeline-parallel `VictorVLM`.

Full names are the reference model's (`decoder.layers.{global}`); a pipeline stage numbers its layers from 0.
Tensor parallelism splits column-parallel weights on dim 0 and row-parallel ones on dim 1; the SwiGLU `linear_fc1`
([gate; up]) is split per half, since each rank holds [gate_shard; up_shard]. Everything else is replicated.
"""

from __future__ import annotations

import re

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


def first_layer(layers_per_stage: list[int], pp_rank: int) -> int:
    """Global index of pipeline stage `pp_rank`'s first decoder layer."""
    return sum(layers_per_stage[:pp_rank])


def full_name(local_name: str, layer_offset: int) -> str:
    """A stage-local parameter name (local or TE layers) -> the full model's name."""
    for te_name, name in _TE_NORMS.items():
        if local_name.endswith(te_name):
            local_name = local_name[: -len(te_name)] + name
            break
    return _DECODER_LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name)


def shard_into(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp: int,
               layer_offset: int, prefix: str = "") -> None:
    """Copy a full state dict into one stage/rank of a parallel model; every local parameter whose name starts
    with `prefix` must be covered."""
    params = {name: p for name, p in model.named_parameters() if name.startswith(prefix)}
    for name, param in params.items():
        whole = full.get(full_name(name, layer_offset))
        if whole is None:
            raise KeyError(f"no full parameter for {name} (as {full_name(name, layer_offset)})")
        piece = shard(full_name(name, layer_offset), whole, tp_rank, tp)
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
