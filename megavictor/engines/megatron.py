"""The megatron engine: tp x pp x dp `VictorVLM` on megatron-core, megatron DDP and optimizer, dist_checkpointing.

Built the way Megatron-LM's `get_model` builds a model chunk: the stage's `VictorVLM` (layers of this pipeline
stage, shards of this tensor-parallel rank) with its initial weights applied, wrapped in `Float16Module` for bf16
(every submodule cast, also plain torch layers such as CLIP's patch conv), moved to this rank's GPU when there is
one, then megatron's DDP and the optimizer, which clones its fp32 main parameters from the weights already in place.

Each step runs megatron's pipeline schedule (1F1B) over this rank's micro-batches. The loss is a per-token sum
(megatron's `calculate_per_token_loss`): each micro-batch returns (sum of token losses, number of loss tokens),
gradients are sums, and megatron divides them by the token count we hand it, the global batch's.

Data-parallel gradient reduction and parameter all-gather overlap with compute in buckets as Megatron-LM's
`training.py` wires them (`no_sync_func`, `grad_sync_func`, `param_sync_func`; parameters gathered in sync before
evaluation and saves). With `parallel.pipeline_length_buckets` every micro-batch of a step drops to the same
bucketed short length, known to every rank in advance, so pipeline sends use static shapes (no shape exchange).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_attr_wrapped_model

from megavictor.checkpoint import megatron as megatron_checkpoint
from megavictor.checkpoint.commit import engine_of
from megavictor.checkpoint.initial_weights import InitialWeights, WeightOrigin, init_from_state, vision_tower_state
from megavictor.config import Config, ConfigError, Engine, Precision
from megavictor.distributed import ParallelDims
from megavictor.engines.base import StepResult, build_scheduler
from megavictor.model.batch import VictorBatch
from megavictor.model.drop_plan import build_drop_plan, short_length
from megavictor.model.pipeline_split import SampleShape, layers_per_stage
from megavictor.model.sharding import full_name, full_shape, shard_into
from megavictor.model.vlm import VictorVLM


def apply_initial_weights(model: VictorVLM, cfg: Config, weights: InitialWeights, dims: ParallelDims) -> None:
    """Copy `train.init_from`'s or `vision.init_from`'s weights into this stage's shards (before any optimizer)."""
    if weights.origin == WeightOrigin.INIT_FROM:
        if engine_of(weights.checkpoint) == Engine.MEGATRON:  # reshards on load, reading only this rank's shards
            megatron_checkpoint.load_model_weights(weights.checkpoint, model)
        else:
            shard_into(model, init_from_state(cfg, weights.checkpoint), dims.tp_rank, dims.tp, model.layer_offset)
    elif weights.vision_tower is not None and dims.is_first_stage:
        expected = {full_name(n, 0): full_shape(n, p.shape, dims.tp)
                    for n, p in model.named_parameters() if n.startswith("vision.")}
        shard_into(model, vision_tower_state(weights.vision_tower, expected), dims.tp_rank, dims.tp,
                   layer_offset=0, prefix="vision.")


def build_model(cfg: Config, dims: ParallelDims, weights: InitialWeights | None = None,
                shape: SampleShape | None = None) -> torch.nn.Module:
    """This rank's model chunk with its initial weights, in the training precision, on its device; a balanced
    pipeline split weighs its stages by `shape` (the training data's samples; default one typical sample)."""
    model = VictorVLM(cfg, layers_per_stage(cfg, shape), pre_process=dims.is_first_stage,
                      post_process=dims.is_last_stage)
    if weights is not None:
        apply_initial_weights(model, cfg, weights, dims)
    chunk: torch.nn.Module = Float16Module(model.config, model) if cfg.train.precision == Precision.BF16 else model
    if torch.cuda.is_available():
        chunk.cuda(torch.cuda.current_device())
    return chunk


