"""The DeepSpeed engine (`train.engine: deepspeed`): ZeRO-1/2/3 data-parallel training of the HF-format Victor model.

The model is `VictorLlavaForConditionalGeneration`, the very module `megavictor convert to-hf` exports, fed the
loader's packed rows (`cu_seqlens`: SDPA with a block-diagonal mask, or flash-attn varlen on GPU). Everything around
it is the megatron engine's: the same data stream, global batch and per-token loss (`TrainLoop`), AdamW with
megatron's weight-decay groups, megatron's warmup + cosine schedule, the same stage freezing, metrics, run directory,
checkpoint layout and stop signals. Parallelism is data parallel only (tp = pp = 1); DeepSpeed shards optimizer state
(ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) over the ranks.

Top to bottom:
1. `import_deepspeed`: the lazy import, with the settings DeepSpeed needs on a CPU-only machine.
2. `build_model`: HF config and weights from a full state (the layout-independent init, or `train.init_from`),
   freezing, attention implementation, gradient checkpointing; `param_groups`; `hf_inputs`.
3. `DeepSpeedTrainer`: `deepspeed.initialize`, one optimizer step, evaluation, save and resume.
4. Reading checkpoints without a process group (`gather_full_state`, `checkpoint_config`): `convert to-hf`,
   `eval --checkpoint` and `train.init_from` of either engine go through these.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megavictor import checkpoint
from megavictor.config import Config, ConfigError, config_from_dict
from megavictor.distributed import init_from_config
from megavictor.engines.loop import TrainLoop, build_scheduler, micro_batches_per_rank
from megavictor.hf.convert import (
    check_state,
    expected_shapes,
    full_state_of,
    hf_reference_names,
    hf_state,
    victor_hf_config,
)
from megavictor.hf.modeling_victor_llava import VictorLlavaForConditionalGeneration
from megavictor.model.batch import KIND_REGISTER, KIND_VISUAL, VictorBatch
from megavictor.model.layout import initial_value, load_vision_tower
from megavictor.model.recipe import is_trainable

# --------------------------------------------------------------------------- 1. the import


def import_deepspeed() -> Any:
    """`deepspeed`, imported on first use, set up for this machine.

    Without CUDA: the CPU accelerator (`DS_ACCELERATOR=cpu`, gloo collectives), and no build of its shared-memory
    all-reduce op, which DeepSpeed otherwise compiles with g++ at start-up (about 80 s per machine) and uses only for
    inference tensor parallelism. A `DS_ACCELERATOR` already in the environment is left alone.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as exc:
        raise RuntimeError("train.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from exc
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # ZeRO calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, deprecated since torch 2.12.
    warnings.filterwarnings("ignore", r".*is deprecated. Please use `torch\.distributed\.", FutureWarning)
    return deepspeed


# --------------------------------------------------------------------------- 2. the model


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The layout-independent initial weights (reference names) that megatron's `VictorVLM` starts from too."""
    m, shapes = cfg.model, expected_shapes(cfg)
    state = {name: initial_value(name, tuple(shape), m.init_method_std, m.num_layers, cfg.train.seed)
             for name, shape in shapes.items()}
    if cfg.vision.init_from:  # a pretrained ViT, as megatron's fresh runs load it
        state.update(load_vision_tower(cfg.vision.init_from,
                                       {n: tuple(s) for n, s in shapes.items() if n.startswith("vision.")}))
    return state


def build_model(cfg: Config, full_state: dict[str, torch.Tensor]) -> VictorLlavaForConditionalGeneration:
    """The HF Victor LLaVA with `full_state`'s weights, trainable per the LLaVA stage (`recipe.is_trainable`)."""
    attention = "flash_attention_2" if cfg.train.attention_backend == "flash" else "sdpa"
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
        for name, param in model.named_parameters():
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
    names, shapes = hf_reference_names(cfg), expected_shapes(cfg)
    groups: dict[float, list[torch.nn.Parameter]] = {1.0: [], 0.0: []}
    for name, param in model.named_parameters():
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
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_rank(cfg, dp),
        "gradient_clipping": t.clip_grad,  # the same rule as megatron's: scale by clip / (norm + 1e-6) when below 1
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the update megatron makes, on CPU and GPU
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- 3. the trainer


class DeepSpeedTrainer(TrainLoop):
    def __init__(self, cfg: Config) -> None:
        deepspeed = import_deepspeed()
        # torch.distributed (gloo on CPU, nccl on GPU) and megatron's groups at tp = pp = 1, which the loop's
        # loss reduction and reading megatron checkpoints (`train.init_from`) use; DeepSpeed joins this process group.
        dims = init_from_config(cfg)
        if dims.world == 1:  # a plain process; torchrun and `megavictor launch` set it
            os.environ.setdefault("LOCAL_RANK", "0")
        latest = checkpoint.latest_checkpoint(Path(cfg.train.run_dir) / "checkpoints")
        if latest is not None:
            check_resumable(latest, cfg, dims.world)
        if cfg.train.init_from and latest is None:
            # Weights only, from a checkpoint of either engine (`convert from-hf` writes a megatron one).
            full = checkpoint.load_full_state(cfg.train.init_from)[1]
            try:
                check_state(cfg, full)
            except ValueError as exc:
                raise ConfigError(f"train.init_from={cfg.train.init_from}: {exc}") from exc
        else:
            full = initial_state(cfg)  # a resumed run overwrites them from its checkpoint
        model = build_model(cfg, full)
        optimizer = torch.optim.AdamW(param_groups(cfg, model), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                      eps=cfg.train.adam_eps)
        # DeepSpeed moves the model to this rank's device, partitions it (ZeRO-3) and wraps the optimizer.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=deepspeed_config(cfg, dims.dp))
        self.hf_config = model.config
        self.scheduler = build_scheduler(cfg, self.optimizer)  # sets lr and weight decay of DeepSpeed's groups
        super().__init__(cfg, dims)

    def optimize(self, micro_batches: list[VictorBatch], global_tokens: int) -> tuple[float, int, float, Any]:
        self.scheduler.step(1)  # the lr of step n (1-based), used by the optimizer step at the last micro-batch
        lr = self.optimizer.param_groups[0]["lr"]
        normaliser = max(global_tokens, 1)
        loss_sum, num_tokens = 0.0, 0
        for batch in micro_batches:
            # The model returns (sum of this micro-batch's token losses) / (loss tokens of the whole global batch).
            # DeepSpeed averages gradients over the data-parallel ranks, hence the factor dp, and must not divide
            # by the accumulation steps (scale_wrt_gas): the update follows d(global token-loss sum) / global_tokens.
            out = self.engine(**hf_inputs(batch, self.hf_config, self.engine.device), num_items_in_batch=normaliser)
            self.engine.backward(out.loss * self.dims.dp, scale_wrt_gas=False)
            self.engine.step()  # reduces gradients and steps the optimizer at the last micro-batch of the step
            loss_sum += float(out.loss.detach()) * normaliser
            num_tokens += batch.num_loss_tokens()
        return loss_sum, num_tokens, lr, self.engine.get_global_grad_norm()

    def forward_only(self, micro_batches: list[VictorBatch]) -> tuple[float, int]:
        # ZeRO-3 gathers parameters collectively: every rank runs as many forwards as the busiest one.
        rounds = torch.tensor([len(micro_batches)])
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        self.engine.eval()
        loss_sum, num_tokens = 0.0, 0
        for i in range(int(rounds)):
            batch = micro_batches[min(i, len(micro_batches) - 1)]
            out = self.engine(**hf_inputs(batch, self.hf_config, self.engine.device), num_items_in_batch=1)
            if i < len(micro_batches):
                loss_sum += float(out.loss)
                num_tokens += batch.num_loss_tokens()
        self.engine.train()
        return loss_sum, num_tokens

    def save(self) -> Path:
        """DeepSpeed's own checkpoint (every rank its ZeRO shards) in `step_XXXXXX.tmp`, then our marker with the
        config, step, loader and scheduler state; renamed and named by `latest` only once complete."""
        state = {"step": self.step, "loader": self.loader.state_dict(), "scheduler": self.scheduler.state_dict()}

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state=state, save_latest=False)
            torch.save(checkpoint.rng_state(), tmp / f"rng_rank{dist.get_rank():05d}.pt")
            dist.barrier()
            if dist.get_rank() == 0:
                marker = {"engine": "deepspeed", "step": self.step, "zero_stage": self.cfg.train.zero_stage,
                          "world_size": self.dims.world, "config": self.cfg.to_dict()}
                (tmp / checkpoint.DEEPSPEED_MARKER).write_text(json.dumps(marker, indent=2))

        return checkpoint.commit_atomically(self.checkpoints, self.step, write, self.cfg.train.keep_last)

    def resume(self) -> None:
        """Continue exactly from RUN_DIR's latest checkpoint: weights, optimizer, scheduler, data position, RNG."""
        latest = checkpoint.latest_checkpoint(self.checkpoints)
        if latest is None:
            return
        loaded, client = self.engine.load_checkpoint(str(latest.parent), tag=latest.name,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {latest}")
        self.step = int(client["step"])
        self.loader.load_state_dict(client["loader"])
        self.scheduler.load_state_dict(client["scheduler"])
        rng = latest / f"rng_rank{dist.get_rank():05d}.pt"
        checkpoint.set_rng_state(torch.load(rng, weights_only=False))


def check_resumable(latest: Path, cfg: Config, world: int) -> None:
    """A DeepSpeed checkpoint of the same ZeRO stage and world size (its shards are per rank)."""
    if checkpoint.engine_of(latest) != "deepspeed":
        raise ConfigError(f"train.run_dir={cfg.train.run_dir} holds megatron checkpoints: resume it with "
                          f"train.engine=megatron, or start a new run with train.init_from={latest}")
    saved = _marker(latest)
    if (saved["zero_stage"], saved["world_size"]) != (cfg.train.zero_stage, world):
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage} on {world} ranks: {latest} was written with "
                          f"ZeRO-{saved['zero_stage']} on {saved['world_size']} ranks; resume with those, or start "
                          f"a new run with train.init_from={latest}")


# --------------------------------------------------------------------------- 4. reading checkpoints


def _marker(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / checkpoint.DEEPSPEED_MARKER).read_text())


def checkpoint_config(path: str | Path) -> Config:
    """The resolved config a DeepSpeed checkpoint was written with."""
    return config_from_dict(_marker(path)["config"])


def gather_full_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The fp32 weights of a DeepSpeed checkpoint (ZeRO-1/2/3 shards merged by DeepSpeed's `zero_to_fp32`, in this
    process, without a process group) in megavictor's full-state names, and its config."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    cfg = checkpoint_config(path)
    tensors = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    # ZeRO-1/2 hand out views into one flat buffer per group: own storage each, so safetensors can write them.
    return cfg, {name: t.clone() for name, t in full_state_of(cfg, tensors, str(path)).items()}
