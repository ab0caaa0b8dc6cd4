"""Offline tools' view of a checkpoint of either engine: its config and full (unsharded) weights.

`convert to-hf`, `eval --checkpoint` and `train.init_from` of a DeepSpeed checkpoint read through here, in a plain
process without torch.distributed. `save_full_state` writes full weights as a weights-only megatron-format
checkpoint (what `convert from-hf` produces), loadable into any tp/pp layout and by either engine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from megavictor.checkpoint import deepspeed, megatron
from megavictor.checkpoint.commit import CheckpointError, engine_of, resolve
from megavictor.checkpoint.hf_source import HFSource
from megavictor.config import Config, Engine, PipelineSplit, config_from_dict


def read_config(path: str | Path) -> Config:
    """The resolved config a checkpoint (of either engine) was written with."""
    path = resolve(path)
    if engine_of(path) == Engine.DEEPSPEED:
        return deepspeed.read_config(path)
    data = megatron.read_common(path).get("config")
    if data is None:
        raise CheckpointError(f"checkpoint {path} carries no config; it was not written by megavictor")
    return config_from_dict(data)


def load_full_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config and the unsharded parameters (reference-model names) of any checkpoint."""
    path = resolve(path)
    reader = deepspeed.read_weights if engine_of(path) == Engine.DEEPSPEED else megatron.read_weights
    return read_config(path), reader(path)


def save_full_state(cfg: Config, full: dict[str, torch.Tensor], out: str | Path, tp: int = 1, pp: int = 1,
                    source: HFSource | None = None) -> Path:
    """Write full parameters as a step-0 checkpoint in `out` (weights only), loadable into any tp/pp layout, with
    `source` (the HF source's tokenizer, config, ViT tail) recorded.

    `tp`/`pp` are recorded in the saved config as the intended layout; the files themselves reshard on load. Runs
    a single-process tp=1, pp=1 model (megatron's writer needs a process group), leaving `cfg` untouched.
    """
    from megavictor.distributed import init_distributed
    from megavictor.model.sharding import shard_into
    from megavictor.model.vlm import VictorVLM

    whole = copy.deepcopy(cfg)
    whole.parallel.tp, whole.parallel.pp, whole.parallel.pp_split = 1, 1, PipelineSplit.EVEN
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    model = VictorVLM(whole, [whole.model.num_layers])
    shard_into(model, full, tp_rank=0, tp=1, layer_offset=0)
    saved = copy.deepcopy(cfg)
    saved.parallel.tp, saved.parallel.pp = tp, pp
    return megatron.save(out, 0, model, cfg=saved, source=source)