def build_ddp_config(cfg: Config) -> DistributedDataParallelConfig:
    """megatron DDP settings: gradient reduction in fp32 or bf16, the distributed optimizer, overlap of gradient
    reduction and parameter all-gather (null: on with CUDA), buckets."""
    p, t, cuda = cfg.parallel, cfg.train, torch.cuda.is_available()
    distributed_optimizer = t.distributed_optimizer
    overlap_param = (cuda and distributed_optimizer) if p.overlap_param_gather is None else p.overlap_param_gather
    if overlap_param and not distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs megatron's distributed optimizer: set "
                          "train.distributed_optimizer=true, or parallel.overlap_param_gather=null or false")
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=t.grad_reduce_dtype == Precision.FP32, use_distributed_optimizer=distributed_optimizer,
        overlap_grad_reduce=cuda if p.overlap_grad_reduce is None else p.overlap_grad_reduce,
        overlap_param_gather=overlap_param, bucket_size=p.ddp_bucket_size)


def wrap_for_training(cfg: Config, model: torch.nn.Module) -> tuple[DistributedDataParallel, Any]:
    """megatron DDP (gradients summed across data parallel) and the AdamW optimizer, as the training job uses them."""
    t = cfg.train
    config = get_attr_wrapped_model(model, "config")
    ddp_config = build_ddp_config(cfg)
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    # As Megatron-LM's training.py: the schedule starts each bucket's reduction when the last micro-batch's backward
    # has produced its gradients, and the parameter all-gather of the next step under the forward.
    config.grad_sync_func = ddp.start_grad_sync if ddp_config.overlap_grad_reduce else None
    config.param_sync_func = ddp.start_param_sync if ddp_config.overlap_param_gather else None
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=t.precision == Precision.BF16, params_dtype=config.params_dtype,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer), [ddp])
    return ddp, optimizer


def _forward_step(data_iterator: Iterator[VictorBatch], model: torch.nn.Module,
                  min_short_length: int = 0) -> tuple[torch.Tensor, Callable]:
    batch = next(data_iterator)  # this stage's fields only (`data.training_data`: images on the first stage)
    # The plan is built on the host, where its data-dependent sizes (survivors per row, packed sequences) are known
    # without waiting for the GPU; batch and plan then follow as non-blocking copies.
    plan = build_drop_plan(batch, get_attr_wrapped_model(model, "cfg"),
                           packed=get_attr_wrapped_model(model, "packed"), min_short_length=min_short_length)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        batch, plan = batch.to(device), plan.to(device)
    output = model(batch, plan)
    mask = plan.loss_mask()

    def loss_func(token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum = token_losses.sum()
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return output, loss_func


def bucketed_short_length(cfg: Config, micro_batches: list[VictorBatch]) -> int | None:
    """The step's short length under `parallel.pipeline_length_buckets`: the longest one its micro-batches need,
    rounded up to the smallest bucket that holds it (else the whole sequence length); None without buckets."""
    buckets = cfg.parallel.pipeline_length_buckets
    if not buckets:
        return None
    needed = max(short_length(b, cfg) for b in micro_batches)
    return next((b for b in buckets if b >= needed), micro_batches[0].shape[1])


def static_pipeline_shapes(model: torch.nn.Module, short: int, batch_shape: tuple[int, int]) -> Callable:
    """megatron's `adjust_tensor_shapes_fn` for a step whose micro-batches all drop to `short` slots: this stage
    receives the short sequence when the drop layer is in an earlier stage and sends it when the drop layer is here
    or earlier (sequence parallel: 1/tp of it; packed: rows flattened)."""
    vlm = get_attr_wrapped_model(model, "cfg", return_model_obj=True)
    config, cfg = vlm.config, vlm.cfg
    (b, s), tp = batch_shape, config.tensor_model_parallel_size if config.sequence_parallel else 1
    k = cfg.victor.drop_layer if cfg.victor.enabled else None
    first, end = vlm.layer_offset, vlm.layer_offset + len(vlm.decoder.layers)

    def shape(length: int) -> tuple[int, int, int]:
        return (b * length // tp, 1, config.hidden_size) if vlm.packed else (length // tp, b, config.hidden_size)

    recv = [shape(short if k is not None and k < first else s)]
    send = [shape(short if k is not None and k < end else s)]
    return lambda _recv, _send: (recv, send)


def forward_backward(model: torch.nn.Module, micro_batches: list[VictorBatch],
                     forward_only: bool = False) -> tuple[float, int]:
    """Run all micro-batches through the pipeline schedule; gradients (unless `forward_only`) accumulate as
    per-token sums. Returns (sum of token losses, loss tokens) on the last pipeline stage, (0.0, 0) elsewhere."""
    b, s = micro_batches[0].shape
    # Buckets only matter between pipeline stages (one stage pays their padding for nothing).
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    short = bucketed_short_length(get_attr_wrapped_model(model, "cfg"), micro_batches) if pipelined else None
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, min_short_length=short or 0), data_iterator=iter(micro_batches),
        model=[model], num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=None if short is None else static_pipeline_shapes(model, short, (b, s)))
    if not parallel_state.is_pipeline_last_stage():
        return 0.0, 0
    # One device-to-host copy for the whole step (the loss is logged once per step).
    loss_sum, loss_tokens = torch.stack([item["loss"] for item in outputs]).sum(dim=0).tolist()
    return loss_sum, int(loss_tokens)


