"""Distributed checkpoints with megatron's `dist_checkpointing`: atomic, resumable, reshardable.

Layout under `RUN_DIR/checkpoints/`:
    step_000012/      a complete checkpoint (model, optimizer, scheduler, loader, RNG, step, resolved config)
    step_000014.tmp/  one being written; never read
    latest            the name of the newest complete checkpoint, replaced atomically after the rename

Model and optimizer tensors are saved as megatron ShardedTensors keyed by global layer index, so a checkpoint
written with one tp/pp layout loads into another. Per-rank RNG states are ShardedObjects and are restored only
when the layout is unchanged.

The DeepSpeed engine writes its own checkpoint format into the same layout (`commit_atomically`, `latest`);
`engine_of` tells them apart, and `config_of`, `load_full_state` and `load_weights` read both.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megavictor.config import Config, config_from_dict

LATEST = "latest"
MEGATRON_MARKER = "metadata.json"  # written last by dist_checkpointing
DEEPSPEED_MARKER = "megavictor_deepspeed.json"  # written by megavictor.engines.deepspeed after DeepSpeed's files


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint named by `latest`, or None. A half-written one is never returned."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(checkpoints_dir) / pointer.read_text().strip()
    if not is_complete(path):
        raise RuntimeError(f"{pointer} names {path.name}, which is not a complete checkpoint; remove {pointer} "
                           "to start over or point it at a complete step_* directory")
    return path


def is_complete(path: Path) -> bool:
    """A finished checkpoint of either engine."""
    return (path / MEGATRON_MARKER).is_file() or (path / DEEPSPEED_MARKER).is_file()


def engine_of(path: str | Path) -> str:
    """Which training engine wrote the (complete) checkpoint at `path`: megatron or deepspeed."""
    return "deepspeed" if (Path(path) / DEEPSPEED_MARKER).is_file() else "megatron"


def resolve(path: str | Path) -> Path:
    """A checkpoint given as a step directory, a `checkpoints/` directory or a run directory."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path} is not a checkpoint, nor a run or checkpoints directory with a 'latest' file")


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _rng_object(data: Any) -> ShardedObject:
    layout = _layout()
    return ShardedObject(
        "rng", data, (layout["pp"], layout["tp"], layout["dp"]),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
         parallel_state.get_data_parallel_rank()), replica_id=0)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def commit_atomically(checkpoints_dir: str | Path, step: int, write: Callable[[Path], None],
                      keep_last: int = 0) -> Path:
    """Every rank calls `write(tmp_dir)`; then `step_XXXXXX.tmp` is renamed to `step_XXXXXX` and `latest` replaced
    (both atomic), keeping the newest `keep_last` checkpoints. A save that dies midway leaves only the .tmp dir."""
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    write(tmp)
    _barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        if keep_last > 0:
            done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save(checkpoints_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
         extra: dict[str, Any] | None = None, cfg: Config | None = None, keep_last: int = 0) -> Path:
    """Write `step_XXXXXX` atomically (temp dir, rename, then `latest`), keeping the newest `keep_last`."""

    def write(tmp: Path) -> None:
        model_sd = model.sharded_state_dict()
        state: dict[str, Any] = {"model": model_sd, "step": step, "layout": _layout(),
                                 "rng": _rng_object(rng_state()),
                                 "config": cfg.to_dict() if cfg is not None else None, "extra": extra or {}}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        dist_checkpointing.save(state, str(tmp))

    return commit_atomically(checkpoints_dir, step, write, keep_last)


def read_common(path: str | Path) -> dict[str, Any]:
    """The non-sharded part (step, layout, config, extra, scheduler) without building a model."""
    return dist_checkpointing.load_common_state_dict(str(path))


def load(path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Load into a (possibly differently laid out) model; optimizer/scheduler/RNG only when given and possible.

    Returns the common state (step, config, extra).
    """
    common = read_common(path)
    model_sd = model.sharded_state_dict()
    template: dict[str, Any] = {"model": model_sd}
    same_layout = common.get("layout") == _layout()
    if optimizer is not None:
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    if same_layout:
        template["rng"] = _rng_object(None)
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng"])
    return common


def config_of(path: str | Path) -> Config:
    """The resolved config a checkpoint (of either engine) was written with."""
    if engine_of(path) == "deepspeed":
        from megavictor.engines.deepspeed import checkpoint_config

        return checkpoint_config(path)
    data = read_common(path).get("config")
    if data is None:
        raise ValueError(f"checkpoint {path} carries no config")
    return config_from_dict(data)


def _single_process_model(cfg: Config):
    """A tp=1, pp=1 VictorVLM in this process: the layout every checkpoint can be resharded into."""
    import copy

    from megavictor.distributed import init_distributed
    from megavictor.model.vlm import VictorVLM

    whole = copy.deepcopy(cfg)
    whole.parallel.tp, whole.parallel.pp, whole.parallel.pp_split = 1, 1, "even"
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    return VictorVLM(whole, [whole.model.num_layers])


def load_full_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The unsharded parameters (reference-model names) of any checkpoint, with the config it was saved with.

    A DeepSpeed checkpoint is gathered offline (ZeRO shards merged into fp32 tensors, no process group)."""
    from megavictor.model.layout import full_name

    path = resolve(path)
    if engine_of(path) == "deepspeed":
        from megavictor.engines.deepspeed import gather_full_state

        return gather_full_state(path)
    cfg = config_of(path)
    model = _single_process_model(cfg)
    load(path, model)
    return cfg, {full_name(name, 0): param.detach().clone() for name, param in model.named_parameters()}


def load_weights(path: str | Path, model: torch.nn.Module, tp_rank: int = 0, tp: int = 1,
                 layer_offset: int = 0) -> None:
    """Model weights only, from a checkpoint of either engine, into a (tp/pp-sharded) `VictorVLM`: megatron
    checkpoints reshard on load; DeepSpeed ones are gathered and this rank's shard copied in."""
    path = resolve(path)
    if engine_of(path) == "deepspeed":
        from megavictor.model.layout import shard_into

        shard_into(model, load_full_state(path)[1], tp_rank, tp, layer_offset)
    else:
        load(path, model)


def save_full_state(cfg: Config, full: dict[str, torch.Tensor], out: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Write full parameters as a step-0 checkpoint in `out` (weights only), loadable into any tp/pp layout.

    `tp`/`pp` are recorded in the config as the intended layout; the files themselves reshard on load.
    """
    from megavictor.model.layout import shard_into

    model = _single_process_model(cfg)
    shard_into(model, full, tp_rank=0, tp=1, layer_offset=0)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    return save(out, 0, model, cfg=cfg)
