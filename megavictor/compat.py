"""CPU compatibility for megatron-core 0.16.x: the one place where we work around its CUDA assumptions.

megatron-core has no CPU path. On a machine without CUDA, `enable_cpu_compat()` makes the pieces we use run on
CPU tensors with the gloo backend, and does nothing where CUDA exists:

- `torch.cuda.current_device()` returns "cpu" (p2p_communication allocates receive buffers and shape tensors
  on it) and `torch.cuda.synchronize()` is a no-op.
- The tensor-parallel RNG tracker (`tensor_parallel.random`) keeps CPU generator states instead of CUDA ones, so
  `model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()` and activation checkpointing work.
- A `TorchFunctionMode` maps a literal CUDA device to the CPU: `schedules.py` builds `torch.zeros(...,
  device="cuda")`, `CLIPViTModel` calls `.cuda()` on its position ids, the optimizer and `clip_grads.py`
  allocate `device='cuda'` buffers. The same mode reports CPU tensors' `Tensor.type()` under CUDA names,
  because the fp32 optimizer path and `clip_grad_by_total_norm_fp32` assert `'torch.cuda.FloatTensor'`.

megatron's torch norm (`WrappedTorchNorm`, the local layers' norm without Transformer Engine or Apex) refuses
sequence parallelism; `SequenceParallelTorchNorm` is the same norm for that case.

The distributed optimizer without APEX or Transformer Engine (always the case on CPU) steps torch's Adam, whose
per-parameter state megatron-core 0.16 mishandles on load (`prepare_distributed_optimizer_load`).

DeepSpeed needs settings of its own on a CPU-only machine (`import_deepspeed`).

Everything else in megavictor is device-agnostic; `tests/test_compat.py` pins each workaround down, so that a
megatron-core upgrade that removes (or adds) a CUDA assumption shows up as a test failure here.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_mode: "_CudaDeviceToCpu | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites CUDA devices to the CPU in factory calls, `Tensor.to` and `Tensor.cuda`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(*_args: Any, clone: bool = False, **_kwargs: Any) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def cpu_compat_active() -> bool:
    return _mode is not None


def enable_cpu_compat() -> bool:
    """Install the CPU workarounds once per process when CUDA is absent; returns whether they are active."""
    global _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _mode is not None:
            return True
        from megatron.core.tensor_parallel import random as tp_random

        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
        torch.cuda.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]
        torch.cuda.manual_seed = torch.manual_seed  # type: ignore[assignment]
        tp_random._get_cuda_rng_state = _cpu_get_rng_state
        tp_random._set_cuda_rng_state = _cpu_set_rng_state
        _mode = _CudaDeviceToCpu()
        _mode.__enter__()
    return True


class SequenceParallelTorchNorm:
    """megatron's torch norm for sequence parallelism: built like a norm class by megatron specs, returns a torch
    RMSNorm/LayerNorm.

    A per-token norm is exact on a slice of the sequence; what megatron's `WrappedTorchNorm` lacks is marking its
    weights `sequence_parallel`, which makes `finalize_model_grads` sum their gradients over the tensor-parallel
    ranks (each rank saw only its slice), as megatron's TENorm and FusedLayerNorm do.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_kwargs: Any) -> torch.nn.Module:
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True  # type: ignore[attr-defined]
        return norm


def prepare_distributed_optimizer_load(optimizer: Any) -> None:
    """Make megatron's distributed optimizer able to load a checkpoint when it steps torch's Adam (no APEX or
    Transformer Engine FusedAdam: always so on CPU; Megatron-LM's GPU images have TE). Two megatron-core 0.16 gaps:

    - Loading first calls `DistributedOptimizer.state_dict()`, which asserts that all parameters share one Adam
      `step`, and fails while the optimizer has not stepped: it gets a zero state here, all of it replaced by the
      checkpoint's.
    - The `fully_reshardable` loader copies every entry of a parameter's state from the checkpoint except `step`
      (restored from the param groups), and fails with KeyError 'step' on torch Adam's per-parameter step:
      `_set_main_param_and_optimizer_states` leaves `step` aside while it copies the rest. The restored step is one
      tensor shared by all parameters, which torch's Adam would then advance once per parameter at every step
      (wrong bias correction): each parameter gets its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    with _lock:
        if not getattr(cls._set_main_param_and_optimizer_states, "_keeps_step", False):
            cls._set_main_param_and_optimizer_states = _keeping_adam_step(cls._set_main_param_and_optimizer_states)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, cls):
            continue
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                if not opt.optimizer.state[param]:
                    opt.optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                                  "exp_avg_sq": torch.zeros_like(param)}


def _keeping_adam_step(set_states: Any) -> Any:
    def wrapper(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()

    wrapper._keeps_step = True  # type: ignore[attr-defined]
    return wrapper


def import_deepspeed() -> Any:
    """`deepspeed`, imported on first use, set up for this machine (the engine and offline checkpoint readers).

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
        raise RuntimeError("train.engine=deepspeed and DeepSpeed checkpoints need DeepSpeed: "
                           "pip install -e '.[deepspeed]'") from exc
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # ZeRO calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, deprecated since torch 2.12.
    warnings.filterwarnings("ignore", r".*is deprecated. Please use `torch\.distributed\.", FutureWarning)
    return deepspeed
