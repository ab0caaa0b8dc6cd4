"""What a training engine is to the training loop: build, step, forward-only loss, and its state for checkpoints.

An engine owns the model, the optimizer and the lr schedule of one rank; the loop owns the data, the step count,
metrics and stop requests; the checkpoint manager (`megavictor.checkpoint.manager`) owns the checkpoint directory
and writes and reads the engine's `training_state`.

Both engines minimise the same loss: the sum of token losses over the global batch divided by its number of loss
tokens (megatron's `calculate_per_token_loss`), so loss curves depend neither on the engine nor on tp/pp/dp or on
how the global batch is split into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megavictor.checkpoint.state import TrainingState
from megavictor.config import Config
from megavictor.model.batch import VictorBatch


@dataclass
class StepResult:
    """One optimizer step on one rank."""

    loss_sum: float  # summed token losses of this rank's micro-batches (on the last pipeline stage; 0 elsewhere)
    loss_tokens: int  # their loss tokens (last pipeline stage; 0 elsewhere)
    lr: float  # the learning rate the step used
    grad_norm: float | None  # global gradient norm before clipping
    skipped: bool = False  # the update was not applied: a loss or gradient on some rank was not finite


class TrainingEngine(Protocol):
    def train_step(self, micro_batches: list[VictorBatch], global_loss_tokens: int) -> StepResult:
        """Forward/backward over this rank's micro-batches and one optimizer step, for the loss
        (sum of token losses over the global batch) / `global_loss_tokens`. A step whose loss or gradients are
        not finite on any rank changes neither the weights, the optimizer state nor the lr schedule (`skipped`,
        the same on every rank)."""

    def loss(self, micro_batches: list[VictorBatch]) -> tuple[float, int]:
        """(sum of token losses, loss tokens) over this rank's micro-batches, in eval mode, without gradients.
        Collective over data-parallel ranks for some engines: every rank passes the same number of micro-batches."""

    @property
    def training_state(self) -> TrainingState:
        """Model, optimizer, lr schedule and RNG in this engine's checkpoint format, for the checkpoint manager."""


def build_scheduler(cfg: Config, optimizer: Any) -> OptimizerParamScheduler:
    """megatron's linear warmup + cosine decay, stepped once per optimizer step; it sets `lr` and `weight_decay`
    (times the group's `wd_mult`) of every param group of `optimizer` (megatron's or DeepSpeed's). Stepped before
    each optimizer step, so step n (1-based) uses the lr of n: warmup starts above zero."""
    t = cfg.train
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.max_steps, t.warmup_steps + 1), lr_decay_style="cosine", start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=max(t.max_steps, 1), wd_incr_style="constant")
