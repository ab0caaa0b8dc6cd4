"""The submitted job: one task per GPU (or CPU slot), torch.distributed from the SLURM/local environment, then the
training entry point; on preemption or timeout it checkpoints at a step boundary and is requeued.

Why not submitit's own USR2 handling alone: submitit's handler (`SignalHandler.checkpoint_and_try_requeue`) runs
`checkpoint()` inside the signal handler on rank 0 only, then immediately `scontrol requeue`s and `sys.exit`s; the
other ranks ignore the signal. That kills training mid-step, so a trainer that saves at a step boundary never gets
there, and calling `request_stop()` from `checkpoint()` would be pointless. So, while the entry point runs:

1. every rank replaces submitit's USR2 (and its ignoring SIGTERM) handler with one that calls the entry module's
   `request_stop()`; the trainer (which installs the same handlers itself) saves a checkpoint at the next step
   boundary and returns a summary with `stopped_by_signal` True;
2. rank 0 then requeues the job, but only if SLURM still has it RUNNING: that is the USR2 sent `--signal` seconds
   before the time limit, or a preemption warning (`scancel --signal`). After `scancel` or `scontrol requeue`, SLURM
   already marks the job COMPLETING and ends or requeues it itself; a `scontrol requeue` then would resurrect a
   cancelled job (measured on SLURM 22.05);
3. every rank exits without a result file (SystemExit passes submitit's `except Exception`), so the client keeps
   waiting for the requeued run, which resumes from `RUN_DIR/checkpoints/latest`.

Before our handlers are installed (unpickling, imports), submitit's handler still applies: rank 0 requeues at once,
which loses nothing since no step has run, and `Checkpointable.checkpoint()` resubmits this same job.

A rank that raises ends the job: submitit writes its traceback to that rank's log
(RUN_DIR/submitit/<job>_<rank>_log.err) and srun's --kill-on-bad-exit (set by the launcher) stops the ranks left
waiting in a collective.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from typing import Any, Callable

import submitit
from submitit.helpers import Checkpointable

from launch import rendezvous
from megavictor.config import Config

DEFAULT_ENTRY = "megavictor.training.job:run"
RENAMED_ENTRIES = {"megavictor.trainer:run": DEFAULT_ENTRY}  # the training job's modules moved into one package


def resolve_entry(entry: str) -> tuple[Callable[[Config], Any], Callable[[], None]]:
    """`module:function` -> (run, the module's request_stop); an old spelling of the default entry still works."""
    if entry in RENAMED_ENTRIES:
        print(f"megavictor launch: --entry {entry} is deprecated; use {RENAMED_ENTRIES[entry]}", file=sys.stderr)
        entry = RENAMED_ENTRIES[entry]
    module_name, _, function = entry.partition(":")
    if not module_name or not function:
        raise ValueError(f"entry {entry!r} must look like package.module:function")
    module = importlib.import_module(module_name)
    return getattr(module, function), getattr(module, "request_stop")


class TrainJob(Checkpointable):
    """`cfg` (resolved, absolute run_dir) trained by `entry` on every task of a submitit job."""

    def __init__(self, cfg: Config, entry: str = DEFAULT_ENTRY, gpus: bool = True,
                 network_interface: str | None = None) -> None:
        self.cfg = cfg
        self.entry = entry
        self.gpus = gpus
        self.network_interface = network_interface

    def __call__(self) -> Any:
        """The entry point's summary (megavictor.training.job.Summary); exits without one when stopped and requeued."""
        job_env = submitit.JobEnvironment()
        # torch.distributed's environment (launch/rendezvous.py). Every task keeps all of its node's GPUs visible:
        # the trainer selects cuda:LOCAL_RANK itself.
        print(rendezvous.header(job_env, rendezvous.setup(job_env, self.network_interface)), flush=True)
        if self.gpus:  # the trainer stops with one line if this task sees no GPU (megavictor.training.cuda_expected)
            os.environ["MEGAVICTOR_EXPECT_CUDA"] = "1"
        else:  # CPU tasks: hide any GPU so the trainer picks gloo
            import torch

            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            # As torchrun does: one thread per task unless told otherwise (OMP_NUM_THREADS, --cpus-per-task).
            # Every task using every core of the node oversubscribes it (measured: steps 20x slower).
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
                                      or 1))
        run, request_stop = resolve_entry(self.entry)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda *_: request_stop())
        summary = run(self.cfg)
        if summary.stopped_by_signal:
            if job_env.global_rank == 0 and _still_running(job_env):
                print(f"stopped by signal at a step boundary: requeueing job {job_env.job_id}", flush=True)
                job_env._requeue(0)  # slurm: `scontrol requeue`; local: exit code 144, which the controller reruns
            sys.exit(0)
        return summary


def _still_running(job_env: submitit.JobEnvironment) -> bool:
    """SLURM still runs the job (a warning signal), rather than ending or requeueing it (scancel/scontrol)."""
    if job_env.cluster != "slurm":
        return True
    state = subprocess.run(["squeue", "-h", "-j", job_env.job_id, "-o", "%T"], capture_output=True, text=True)
    return state.stdout.strip() == "RUNNING"
