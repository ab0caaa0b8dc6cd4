"""Every collective our own code issues uses a tensor on a device its process group's backend serves.

Under NCCL a CPU tensor in a collective fails on every rank ("No backend type associated with device type cpu"),
while gloo serves the CPU and so hides the bug. Here the ranks run with gloo registered only for a device type the
test chooses (`meta`), so torch itself refuses a collective on a CPU tensor, exactly as NCCL would. A tensor
created on the chosen device is a CPU tensor underneath (`OnChosenDevice`) that the test hands to the gloo backend,
so the loop's collectives (the stop agreement, the global loss that training and evaluation report) and the data's
(tensor-parallel rank 0's micro-batch broadcast to its peers) run for real over two ranks and return real values.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from megavictor.distributed import run_on_local_ranks

CHOSEN = "meta"  # any device type other than the CPU; `meta` exists in every torch build


class OnChosenDevice(torch.Tensor):
    """A CPU tensor that reports the chosen device (so torch dispatches its collectives to that device's backend)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "OnChosenDevice":
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=CHOSEN,
                                                   strides=inner.stride())

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.inner if isinstance(x, OnChosenDevice) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda x: OnChosenDevice(x) if isinstance(x, torch.Tensor) else x, out)


class ChosenDeviceMode(TorchFunctionMode):
    """Tensors created on (or moved to) the chosen device become `OnChosenDevice`; an all_reduce or broadcast of one
    runs on the gloo backend the group holds for that device. Any other collective goes to torch unchanged (and fails
    on a CPU tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == CHOSEN:
            with torch._C.DisableTorchFunction():
                return OnChosenDevice(func(*args, **{**kwargs, "device": "cpu"}))
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)) \
                and torch.device(args[1]).type == CHOSEN and not isinstance(args[0], OnChosenDevice):
            return OnChosenDevice(args[0].clone())
        if func in (torch.Tensor.cpu, torch.Tensor.tolist) and isinstance(args[0], OnChosenDevice):
            return func(args[0].inner)
        if func is dist.all_reduce and isinstance(args[0], OnChosenDevice):
            return self._all_reduce(*args, **kwargs)
        if func is dist.broadcast and isinstance(args[0], OnChosenDevice):
            return self._broadcast(*args, **kwargs)
        return func(*args, **kwargs)

    def _all_reduce(self, tensor: OnChosenDevice, op: Any = dist.ReduceOp.SUM, group: Any = None,
                    async_op: bool = False) -> None:
        group = group if group is not None else dist.group.WORLD
        options = dist.AllreduceOptions()
        options.reduceOp = op
        group._get_backend(torch.device(CHOSEN)).allreduce([tensor.inner], options).wait()
        self.collectives += 1

    def _broadcast(self, tensor: OnChosenDevice, src: int | None = None, group: Any = None, async_op: bool = False,
                   group_src: int | None = None) -> None:
        group = group if group is not None else dist.group.WORLD
        options = dist.BroadcastOptions()
        options.rootRank = group_src if group_src is not None else dist.get_group_rank(group, src)
        options.rootTensor = 0
        group._get_backend(torch.device(CHOSEN)).broadcast([tensor.inner], options).wait()
        self.collectives += 1


def _loop_collectives() -> dict[str, Any]:
    from megatron.core import parallel_state

    from megavictor.distributed import collective_device, current_dims
    from megavictor.training import loop as training
    from megavictor.training.stop_request import request_stop

    dist.init_process_group(f"{CHOSEN}:gloo")
    parallel_state.initialize_model_parallel()
    dims = current_dims()
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(1))  # the test's backend refuses CPU tensors, as NCCL does
    mode = ChosenDeviceMode()
    with mode:
        device = collective_device(parallel_state.get_data_parallel_group())
        stop_before = training.stop_requested()
        if dims.rank == 1:  # a signal that reached only one rank
            request_stop()
        stop_after = training.stop_requested()
        # rank r holds r + 1 token losses summing to 2 * (r + 1): the global mean is 2
        loss = training.global_mean_loss(2.0 * (dims.rank + 1), dims.rank + 1, dims)
    return {"device": device.type, "stop": (stop_before, stop_after), "loss": loss, "collectives": mode.collectives}


def test_loop_collectives_use_the_device_the_backend_serves() -> None:
    results = run_on_local_ranks(2, _loop_collectives, timeout=240)
    for result in results:
        assert result["device"] == CHOSEN
        assert result["stop"] == (False, True)  # all ranks agree on the one rank's stop request
        assert result["loss"] == pytest.approx(2.0)
        assert result["collectives"] == 3


def _data_broadcast() -> list:
    from megatron.core import parallel_state

    from megavictor.data.training_data import broadcast_batch
    from tests.fixtures import packed_batches, tiny_config

    dist.init_process_group(f"{CHOSEN}:gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = tiny_config()
    sent = packed_batches(cfg)[0]
    with ChosenDeviceMode():
        got = broadcast_batch(sent if parallel_state.get_tensor_model_parallel_rank() == 0 else None,
                              *sent.shape)
    return [{f.name: getattr(batch, f.name).tolist() for f in fields(batch)} for batch in (sent, got)]


def test_data_broadcast_uses_the_device_the_backend_serves() -> None:
    """Tensor-parallel rank 0 decodes a micro-batch and broadcasts it to its peers (`data.training_data`)."""
    (sent, got0), (_, got1) = run_on_local_ranks(2, _data_broadcast, timeout=240)
    assert got0 == sent and got1 == sent
