"""`megavictor train`: the training job, readable top to bottom.

One process per rank (torchrun, SLURM via `megavictor launch`, or a plain single process). Each optimizer step
takes one global batch of `train.global_batch_size` packed rows from a single deterministic stream; data-parallel
rank r trains on its share of the micro-batches. Because the loss is the per-token mean over the whole global
batch, the loss curve does not depend on tp/pp/dp or on how the batch is split into micro-batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megavictor import checkpoint
from megavictor.config import Config, load_config
from megavictor.data.loader import VictorLoader
from megavictor.distributed import ParallelDims, init_from_config
from megavictor.metrics import MetricsLogger, batch_train_flops, peak_flops
from megavictor.model.batch import KIND_PAD, KIND_TEXT, KIND_VISUAL, VictorBatch
from megavictor.model.vlm import VictorVLM
from megavictor.plan import layers_per_stage
from megavictor.step import forward_backward

_stop = threading.Event()


def request_stop(*_args: Any) -> None:
    """Ask the running job to checkpoint at the next step boundary and return (signal-handler safe)."""
    _stop.set()


@dataclass
class Summary:
    final_step: int
    final_loss: float | None
    val_loss: float | None
    stopped_by_signal: bool
    checkpoint: str | None


def build_model(cfg: Config, dims: ParallelDims) -> VictorVLM:
    return VictorVLM(cfg, layers_per_stage(cfg), pre_process=dims.is_first_stage, post_process=dims.is_last_stage)


def wrap_for_training(cfg: Config, model: VictorVLM) -> tuple[DistributedDataParallel, Any]:
    """megatron DDP (gradients summed across data parallel) and the AdamW optimizer, as the training job uses them."""
    t = cfg.train
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=torch.cuda.is_available())
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=t.precision == "bf16", params_dtype=model.config.params_dtype,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer), [ddp])
    return ddp, optimizer


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dims = init_from_config(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        t, d = cfg.train, cfg.data

        # Model, DDP (gradients summed across data parallel, divided by the global token count at the end).
        self.model = build_model(cfg, self.dims)
        # Optimizer (AdamW) and warmup + cosine schedule.
        self.ddp, self.optimizer = wrap_for_training(cfg, self.model)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
            lr_decay_steps=max(t.max_steps, t.warmup_steps + 1), lr_decay_style="cosine", start_wd=t.weight_decay,
            end_wd=t.weight_decay, wd_incr_steps=max(t.max_steps, 1), wd_incr_style="constant")

        # Data: every rank reads the same global stream and keeps its micro-batches of each global batch.
        self.rows_per_rank = t.global_batch_size // self.dims.dp
        self.micro_batches_per_rank = self.rows_per_rank // d.micro_batch_size
        self.loader = VictorLoader.from_config(cfg, d.train_split)
        self.step = 0
        self._resume()
        self.batches = iter(self.loader)
        reports = self.dims.is_last_stage and self.dims.tp_rank == 0 and self.dims.dp_rank == 0
        self.metrics = MetricsLogger(cfg, self.run_dir, reports, t.max_steps, self.step)
        if dist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def _resume(self) -> None:
        """Continue from RUN_DIR's latest checkpoint, else start from `train.init_from` weights, else fresh."""
        latest = checkpoint.latest_checkpoint(self.checkpoints)
        if latest is not None:
            common = checkpoint.load(latest, self.model, self.optimizer, self.scheduler)
            self.step = int(common["step"])
            self.loader.load_state_dict(common["extra"]["loader"])
        elif self.cfg.train.init_from:
            checkpoint.load(checkpoint.resolve(self.cfg.train.init_from), self.model)
        # DDP keeps its own fp32 copy of gradients only; parameters were loaded in place.

    def save(self) -> Path:
        return checkpoint.save(self.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                               extra={"loader": self.loader.state_dict()}, cfg=self.cfg,
                               keep_last=self.cfg.train.keep_last)

    def _global_batch(self) -> list[VictorBatch]:
        """The whole global batch's micro-batches (identical on all ranks); this rank trains on its slice."""
        return [next(self.batches) for _ in range(self.micro_batches_per_rank * self.dims.dp)]

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        global_batch = self._global_batch()
        mine = global_batch[self.dims.dp_rank * self.micro_batches_per_rank:
                            (self.dims.dp_rank + 1) * self.micro_batches_per_rank]
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        result = forward_backward(self.ddp, mine)
        self.scheduler.step(1)  # the lr of step n (1-based): warmup starts above zero
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        loss = self._global_loss(result.loss_sum, result.num_tokens)
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
        self.model.eval()
        with torch.no_grad():
            result = forward_backward(self.ddp, mine, forward_only=True)
        self.model.train()
        return self._global_loss(result.loss_sum, result.num_tokens)

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


def run(cfg: Config, install_signal_handlers: bool = True) -> Summary:
    """Train `cfg` in this process (one rank); resumes from RUN_DIR's `latest` checkpoint if there is one."""
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, request_stop)
    try:
        return Trainer(cfg).fit()
    finally:
        _stop.clear()  # after, not before: a signal that arrives while the job starts up must still count


def _pad_segments(batch: VictorBatch) -> int:
    """Segments of a batch that are row padding rather than samples."""
    starts = batch.cu_seqlens[:-1].long()
    return int((batch.kinds.flatten()[starts] == KIND_PAD).sum())


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor train", description="train a Victor VLM")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 parallel.tp=2")
    args = parser.parse_args(argv)
    summary = run(load_config(args.config, args.overrides))
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_tensor_model_parallel_rank() == 0:
        print(json.dumps(summary.__dict__))  # the rank that holds the loss
    return 0
