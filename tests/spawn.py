"""Run a function on N real gloo ranks (torch.multiprocessing spawn) and collect what each rank returns."""

from __future__ import annotations

import os
import traceback
import warnings
from typing import Any, Callable

import torch.multiprocessing as mp

from megavictor.distributed import local_rendezvous


def _entry(rank: int, world: int, rendezvous: dict[str, str], fn: Callable, args: tuple, queue) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **rendezvous)
    try:
        queue.put((rank, True, fn(*args)))
    except BaseException:  # report every failure to the parent, which re-raises it
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """`fn(*args)` on ranks 0..world-1 with torch.distributed env vars set; results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with local_rendezvous() as rendezvous:
        procs = [ctx.Process(target=_entry, args=(r, world, rendezvous, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
        for p in procs:
            p.join(timeout=30)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
