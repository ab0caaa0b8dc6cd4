"""What the training engines share: the step loop, the global batch, the per-token loss, metrics, stop requests.

An engine (megatron: `megavictor.trainer.Trainer`; DeepSpeed: `megavictor.engines.deepspeed.DeepSpeedTrainer`)
builds its model and optimizer and implements four methods; `TrainLoop` does the rest the same way for both. Each
optimizer step takes one global batch of `train.global_batch_size` packed rows from a single deterministic stream;
data-parallel rank r trains on its share of the micro-batches. Because the loss is the per-token mean over the whole
global batch, the loss curve depends neither on the engine nor on tp/pp/dp or the micro-batch split.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megavictor import checkpoint
from megavictor.config import Config
from megavictor.data.loader import VictorLoader
from megavictor.distributed import ParallelDims
from megavictor.metrics import MetricsLogger, batch_train_flops, peak_flops
from megavictor.model.batch import KIND_PAD, KIND_TEXT, KIND_VISUAL, VictorBatch

_stop = threading.Event()


def request_stop(*_args: Any) -> None:
    """Ask the running job to checkpoint at the next step boundary and return (signal-handler safe)."""
    _stop.set()


def clear_stop_request() -> None:
    _stop.clear()


@dataclass
class Summary:
    final_step: int
    final_loss: float | None
    val_loss: float | None
    stopped_by_signal: bool
    checkpoint: str | None


def build_scheduler(cfg: Config, optimizer: Any) -> OptimizerParamScheduler:
    """megatron's linear warmup + cosine decay, stepped once per optimizer step; it sets `lr` and `weight_decay`
    (times the group's `wd_mult`) of every param group of `optimizer` (megatron's or DeepSpeed's)."""
    t = cfg.train
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.max_steps, t.warmup_steps + 1), lr_decay_style="cosine", start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=max(t.max_steps, 1), wd_incr_style="constant")


def micro_batches_per_rank(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // dp // cfg.data.micro_batch_size


class TrainLoop:
    """The training job around an engine. Subclasses build model and optimizer, then call `__init__`, and
    implement `resume`, `save`, `optimize` and `forward_only`."""

    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        self.cfg, self.dims = cfg, dims
        self.run_dir = Path(cfg.train.run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        # Data: every rank reads the same global stream and keeps its micro-batches of each global batch.
        self.micro_batches_per_rank = micro_batches_per_rank(cfg, dims.dp)
        self.loader = VictorLoader.from_config(cfg, cfg.data.train_split)
        self.step = 0
        self.resume()
        self.batches = iter(self.loader)
        self.reports = dims.is_last_stage and dims.tp_rank == 0 and dims.dp_rank == 0  # holds the global loss
        self.metrics = MetricsLogger(cfg, self.run_dir, self.reports, cfg.train.max_steps, self.step)
        if dist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # ------------------------------------------------------------------ what an engine implements

    def resume(self) -> None:
        """Continue from RUN_DIR's latest checkpoint (set `self.step`, the loader's position, optimizer...)."""
        raise NotImplementedError

    def save(self) -> Path:
        """Checkpoint the current step under `self.checkpoints` (atomically, updating `latest`)."""
        raise NotImplementedError

    def optimize(self, micro_batches: list[VictorBatch], global_tokens: int) -> tuple[float, int, float, Any]:
        """Forward/backward over this rank's micro-batches and one optimizer step, for a loss that is the sum of
        token losses over the global batch divided by its `global_tokens`. Returns (loss sum and loss tokens of
        this rank's micro-batches, the step's lr, the gradient norm before clipping)."""
        raise NotImplementedError

    def forward_only(self, micro_batches: list[VictorBatch]) -> tuple[float, int]:
        """(sum of token losses, loss tokens) over this rank's micro-batches, in eval mode without gradients."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop

    def _global_batch(self) -> list[VictorBatch]:
        """The whole global batch's micro-batches (identical on all ranks); this rank trains on its slice."""
        return [next(self.batches) for _ in range(self.micro_batches_per_rank * self.dims.dp)]

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        global_batch = self._global_batch()
        n = self.micro_batches_per_rank
        mine = global_batch[self.dims.dp_rank * n:(self.dims.dp_rank + 1) * n]
        loss_sum, num_tokens, lr, grad_norm = self.optimize(mine, sum(b.num_loss_tokens() for b in global_batch))
        loss = self._global_loss(loss_sum, num_tokens)
        elapsed = time.perf_counter() - start
        # Tokens of the data (text + visual), not Victor's register slots: the same count for Victor and the
        # baseline on the same data, so tokens/s compares their speed.
        real_tokens = sum(int(((b.kinds == KIND_TEXT) | (b.kinds == KIND_VISUAL)).sum()) for b in global_batch)
        samples = sum(int(b.cu_seqlens.numel() - 1) - _pad_segments(b) for b in global_batch)
        flops = sum(batch_train_flops(self.cfg, b) for b in global_batch)
        return {"step": self.step + 1, "loss": loss, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": real_tokens / elapsed, "samples_per_s": samples / elapsed, "step_time_s": elapsed,
                "mfu": flops / elapsed / (peak_flops() * self.dims.world), "memory_mb": _peak_memory_mb()}

    def _global_loss(self, loss_sum: float, num_tokens: int) -> float | None:
        """Per-token mean over the global batch, on the last pipeline stage (summed over data parallel)."""
        if not self.dims.is_last_stage:
            return None
        totals = torch.tensor([loss_sum, float(num_tokens)], dtype=torch.float64)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return float(totals[0] / totals[1].clamp_min(1))

    def evaluate(self) -> float | None:
        """Validation loss (per-token mean) over `train.eval_batches` micro-batches of the val split."""
        loader = VictorLoader.from_config(self.cfg, self.cfg.data.val_split, shuffle=False, epochs=1)
        batches = [b for b, _ in zip(loader, range(self.cfg.train.eval_batches))]
        mine = batches[self.dims.dp_rank::self.dims.dp] or batches[:1]
        with torch.no_grad():
            loss_sum, num_tokens = self.forward_only(mine)
        return self._global_loss(loss_sum, num_tokens)

    def _should_stop(self) -> bool:
        """All ranks agree on a pending stop request (a signal may reach only some of them)."""
        flag = torch.tensor([1.0 if _stop.is_set() else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self) -> Summary:
        t = self.cfg.train
        last_loss, saved, stopped = None, None, False
        while self.step < t.max_steps:
            if self._should_stop():
                stopped = True
                break
            record = self.train_step()
            self.step += 1
            last_loss = record["loss"]
            if t.eval_interval and self.step % t.eval_interval == 0:
                record["val_loss"] = self.evaluate()
            self.metrics.log(record)
            if t.save_interval and self.step % t.save_interval == 0:
                saved = self.save()
        if saved is None or checkpoint.step_dir_name(self.step) != saved.name:
            saved = self.save()
        self.metrics.close()
        val_loss = None if stopped else self.evaluate()
        return Summary(self.step, last_loss, val_loss, stopped, str(saved))


def _pad_segments(batch: VictorBatch) -> int:
    """Segments of a batch that are row padding rather than samples."""
    starts = batch.cu_seqlens[:-1].long()
    return int((batch.kinds.flatten()[starts] == KIND_PAD).sum())


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
