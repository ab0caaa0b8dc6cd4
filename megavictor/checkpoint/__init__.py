"""Checkpoints of both training engines, and the offline reading and writing of full weights.

- `commit`: the directory structure (`step_XXXXXX/`, `latest`), atomic commit, rotation, finding a checkpoint.
- `megatron`: megatron `dist_checkpointing` save/load (collective) and its offline readers.
- `deepspeed`: the DeepSpeed engine's marker and offline readers (ZeRO shards merged in-process).
- `full_state`: config + full weights of either format, for `convert`, `eval` and `train.init_from`.

The package imports no training engine: engines call into it, never the other way round.
"""

from megavictor.checkpoint.commit import CheckpointError, engine_of, latest_checkpoint, resolve, step_dir_name
from megavictor.checkpoint.full_state import load_full_state, read_config, save_full_state

__all__ = ["CheckpointError", "engine_of", "latest_checkpoint", "load_full_state", "read_config", "resolve",
           "save_full_state", "step_dir_name"]
