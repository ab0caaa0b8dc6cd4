"""No process outlives the job: helper processes of a trainer die with it, whatever signal ends it.

A trainer killed by SIGKILL (the OOM killer, `scancel` after its grace time, a user) runs no clean-up code, so its
helpers must end by themselves. Two measures:

- `tie_forked_helpers`: every process forked from the trainer (megatron's checkpoint write workers, data-loader
  workers, the writer's result-queue manager below) asks the kernel for SIGKILL when its parent dies
  (`PR_SET_PDEATHSIG`), in a fork hook.
- `start_checkpoint_writer_queue`: megatron's `dist_checkpointing` writer collects its workers' results through a `multiprocessing` Manager that it
  starts with the *spawn* method at the first save: a fresh interpreter, out of reach of fork hooks, which (with
  the resource tracker spawning brings along) was found alive, parented to init, 44 minutes after a SIGKILL. We
  start that Manager ourselves by forking, so that the hook covers it, and hand megatron its queue.

Linux only (prctl); elsewhere both are no-ops. The parent-death signal fires when the forking *thread* ends: all
forks in question happen on the trainer's main thread.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
_installed_by: int | None = None
_writer_manager: Any = None


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def tie_forked_helpers() -> None:
    """From now on, every process forked from this one is killed when this one dies (once per process)."""
    global _installed_by
    if not sys.platform.startswith("linux") or _installed_by == os.getpid():
        return
    _installed_by = os.getpid()
    forking: list[int] = []
    os.register_at_fork(before=lambda: forking.append(os.getpid()),
                        after_in_parent=forking.clear,
                        after_in_child=lambda: _die_with_parent(forking.pop()))


def start_checkpoint_writer_queue() -> None:
    """Give megatron's file writer a result queue served by a forked Manager tied to this process (see the module
    docstring), before its first save would spawn one."""
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    tie_forked_helpers()
    if filesystem_async._results_queue is None:
        _writer_manager = mp.get_context("fork").Manager()
        filesystem_async._results_queue = _writer_manager.Queue()
