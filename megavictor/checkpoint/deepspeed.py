"""The DeepSpeed engine's checkpoint format: DeepSpeed's own files (per-rank ZeRO shards) plus our marker.

`write_marker` is written into the temporary directory after DeepSpeed's files and the per-rank RNG states; the
manifest that makes the checkpoint complete (`commit.is_complete`) comes after it and covers all of them. Offline
readers (`read_config`, `read_weights`) need no process group: DeepSpeed's `zero_to_fp32` merges the ZeRO-1/2/3
shards in this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megavictor.checkpoint.commit import MARKERS, CheckpointError
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
