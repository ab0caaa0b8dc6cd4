"""The training loop, read top to bottom in `train`: it composes an engine (megatron or DeepSpeed) with the data.

Each optimizer step takes one global batch of `train.global_batch_size` packed rows of the global row order
(`megavictor.data.training_data`); data-parallel rank r decodes and trains on its share of the micro-batches.
The loss is the per-token mean over the whole global batch, so the loss curve depends neither on the engine nor on
tp/pp/dp or on the micro-batch split. Checkpoints go through one `CheckpointManager`: one load, one save call per
step (it decides whether the step is due).

Stop requests (SIGTERM / SIGUSR2, or `megavictor.training.stop_request.request_stop()`) are honoured at the next step
boundary: the job saves a checkpoint and returns a summary with `stopped_by_signal`; a restart resumes exactly from
it.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavictor.checkpoint.initial_weights import InitialWeights, choose_initial_weights
from megavictor.checkpoint.manager import CheckpointManager
from megavictor.config import Config, Engine
from megavictor.data.collate import collate_rows
from megavictor.data.training_data import TrainData, validation_batches
from megavictor.distributed import ParallelDims, any_rank, collective_device, init_from_config
from megavictor.engines.base import TrainingEngine
from megavictor.errors import UserError, notice
from megavictor.model.batch import VictorBatch
from megavictor.training.metrics import MetricsLogger, peak_flops
from megavictor.training.stop_request import stop_pending

@dataclass
class Summary:
    final_step: int
    final_loss: float | None
    val_loss: float | None
    stopped_by_signal: bool
    checkpoint: str | None


def build_engine(cfg: Config, dims: ParallelDims, weights: InitialWeights, data: TrainData) -> TrainingEngine:
    """The engine `train.engine` names, built from `weights` (DeepSpeed is imported only when chosen); megatron's
    balanced pipeline split weighs its stages by the training data's samples."""
    if cfg.train.engine == Engine.DEEPSPEED:
        from megavictor.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, dims, weights)
    from megavictor.engines.megatron import MegatronEngine

    return MegatronEngine(cfg, dims, weights, data.data.order.sample_shape())


