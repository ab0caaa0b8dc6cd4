"""`megavictor train`: the training job, readable top to bottom.

One process per rank (torchrun, SLURM via `megavictor launch`, or a plain single process). Each optimizer step
takes one global batch of `train.global_batch_size` packed rows from a single deterministic stream; data-parallel
rank r trains on its share of the micro-batches. Because the loss is the per-token mean over the whole global
batch, the loss curve does not depend on tp/pp/dp or on how the batch is split into micro-batches.

`train.engine` picks the engine: megatron (here: tp x pp x dp on megatron-core) or deepspeed
(`megavictor.engines.deepspeed`: ZeRO data parallel on the HF-format model). Both run the loop of
`megavictor.engines.loop`, so data, loss, metrics, checkpoints layout and stop signals are the same.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megavictor import checkpoint
from megavictor.config import Config, ConfigError, load_config
from megavictor.distributed import ParallelDims, init_from_config
from megavictor.engines.loop import Summary, TrainLoop, build_scheduler, clear_stop_request, request_stop
from megavictor.model.batch import VictorBatch
from megavictor.model.layout import full_name, full_shape, load_vision_tower, shard_into
from megavictor.model.vlm import VictorVLM
from megavictor.plan import layers_per_stage
from megavictor.step import forward_backward

__all__ = ["Summary", "Trainer", "build_trainer", "main", "request_stop", "run", "wrap_for_training"]


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


class Trainer(TrainLoop):
    """The megatron engine: tp x pp x dp VictorVLM, megatron DDP and optimizer, dist_checkpointing."""

    def __init__(self, cfg: Config) -> None:
        dims = init_from_config(cfg)
        # Model, DDP (gradients summed across data parallel, divided by the global token count at the end).
        self.model = build_model(cfg, dims)
        # Optimizer (AdamW) and warmup + cosine schedule.
        self.ddp, self.optimizer = wrap_for_training(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        super().__init__(cfg, dims)

    def resume(self) -> None:
        """Continue from RUN_DIR's latest checkpoint, else start from `train.init_from` weights, else fresh."""
        latest = checkpoint.latest_checkpoint(self.checkpoints)
        if latest is not None:
            if checkpoint.engine_of(latest) != "megatron":
                raise ConfigError(f"train.run_dir={self.run_dir} holds checkpoints of train.engine="
                                  f"{checkpoint.engine_of(latest)}; resume with that engine, or start a new run "
                                  f"with train.init_from={self.run_dir}")
            common = checkpoint.load(latest, self.model, self.optimizer, self.scheduler)
            self.step = int(common["step"])
            self.loader.load_state_dict(common["extra"]["loader"])
        elif self.cfg.train.init_from:
            checkpoint.load_weights(self.cfg.train.init_from, self.model, self.dims.tp_rank, self.dims.tp,
                                    sum(layers_per_stage(self.cfg)[:self.dims.pp_rank]))
        elif self.cfg.vision.init_from and self.dims.is_first_stage:  # a fresh run with a pretrained ViT
            expected = {full_name(n, 0): full_shape(n, p.shape, self.dims.tp)
                        for n, p in self.model.named_parameters() if n.startswith("vision.")}
            shard_into(self.model, load_vision_tower(self.cfg.vision.init_from, expected), self.dims.tp_rank,
                       self.dims.tp, layer_offset=0, prefix="vision.")
        # DDP keeps its own fp32 copy of gradients only; parameters were loaded in place.

    def save(self) -> Path:
        return checkpoint.save(self.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                               extra={"loader": self.loader.state_dict()}, cfg=self.cfg,
                               keep_last=self.cfg.train.keep_last)

    def optimize(self, micro_batches: list[VictorBatch], global_tokens: int) -> tuple[float, int, float, Any]:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        result = forward_backward(self.ddp, micro_batches)  # divides by the global token count itself
        self.scheduler.step(1)  # the lr of step n (1-based): warmup starts above zero
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        return result.loss_sum, result.num_tokens, lr, grad_norm

    def forward_only(self, micro_batches: list[VictorBatch]) -> tuple[float, int]:
        self.model.eval()
        result = forward_backward(self.ddp, micro_batches, forward_only=True)
        self.model.train()
        return result.loss_sum, result.num_tokens


def build_trainer(cfg: Config) -> TrainLoop:
    """The engine `train.engine` names (DeepSpeed imported only when chosen)."""
    if cfg.train.engine == "deepspeed":
        from megavictor.engines.deepspeed import DeepSpeedTrainer

        return DeepSpeedTrainer(cfg)
    return Trainer(cfg)


def run(cfg: Config, install_signal_handlers: bool = True) -> Summary:
    """Train `cfg` in this process (one rank); resumes from RUN_DIR's `latest` checkpoint if there is one."""
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, request_stop)
    try:
        return build_trainer(cfg).fit()
    finally:
        clear_stop_request()  # after, not before: a signal that arrives while the job starts up must still count


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
