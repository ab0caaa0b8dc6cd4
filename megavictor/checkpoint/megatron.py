"""The megatron engine's checkpoint format: megatron `dist_checkpointing` (PyTorch DCP files underneath).

Model and optimizer tensors are saved as ShardedTensors keyed by global layer index, so a checkpoint written with
one tp/pp layout loads into another. Per-rank RNG states are ShardedObjects and are restored only when the layout
is unchanged. The non-sharded part (`common.pt`: step, parallel sizes, resolved config, extra state such as the
loader position and the lr schedule) is written by rank 0.

`save`/`load` run on every rank of a job (collective). `read_common` and `read_weights` read a checkpoint in a
plain process, without a process group or a model: the DCP files hold each tensor's global shape, and full
parameters are the global tensors with their stacked layer axis split again (megatron's sharded keys name the
layer norms as Transformer Engine does; `full_name` maps them back).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megavictor.checkpoint.commit import MARKERS, CheckpointError, commit_atomically
from megavictor.checkpoint.hf_source import HFSource
from megavictor.checkpoint.rng import rng_state, set_rng_state
from megavictor.checkpoint.state import Restored
from megavictor.compat import prepare_distributed_optimizer_load
from megavictor.config import Config, Engine
from megavictor.model.sharding import full_name
from megavictor.process_lifetime import start_checkpoint_writer_queue

MARKER = MARKERS[Engine.MEGATRON]
# The distributed optimizer's state in megatron's canonical per-parameter form (as a regular optimizer saves it),
# gathered over data parallel on save: it loads into any dp size (dp2 -> dp1) and any tp/pp layout.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
_STACKED_LAYERS = re.compile(r"^((?:vision\.)?decoder\.layers)\.(.+)$")


def parallel_sizes() -> dict[str, int]:
    """This job's tp / pp / dp sizes, as recorded in (and compared with) a checkpoint."""
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _rng_object(data: Any) -> Any:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sizes = parallel_sizes()
    return ShardedObject(
        "rng", data, (sizes["pp"], sizes["tp"], sizes["dp"]),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
         parallel_state.get_data_parallel_rank()), replica_id=0)


def write(directory: Path, step: int, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
          extra: dict[str, Any] | None = None, cfg: Config | None = None) -> None:
    """Fill `directory` (collective): model and optimizer sharded, the common state (step, layout, config, extra,
    lr schedule) by rank 0."""
    from megatron.core import dist_checkpointing

    start_checkpoint_writer_queue()
    model_sd = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, "step": step, "layout": parallel_sizes(),
                             "rng": _rng_object(rng_state()),
                             "config": cfg.to_dict() if cfg is not None else None, "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(directory))


def save(checkpoints_dir: str | Path, step: int, model: torch.nn.Module, cfg: Config | None = None,
         source: HFSource | None = None) -> Path:
    """Weights alone as `step_XXXXXX`, committed atomically, with `source` (tokenizer, HF source config) recorded
    inside: what `convert from-hf` writes (training runs save through `checkpoint.manager`)."""
    return commit_atomically(checkpoints_dir, step, lambda tmp: write(tmp, step, model, cfg=cfg),
                             attach=source.write if source else None)


@dataclass
class MegatronTrainingState:
    """The megatron engine's state as the checkpoint manager writes and reads it. `gathered` is the engine's
    context in which every parameter is in place (overlapped parameter all-gather finished, hooks off)."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    cfg: Config
    gathered: Callable[[], AbstractContextManager] = nullcontext

    def write(self, directory: Path, step: int, extra: dict[str, Any]) -> None:
        # Step 0: weights, RNG and loop state only (`TrainingState.read`). The distributed optimizer cannot even
        # describe an optimizer that never stepped (torch's Adam has no per-parameter `step` yet: megatron asserts).
        stepped = step > 0
        with self.gathered():
            write(directory, step, self.model, self.optimizer if stepped else None, self.scheduler if stepped else None,
                  extra, self.cfg)

    def read(self, directory: Path) -> Restored:
        common = load(directory, self.model, self.optimizer, self.scheduler)
        return Restored(step=int(common["step"]), extra=common.get("extra", {}))


def read_common(path: str | Path) -> dict[str, Any]:
    """The non-sharded part (step, layout, config, extra, scheduler); no process group or model needed."""
    common = Path(path) / "common.pt"
    if not common.is_file():
        raise CheckpointError(f"{common} is missing: {path} is not a complete megatron-format checkpoint")
    try:
        return torch.load(common, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or overwritten file: torch names neither the file nor the checkpoint
        raise CheckpointError(f"{common} cannot be read ({str(exc).splitlines()[0][:200]})") from exc


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """The model's weights only (resharded to this rank's shards), e.g. for `train.init_from`."""
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))["model"])


def load(path: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Resume: model, optimizer (with its fp32 main parameters), lr schedule, and the RNG states when the layout is
    unchanged, into a (possibly differently laid out) model. Returns the common state (step, config, extra).

    A step-0 checkpoint has no optimizer state (older ones: one without Adam moments) and its lr schedule is not
    this run's (`TrainingState.read`): its weights load, and the optimizer just built copies its fp32 main
    parameters from them (Megatron-LM's `--no-load-optim`)."""
    from megatron.core import dist_checkpointing

    common = read_common(path)
    model_sd = model.sharded_state_dict()
    template: dict[str, Any] = {"model": model_sd}
    same_layout = common.get("layout") == parallel_sizes()
    stepped = int(common["step"]) > 0
    if stepped:
        prepare_distributed_optimizer_load(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT)
    if same_layout:
        template["rng"] = _rng_object(None)
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(loaded["model"])
    if stepped:
        optimizer.load_state_dict(loaded["optimizer"])
    else:
        optimizer.reload_model_params()
    if "scheduler" in common and stepped:
        scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng"])
    return common


def _model_tensors(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The DCP reader of a checkpoint and the metadata of its model tensors (optimizer state left out)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata().state_dict_metadata
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{Path(path) / '.metadata'} cannot be read ({exc}); the checkpoint is damaged") from exc
    return reader, {key: meta for key, meta in metadata.items()
                    if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")}


def _unstacked(key: str, shape: tuple[int, ...]) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """(full name, index into the stacked layer axis or None, shape) of each parameter a sharded key holds."""
    stacked = _STACKED_LAYERS.match(key)
    if stacked is None:
        return [(full_name(key, 0), None, shape)]
    prefix, rest = stacked.groups()
    return [(full_name(f"{prefix}.{index}.{rest}", 0), index, shape[1:]) for index in range(shape[0])]


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Full parameter names and shapes, from the checkpoint's metadata alone (nothing loaded)."""
    _, metadata = _model_tensors(path)
    return {name: shape for key, meta in metadata.items() for name, _, shape in _unstacked(key, tuple(meta.size))}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model parameters, in the reference model's names, read without a process group."""
    import torch.distributed.checkpoint as dcp

    reader, metadata = _model_tensors(path)
    stored = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(stored, storage_reader=reader, no_dist=True)
    return {name: stored[key] if index is None else stored[key][index].clone()
            for key in stored for name, index, _ in _unstacked(key, tuple(stored[key].shape))}
