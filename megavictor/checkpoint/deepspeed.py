"""The DeepSpeed engine's checkpoint format: DeepSpeed's own files (per-rank ZeRO shards) plus our marker.

`write_marker` is written into the temporary directory after DeepSpeed's files and the per-rank RNG states; the
manifest that makes the checkpoint complete (`commit.is_complete`) comes after it and covers all of them. Offline
readers (`read_config`, `read_weights`) need no process group: DeepSpeed's `zero_to_fp32` merges the ZeRO-1/2/3
shards in this process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megavictor.checkpoint.commit import MARKERS, CheckpointError
from megavictor.checkpoint.rng import rng_state, set_rng_state
from megavictor.checkpoint.state import Restored
from megavictor.config import Config, Engine, config_from_dict

MARKER = MARKERS[Engine.DEEPSPEED]


def rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank:05d}.pt"


def write_marker(path: Path, step: int, zero_stage: int, world_size: int, cfg: Config) -> None:
    marker = {"engine": str(Engine.DEEPSPEED), "step": step, "zero_stage": zero_stage, "world_size": world_size,
              "config": cfg.to_dict()}
    (path / MARKER).write_text(json.dumps(marker, indent=2))


def read_marker(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker} cannot be read ({exc}): not a complete DeepSpeed-engine checkpoint") from exc


def read_config(path: str | Path) -> Config:
    """The resolved config the checkpoint was written with."""
    return config_from_dict(read_marker(path)["config"])


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights, ZeRO shards merged by DeepSpeed's `zero_to_fp32` in this process, in megavictor's full
    names (the engine trains the HF-format model)."""
    from megavictor.compat import import_deepspeed
    from megavictor.hf.convert import full_state_of

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    tensors = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    # ZeRO-1/2 hand out views into one flat buffer per group: own storage each, so safetensors can write them.
    return {name: t.clone() for name, t in full_state_of(read_config(path), tensors, str(path)).items()}


def check_resumable(latest: Path, cfg: Config, world: int) -> None:
    """A DeepSpeed checkpoint of the same ZeRO stage and world size (its shards are per rank)."""
    saved = read_marker(latest)
    if (saved["zero_stage"], saved["world_size"]) != (cfg.train.zero_stage, world):
        raise CheckpointError(f"train.zero_stage={cfg.train.zero_stage} on {world} ranks: {latest} was written with "
                              f"ZeRO-{saved['zero_stage']} on {saved['world_size']} ranks; resume with those, or "
                              f"start a new run with train.init_from={latest}")


@dataclass
class DeepSpeedTrainingState:
    """The DeepSpeed engine's state as the checkpoint manager writes and reads it: DeepSpeed's own checkpoint (every
    rank its ZeRO shards), per-rank RNG states and our marker with the config and step; the loop's state and the lr
    schedule travel in DeepSpeed's client state."""

    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any
    cfg: Config
    world: int

    def write(self, directory: Path, step: int, extra: dict[str, Any]) -> None:
        state = {"step": step, "extra": extra, "scheduler": self.scheduler.state_dict()}
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=state, save_latest=False)
        torch.save(rng_state(), rng_file(directory, dist.get_rank()))
        dist.barrier()
        if dist.get_rank() == 0:
            write_marker(directory, step, self.cfg.train.zero_stage, self.world, self.cfg)

    def read(self, directory: Path) -> Restored:
        """Continue exactly from `directory`: weights, optimizer, scheduler, RNG; the step and the loop's state
        (of a step-0 checkpoint, the schedule as built: `TrainingState.read`; DeepSpeed saves and loads an optimizer
        that never stepped as it is)."""
        loaded, client = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {directory}")
        if client["step"] > 0:
            self.scheduler.load_state_dict(client["scheduler"])
        set_rng_state(torch.load(rng_file(directory, dist.get_rank()), weights_only=False))
        return Restored(step=int(client["step"]), extra=client["extra"])
