"""A tiny but real distributed payload with the trainer's contract (`run(cfg) -> summary`, `request_stop()`), so the
launcher's submit / preempt / requeue / resume path runs for real in seconds (megavictor.training.job needs minutes).

Each step all-reduces (gloo) a value that depends on rank and step and adds it to a running total; the total after
`train.max_steps` steps is therefore fixed whatever the interruptions. Stop requests are all-reduced at every step
boundary (a signal may reach the ranks at different steps), then rank 0 saves {step, total} under
RUN_DIR/checkpoints/ and points `latest` at it; a later run resumes from there. Every step appends a line to
RUN_DIR/progress/rank<r>.txt. MEGAVICTOR_TEST_FAIL="<rank>:<step>" makes that rank raise at that step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megavictor.config import Config

STEP_SECONDS = 0.25
_stop_requested = False


@dataclass
class Summary:
    """Like megavictor.training.job.Summary: `stopped_by_signal` is what the job reads."""

    rank: int
    world: int
    step: int
    total: float
    resumed_from: int
    stopped_by_signal: bool


def request_stop() -> None:
    """Checkpoint at the next step boundary and return (called from signal handlers)."""
    global _stop_requested
    _stop_requested = True


def expected_total(world: int, steps: int) -> float:
    """The total an uninterrupted run reaches: sum over steps s of sum over ranks r of (r + 1) * (s + 1)."""
    return float(sum((r + 1) * (s + 1) for s in range(steps) for r in range(world)))


def _save(ckpt: Path, step: int, total: float) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / f"step_{step}.json").write_text(json.dumps({"step": step, "total": total}))
        tmp = ckpt / "latest.tmp"
        tmp.write_text(f"step_{step}.json")
        tmp.rename(ckpt / "latest")  # atomic: a kill mid-save leaves the previous checkpoint
    dist.barrier()


def run(cfg: Config) -> Summary:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.train.run_dir)
    ckpt = run_dir / "checkpoints"
    step, total = 0, 0.0
    if (ckpt / "latest").is_file():
        state = json.loads((ckpt / (ckpt / "latest").read_text()).read_text())
        step, total = state["step"], state["total"]
    resumed_from = step
    fail_rank, _, fail_step = os.environ.get("MEGAVICTOR_TEST_FAIL", "-1:-1").partition(":")
    progress = run_dir / "progress" / f"rank{rank}.txt"
    progress.parent.mkdir(parents=True, exist_ok=True)
    stopped = False
    while step < cfg.train.max_steps:
        if rank == int(fail_rank) and step == int(fail_step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        value = torch.tensor([float((rank + 1) * (step + 1))])
        dist.all_reduce(value)
        total += value.item()
        step += 1
        with progress.open("a") as f:
            f.write(f"{step} {total} job={os.environ.get('SLURM_JOB_ID', '-')} "
                    f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        time.sleep(STEP_SECONDS)
        stop = torch.tensor([float(_stop_requested)])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and step < cfg.train.max_steps:
            _save(ckpt, step, total)
            stopped = True
            break
    else:
        _save(ckpt, step, total)
    dist.destroy_process_group()
    return Summary(rank, world, step, total, resumed_from, stopped)
