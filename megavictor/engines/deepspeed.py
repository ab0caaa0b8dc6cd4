"""The DeepSpeed engine (`train.engine: deepspeed`): ZeRO-1/2/3 data-parallel training of the HF-format Victor model.

The model is `VictorLlavaForConditionalGeneration`, the very module `megavictor convert to-hf` exports, fed the
loader's packed rows (`cu_seqlens`: SDPA with a block-diagonal mask, or flash-attn varlen on GPU). Everything around
it is shared with the megatron engine: the training loop, the same data stream, global batch and per-token loss,
AdamW with megatron's weight-decay groups, megatron's warmup + cosine schedule, the same stage freezing, the initial
weights (`megavictor.checkpoint.initial_weights`), the checkpoint manager (`megavictor.checkpoint`). Parallelism
is data parallel only (tp = pp = 1); DeepSpeed shards optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters
(ZeRO-3) over the ranks.

Top to bottom: `build_model` (HF config and weights from a full state, freezing, attention implementation,
gradient checkpointing), `param_groups`, `hf_inputs`, `deepspeed_config`, then `DeepSpeedEngine`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import torch

from megavictor.checkpoint import deepspeed as deepspeed_checkpoint
from megavictor.checkpoint.initial_weights import InitialWeights, WeightOrigin, fresh_state
from megavictor.compat import import_deepspeed
from megavictor.config import AttentionBackend, Config, Precision
from megavictor.data.training_data import micro_batches_per_rank
from megavictor.distributed import ParallelDims, any_rank
from megavictor.engines.base import StepResult, build_scheduler
from megavictor.errors import notice
from megavictor.hf.convert import hf_named_parameters, hf_reference_names, hf_state, victor_hf_config
from megavictor.hf_model.modeling_victor_llava import VictorLlavaForConditionalGeneration
from megavictor.model.batch import KIND_REGISTER, KIND_VISUAL, VictorBatch
from megavictor.model.recipe import is_trainable
from megavictor.model.reference import full_shapes

# --------------------------------------------------------------------------- the model


def build_model(cfg: Config, full_state: dict[str, torch.Tensor]) -> VictorLlavaForConditionalGeneration:
    """The HF Victor LLaVA with `full_state`'s weights, trainable per the LLaVA stage (`recipe.is_trainable`)."""
    attention = "flash_attention_2" if cfg.train.attention_backend == AttentionBackend.FLASH else "sdpa"
    if attention == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None
                                             or not torch.cuda.is_available()):
        raise RuntimeError("train.attention_backend=flash needs flash-attn on a CUDA GPU (pip install -e '.[gpu]'); "
                           "use train.attention_backend=local (SDPA) otherwise")
    config = victor_hf_config(cfg, dtype=torch.float32)
    config.use_cache = config.text_config.use_cache = False
    model = VictorLlavaForConditionalGeneration._from_config(config, attn_implementation=attention)
    tensors = hf_state(cfg, full_state)
    names = hf_reference_names(cfg)
    with torch.no_grad():
        for name, param in hf_named_parameters(model):
            if name not in tensors:
                raise KeyError(f"no weights for {name}")
            param.copy_(tensors[name])
            # The ViT's post_layernorm is not part of the model megavictor trains (LLaVA never uses it).
            param.requires_grad_(name in names and is_trainable(names[name], cfg))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def param_groups(cfg: Config, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in megatron's two weight-decay groups, decided on the megavictor parameter each is part
    of: no decay for biases and 1-D tensors (`wd_mult`, applied by the scheduler)."""
    names, shapes = hf_reference_names(cfg), full_shapes(cfg)
    groups: dict[float, list[torch.nn.Parameter]] = {1.0: [], 0.0: []}
    for name, param in hf_named_parameters(model):
        if param.requires_grad:
            ref = names[name]
            groups[0.0 if ref.endswith(".bias") or len(shapes[ref]) == 1 else 1.0].append(param)
    return [{"params": params, "wd_mult": mult} for mult, params in groups.items() if params]


def hf_inputs(batch: VictorBatch, config: Any, device: torch.device) -> dict[str, torch.Tensor | None]:
    """A packed `VictorBatch` as the HF model's inputs: image and register slots hold their token ids."""
    batch = batch.to(device)
    ids = batch.tokens.masked_fill(batch.kinds == KIND_VISUAL, config.image_token_id)
    if config.num_registers:
        ids = ids.masked_fill(batch.kinds == KIND_REGISTER, config.register_token_id)
    return {"input_ids": ids, "pixel_values": batch.images if batch.images.shape[0] else None,
            "position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens, "shift_labels": batch.labels}


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    t = cfg.train
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_rank(cfg, dp),
        "gradient_clipping": t.clip_grad,  # the same rule as megatron's: scale by clip / (norm + 1e-6) when below 1
        "bf16": {"enabled": t.precision == Precision.BF16},
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the update megatron makes, on CPU and GPU
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if t.precision == Precision.BF16 and t.zero_stage >= 2:
        config.update(BF16_FP32_GRADIENTS)
    elif t.precision == Precision.BF16:
        notice("train.zero_stage=1 with train.precision=bf16: DeepSpeed accumulates and reduces the gradients in bf16 "
               "at ZeRO-1 (its fp32 accumulation there needs its BF16 optimizer, whose checkpoints zero_to_fp32 "
               "cannot read); train.zero_stage=2 accumulates them in fp32")
    return config


# bf16 weights, fp32 gradients, as megatron's bf16 path (fp32 main grads, `train.grad_reduce_dtype: fp32`). Left to
# itself DeepSpeed 0.19 accumulates a bf16 model's gradients over the micro-batches of a step in bf16 and reduces
# them in bf16 (its `communication_data_type` follows the model). `data_types.grad_accum_dtype: fp32`: ZeRO-2 reduces
# each micro-batch's gradients and adds them into an fp32 buffer of this rank's partition, ZeRO-3 turns its
# reduce-scattered partitions into fp32 before adding them up; `communication_data_type: fp32` makes those reductions
# fp32. (ZeRO-1 honours the accumulation dtype only by switching to DeepSpeed's BF16_Optimizer, whose checkpoints
# DeepSpeed's `zero_to_fp32` cannot merge, so ZeRO-1 with bf16 keeps DeepSpeed's bf16 gradients, as before, and says
# so; the `bf16.immediate_grad_update` switch concerns that optimizer alone.)
BF16_FP32_GRADIENTS: dict[str, Any] = {
    "data_types": {"grad_accum_dtype": "fp32"},
    "communication_data_type": "fp32",
}


# --------------------------------------------------------------------------- the engine


class DeepSpeedEngine:
    """`engines.base.Engine` on DeepSpeed."""

    def __init__(self, cfg: Config, dims: ParallelDims, weights: InitialWeights) -> None:
        deepspeed = import_deepspeed()
        self.cfg, self.dims = cfg, dims
        if dims.world == 1:  # a plain process; torchrun and `megavictor launch` set it
            os.environ.setdefault("LOCAL_RANK", "0")
        if weights.origin == WeightOrigin.RESUME:
            deepspeed_checkpoint.check_resumable(weights.checkpoint, cfg, dims.world)
            full = fresh_state(cfg, InitialWeights(WeightOrigin.FRESH))  # overwritten by `load`
        else:
            full = fresh_state(cfg, weights)
        model = build_model(cfg, full)
        optimizer = torch.optim.AdamW(param_groups(cfg, model), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                      eps=cfg.train.adam_eps)
        # DeepSpeed moves the model to this rank's device, partitions it (ZeRO-3) and wraps the optimizer.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=deepspeed_config(cfg, dims.dp))
        self.hf_config = model.config
        self.scheduler = build_scheduler(cfg, self.optimizer)  # sets lr and weight decay of DeepSpeed's groups
        self.training_state = deepspeed_checkpoint.DeepSpeedTrainingState(self.engine, self.scheduler, cfg,
                                                                            dims.world)

    def train_step(self, micro_batches: list[VictorBatch], global_loss_tokens: int) -> StepResult:
        self.scheduler.step(1)  # the lr of step n (1-based), used by the optimizer step at the last micro-batch
        lr = self.optimizer.param_groups[0]["lr"]
        normaliser = max(global_loss_tokens, 1)
        loss_sum, loss_tokens = 0.0, 0
        for batch in micro_batches:
            # The model returns (sum of this micro-batch's token losses) / (loss tokens of the whole global batch).
            # DeepSpeed averages gradients over the data-parallel ranks, hence the factor dp, and must not divide
            # by the accumulation steps (scale_wrt_gas): the update follows d(global token-loss sum) / global_tokens.
            out = self.engine(**hf_inputs(batch, self.hf_config, self.engine.device), num_items_in_batch=normaliser)
            self.engine.backward(out.loss * self.dims.dp, scale_wrt_gas=False)
            self.engine.step()  # reduces gradients and steps the optimizer at the last micro-batch of the step
            loss_sum += float(out.loss.detach()) * normaliser
            loss_tokens += batch.num_loss_tokens()
        grad_norm = self.engine.get_global_grad_norm()
        # DeepSpeed's ZeRO optimizers skip a step whose global gradient norm is not finite (fp32 and, with
        # bf16's check_grad_overflow, bf16); a non-finite loss makes non-finite gradients.
        if any_rank(not (self.engine.was_step_applied() and math.isfinite(loss_sum))):
            self.scheduler.step(-1)  # as the megatron engine: a skipped update does not advance the schedule
            return StepResult(loss_sum, loss_tokens, lr, float("nan"), skipped=True)
        return StepResult(loss_sum, loss_tokens, lr, None if grad_norm is None else float(grad_norm))

    def loss(self, micro_batches: list[VictorBatch]) -> tuple[float, int]:
        # ZeRO-3 gathers parameters collectively: the loop gives every rank the same number of micro-batches.
        self.engine.eval()
        loss_sum, loss_tokens = 0.0, 0
        with torch.no_grad():
            for batch in micro_batches:
                out = self.engine(**hf_inputs(batch, self.hf_config, self.engine.device), num_items_in_batch=1)
                loss_sum += float(out.loss)
                loss_tokens += batch.num_loss_tokens()
        self.engine.train()
        return loss_sum, loss_tokens