def train(cfg: Config) -> Summary:
    """Train `cfg` on this rank; resumes from RUN_DIR's `latest` checkpoint if there is one. The caller has checked
    the data set (`megavictor.data.preflight`)."""
    t = cfg.train
    weights = choose_initial_weights(cfg)  # resume / init_from / fresh, checked before anything is built
    dims = init_from_config(cfg)
    data = TrainData(cfg, dims)  # opens the data set: its errors come before the model's build
    engine = build_engine(cfg, dims, weights, data)
    checkpoints = CheckpointManager(cfg, weights)
    restored = checkpoints.load(engine.training_state)
    step = restored.step
    nonfinite = NonFiniteSteps(t.max_nonfinite_steps, skipped=restored.extra.get("skipped_steps", 0))
    if "loader" in restored.extra:
        data.load_state_dict(restored.extra["loader"])

    def loop_state() -> dict[str, Any]:
        return {"loader": data.state_dict(), "skipped_steps": nonfinite.skipped}

    reports = dims.is_last_stage and dims.tp_rank == 0 and dims.dp_rank == 0  # the rank holding the global loss
    metrics = MetricsLogger(cfg, Path(t.run_dir), reports, t.max_steps, step)
    if dist.get_rank() == 0:
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(t.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    data_counts = {f"data_{kind}": n for kind, n in data.counts.items()}  # per sample of the split, counted once
    last_loss, stopped = None, False
    with metrics:
        while step < t.max_steps:
            if stop_requested():
                stopped = True
                break
            step += 1
            record = {"step": step, **train_step(engine, data, dims), **data_counts}
            if nonfinite.count(step, record.pop("update_skipped")) == 1:
                checkpoints.guard_newest()  # the newest checkpoint before the anomaly survives rotation
            record["skipped_steps"] = nonfinite.skipped
            last_loss = record["loss"]
            if t.eval_interval and step % t.eval_interval == 0:
                record["val_loss"] = validation_loss(cfg, engine, dims)
            metrics.log(record)
            if nonfinite.streak >= t.max_nonfinite_steps:
                raise nonfinite.diverged(step, checkpoints.newest())
            checkpoints.save(step, engine.training_state, loop_state(), anomaly=nonfinite.streak > 0)
        if stopped and step == 0:  # nothing trained, nothing to keep: the restart builds the same step 0
            notice("stopped before step 1: nothing was trained, so no checkpoint was saved; a restart begins at "
                   "step 1")
        else:  # train.max_steps=0 saves the initial weights on purpose (a reshard at a new layout, an export)
            checkpoints.save(step, engine.training_state, loop_state(), last_step=True)
    val_loss = None if stopped else validation_loss(cfg, engine, dims)
    saved = checkpoints.saved
    return Summary(step, last_loss, val_loss, stopped, None if saved is None else str(saved))


def train_step(engine: TrainingEngine, data: TrainData, dims: ParallelDims) -> dict[str, Any]:
    """One optimizer step; the metrics record of it (the loss is global, on the reporting rank)."""
    start = time.perf_counter()
    batches = data.next_step()
    result = engine.train_step(batches.mine, batches.loss_tokens)
    loss = global_mean_loss(result.loss_sum, result.loss_tokens, dims)
    elapsed = time.perf_counter() - start
    return {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens_per_s": batches.real_tokens / elapsed, "samples_per_s": batches.samples / elapsed,
            "step_time_s": elapsed, "mfu": batches.flops / elapsed / (peak_flops() * dims.world),
            "memory_mb": _peak_memory_mb(), "update_skipped": result.skipped}


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient norm: the run stops without saving them."""


@dataclass
class NonFiniteSteps:
    """The steps whose update was skipped (loss or gradient norm not finite, `StepResult.skipped`): their count
    (metrics' `skipped_steps`, kept in checkpoints) and the current streak, which stops the run at `limit`."""

    limit: int
    skipped: int = 0
    streak: int = 0

    def count(self, step: int, skipped: bool) -> int:
        """Count `step`; the streak it ends (0) or extends."""
        if not skipped:
            self.streak = 0
            return 0
        self.skipped += 1
        self.streak += 1
        notice(f"step {step}: the loss or gradient norm is not finite; update skipped ({self.streak} in a row, "
               f"train.max_nonfinite_steps={self.limit})")
        return self.streak

    def diverged(self, step: int, good: Path | None) -> TrainingDiverged:
        kept = f"the last good checkpoint is {good}" if good is not None else "no checkpoint was saved before it"
        return TrainingDiverged(f"stopped at step {step}: {self.streak} consecutive steps with a non-finite loss or "
                                f"gradient norm (train.max_nonfinite_steps={self.limit}), none applied or saved; "
                                f"{kept}; lower train.lr (or raise train.warmup_steps) and resume")


def global_mean_loss(loss_sum: float, loss_tokens: int, dims: ParallelDims) -> float | None:
    """Per-token mean over the global batch, on the last pipeline stage (summed over data parallel)."""
    if not dims.is_last_stage:
        return None
    group = parallel_state.get_data_parallel_group()
    totals = torch.tensor([loss_sum, float(loss_tokens)], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(totals, group=group)
    return float(totals[0] / totals[1].clamp_min(1))


def validation_loss(cfg: Config, engine: TrainingEngine, dims: ParallelDims) -> float | None:
    """Per-token mean loss over the first `train.eval_batches` micro-batches of the val split, shared out over the
    data-parallel ranks; a rank left without one runs an all-padding micro-batch (no loss tokens), so that every
    rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    mine, total = validation_batches(cfg, dims)
    rounds = math.ceil(total / dims.dp)
    mine += [_empty_batch(cfg)] * (rounds - len(mine))
    return global_mean_loss(*engine.loss(mine), dims)


def stop_requested() -> bool:
    """All ranks agree on a pending stop request (a signal may reach only some of them)."""
    return any_rank(stop_pending())


def _empty_batch(cfg: Config) -> VictorBatch:
    """A micro-batch of padding only: no images, no loss tokens (its token ids are never attended or scored)."""
    d, v = cfg.data, cfg.vision
    return collate_rows([[] for _ in range(d.micro_batch_size)], d.seq_length,
                        image_shape=(3, v.image_size, v.image_size))


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

