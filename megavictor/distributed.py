"""Process-group setup: torch.distributed (nccl on GPU, gloo on CPU) and megatron's tp x pp x dp groups."""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megavictor.compat import enable_cpu_compat
from megavictor.config import ConfigError, validate


@dataclass(frozen=True)
class ParallelDims:
    """Where this process sits in the tp x pp x dp grid."""

    world: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


@contextmanager
def local_rendezvous() -> Iterator[dict[str, str]]:
    """Host the torch.distributed store for ranks this process starts on this machine, as torchrun's agent does: the
    store binds a port the OS picks (no window between choosing a free port and binding it, in which another job's
    gloo connection can take it: EADDRINUSE) and every rank connects to it as a client. Yields the environment the
    ranks need for env:// init."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store


def _local_rank_entry(rank: int, world: int, rendezvous: dict[str, str], fn: Callable, args: tuple, queue) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **rendezvous)
    try:
        queue.put((rank, True, fn(*args)))
    except BaseException:  # every failure goes to the parent, which raises it with the rank's traceback
        queue.put((rank, False, traceback.format_exc()))


def run_on_local_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """`fn(*args)` on ranks 0..world-1 of a fresh job on this machine (spawned processes, torch.distributed's env
    vars set, `local_rendezvous`); what each returns, in rank order. For `bench pipeline` and the tests: a job
    inside a command, without torchrun."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    results: dict[int, Any] = {}
    errors: list[str] = []
    with local_rendezvous() as rendezvous:
        procs = [ctx.Process(target=_local_rank_entry, args=(r, world, rendezvous, fn, args, queue), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                rank, ok, value = queue.get(timeout=timeout)
                (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


def init_distributed(tp: int, pp: int, seed: int, backend: str | None = None) -> ParallelDims:
    """Initialise torch.distributed from the environment (torchrun, SLURM via submitit) or as a single process,
    then megatron's model-parallel groups and RNG tracker."""
    enable_cpu_compat()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:  # a plain single process: an in-process store, no port (and nothing in the environment of the
            # processes it starts)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    return current_dims()


def init_from_config(cfg) -> ParallelDims:
    dims = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    validate(cfg, world_size=dims.world)
    return dims


def current_dims() -> ParallelDims:
    return ParallelDims(
        world=dist.get_world_size(), rank=dist.get_rank(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def served_device_types(group: dist.ProcessGroup | None = None) -> list[str]:
    """The device types the backend(s) of `group` (default: the world) serve: ["cuda"] under NCCL, ["cpu"] under
    gloo; a collective with a tensor on any other device fails ("No backend type associated with device type")."""
    group = group if group is not None else dist.group.WORLD
    return [device.type for device in group._device_types]


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where the tensor of a collective our own code issues on `group` must live: a device its backend serves, as
    Megatron-LM's `dist_signal_handler` picks it (NCCL: this rank's GPU; gloo: the CPU; the CPU when served)."""
    served = served_device_types(group)
    if "cpu" in served or not served:
        return torch.device("cpu")
    if served[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(served[0])


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank of the job (every rank calls this): one all-reduce of a number."""
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