class MegatronEngine:
    """`engines.base.Engine` on megatron-core."""

    def __init__(self, cfg: Config, dims: ParallelDims, weights: InitialWeights,
                 shape: SampleShape | None = None) -> None:
        self.cfg = cfg
        self.model = build_model(cfg, dims, weights, shape)
        self.ddp, self.optimizer = wrap_for_training(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.training_state = megatron_checkpoint.MegatronTrainingState(
            self.model, self.optimizer, self.scheduler, cfg, gathered=self._parameters_gathered)

    def train_step(self, micro_batches: list[VictorBatch], global_loss_tokens: int) -> StepResult:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        # megatron divides the summed gradients by the token count the last stage reports for the step; all
        # ranks agree on the global one through finalize_model_grads' reduction of each rank's count.
        loss_sum, loss_tokens = forward_backward(self.ddp, micro_batches)
        grad_norm = self._finite_grad_norm()
        if grad_norm is None:
            # megatron's fp32 optimizer would apply NaN gradients (only the fp16 loss scaler checks); its DDP
            # check_for_nan_in_grad aborts the job instead: skip the update, as Megatron-LM does on overflow.
            return StepResult(loss_sum, loss_tokens, self.optimizer.param_groups[0]["lr"], float("nan"),
                              skipped=True)
        self.scheduler.step(1)
        self._clip_and_update(grad_norm)
        return StepResult(loss_sum, loss_tokens, self.optimizer.param_groups[0]["lr"], grad_norm)

    def _finite_grad_norm(self) -> float | None:
        """The main gradients' global norm (megatron's `prepare_grads`, `get_grad_norm`: reduced over every rank
        holding gradients, so all ranks decide alike), or None when it is not finite. A NaN or inf in any gradient
        makes the norm NaN or inf, so the norm that clipping needs anyway decides: no pass of our own over the
        gradient buffers, no collective of our own, one host sync per step. (A non-finite loss makes non-finite
        gradients; an infinite loss whose gradients stay finite, possible with an infinite logit, is applied.)"""
        found_inf = self.optimizer.prepare_grads()  # only with a loss scaler (fp16); False for fp32 and bf16
        grad_norm = float(self.optimizer.get_grad_norm())
        return grad_norm if math.isfinite(grad_norm) and not found_inf else None

    def _clip_and_update(self, grad_norm: float) -> None:
        """The rest of megatron's optimizer step (as `ChainedOptimizer.step`): clip by the global norm, update."""
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = inner.get_parameters()
            if inner.config.clip_grad > 0.0 and params and not getattr(inner, "is_stub_optimizer", False):
                clip_grad_by_total_norm_fp32(
                    params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()

    @contextmanager
    def _parameters_gathered(self) -> Iterator[None]:
        """Outside training steps, with overlapped parameter all-gather: the last step's parameters gathered now,
        and no all-gather hooks in the way (Megatron-LM's `disable_forward_pre_hook` around evaluation and saves)."""
        if not self.ddp.use_forward_hook:
            yield
            return
        self.ddp.disable_forward_pre_hook()
        try:
            yield
        finally:
            self.ddp.enable_forward_pre_hook()

    def loss(self, micro_batches: list[VictorBatch]) -> tuple[float, int]:
        self.ddp.eval()
        with torch.no_grad(), self._parameters_gathered():
            result = forward_backward(self.ddp, micro_batches, forward_only=True)
        self.ddp.train()
        return result
