"""`megavictor launch`: submit a training run to SLURM (or run it locally) through submitit.

    megavictor launch --config configs/X.yaml --nodes 4 --gpus-per-node 8 --partition P [--time MIN]
                      [--account A] [--qos Q] [--cluster slurm|local] [--network-interface IFACE] [--dry-run]
                      [--wait] [section.key=value ...]

Prints the job id and the run directory, then returns; `--wait` blocks and exits with the job's status (1 on
failure, after printing what ended it: the failing rank's traceback, or srun's word for a rank killed). Every task
sets up its own rendezvous across nodes (launch/rendezvous.py). The run directory (`train.run_dir`, made absolute) holds
config.yaml (the resolved config), submitit/ (sbatch script, per-rank logs <job>_<rank>_log.{out,err}) and whatever
the trainer writes (checkpoints/). `--dry-run` prints the sbatch script and submits nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import _make_sbatch_string

from launch.job import DEFAULT_ENTRY, TrainJob
from megavictor.config import load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavictor launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML recipe (defaults when omitted)")
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="local: the same job through submitit's local executor (one node)")
    p.add_argument("--nodes", type=int, default=1)
    per_node = p.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="GPU nodes: one task per GPU (nccl)")
    per_node.add_argument("--tasks-per-node", type=int, help="CPU nodes: this many tasks per node (gloo)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per task (data loader workers)")
    p.add_argument("--partition", help="SLURM partition (required with --cluster slurm)")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--network-interface", metavar="IFACE",
                   help="socket interface of every rank for gloo and NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); "
                        "default: those of this shell's environment, else gloo uses each node's route to rank 0")
    p.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit at which USR2 asks the run to checkpoint and requeue")
    p.add_argument("--entry", default=DEFAULT_ENTRY, help="module:function that trains (and has request_stop())")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    p.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    return p


def slurm_parameters(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """sbatch parameters in submitit's SlurmExecutor names; both --dry-run and submission render from these."""
    tasks = args.gpus_per_node or args.tasks_per_node
    params: dict[str, Any] = {
        "job_name": run_dir.name,
        "partition": args.partition,
        "time": args.time,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "account": args.account,
        "qos": args.qos,
        "signal_delay_s": args.signal_delay,
        # A rank that dies must end the job: otherwise the others wait in a collective until its timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
        # Requeue (by the job itself, or by SLURM on preemption / node failure) even where JobRequeue=0.
        "additional_parameters": {"requeue": True},
    }
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(args: argparse.Namespace, run_dir: Path) -> str:
    """The script submitit would submit (rendered by submitit itself; needs no srun on this machine)."""
    folder = run_dir / "submitit"
    # What SlurmExecutor._submitit_command_str runs on every task:
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(args, run_dir))


def make_executor(args: argparse.Namespace, run_dir: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=run_dir / "submitit", cluster=args.cluster)
    if args.cluster == "slurm":
        executor.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(args, run_dir).items()})
    else:
        executor.update_parameters(timeout_min=args.time, nodes=1,
                                   tasks_per_node=args.gpus_per_node or args.tasks_per_node,
                                   gpus_per_node=args.gpus_per_node or 0)
        # AutoExecutor rejects local_signal_delay_s (submitit 1.5.4 lists only "setup"); LocalExecutor takes it.
        executor._executor.update_parameters(signal_delay_s=args.signal_delay)
    return executor


SRUN_ERROR = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,-]+): [^\r\n]+")  # maybe after a progress bar
EXCEPTION_LINE = re.compile(r"^\w[\w.]*(?:Error|Exception)\b.*$", re.M)  # a traceback's last line
# How often `--wait` asks the scheduler (sacct) whether the job ended. submitit's own polling backs off to once a
# minute, so a job whose task was killed (no result file) was reported up to a minute late.
STATE_POLL_S = 10.0


def srun_errors(job: submitit.Job) -> list[tuple[int, str]]:
    """(rank, srun's line) for every task that ended badly, in the order srun saw them end (it writes them to the
    batch script's stderr, rank 0's log); empty off SLURM."""
    path = job.task(0).paths.stderr
    text = path.read_text(errors="replace") if path.is_file() else ""
    found = []
    for match in SRUN_ERROR.finditer(text):
        for part in match.group("tasks").split(","):
            low, _, high = part.partition("-")
            found += [(rank, match.group(0)) for rank in range(int(low), int(high or low) + 1)]
    return found


def wait_until_ended(job: submitit.Job) -> None:
    """Every task wrote its result, or the scheduler says the job ended (asked every STATE_POLL_S): a job whose task
    was killed writes no result for that task."""
    checked = time.monotonic()
    while not job.done():
        time.sleep(1)
        if isinstance(job, submitit.SlurmJob) and time.monotonic() - checked >= STATE_POLL_S:
            job.watcher.update()
            checked = time.monotonic()


def wait_for(job: submitit.Job) -> int:
    """Block until every task ends; print the summary of the rank holding the loss, or what ended the job: the rank that failed first, with
    its traceback, or srun's word for how it ended when it left none (killed, or its node lost).

    When one rank fails, its peers fail too (gloo: "connection closed by peer") or are killed (srun
    --kill-on-bad-exit), so the first to fail is the cause: srun reports the tasks in the order they ended; off
    SLURM, the earliest result file holding a traceback."""
    wait_until_ended(job)
    errors = {rank: job.task(rank).exception() for rank in range(job.num_tasks)}
    failed = {rank: e for rank, e in errors.items() if e is not None}
    if not failed:
        results = [job.task(rank).result() for rank in range(job.num_tasks)]
        # The summary of the rank holding the loss (the last pipeline stage; rank 0's has final_loss None when pp>1)
        summary = next((r for r in results if getattr(r, "final_loss", None) is not None), results[0])
        print(json.dumps(dataclasses.asdict(summary), default=str))
        return 0
    raised = [r for r, e in failed.items() if isinstance(e, FailedJobError)]
    reported = [(rank, line) for rank, line in srun_errors(job) if rank in failed]
    if reported:
        first = reported[0][0]
    else:
        first = min(raised, key=lambda r: job.task(r).paths.result_pickle.stat().st_mtime) if raised else min(failed)
    if first in raised or not reported:
        detail = str(failed[first])
    else:
        logs = job.task(first).paths
        detail = (f"{reported[0][1]}\nit left no traceback (killed by a signal, out of memory, or its node was lost);"
                  f" its logs: {logs.stdout}, {logs.stderr}")
        if raised and (raises := EXCEPTION_LINE.findall(str(failed[raised[0]]))):
            detail += f"\nthen rank {raised[0]}: {raises[-1]}"
    print(f"job {job.job_id}: rank {first} failed first (failed ranks: {sorted(failed)}):\n{detail}",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cluster == "slurm" and not args.partition:
        print("megavictor launch: --partition is required with --cluster slurm", file=sys.stderr)
        return 2
    if args.cluster == "local" and args.nodes != 1:
        print("megavictor launch: --cluster local runs on one node (--nodes 1)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.train.run_dir).resolve()
    cfg.train.run_dir = str(run_dir)
    if args.dry_run:
        print(sbatch_script(args, run_dir))
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    executor = make_executor(args, run_dir)
    job = executor.submit(TrainJob(cfg, entry=args.entry, gpus=bool(args.gpus_per_node),
                                      network_interface=args.network_interface))
    print(f"job {job.job_id}")
    print(f"run dir {run_dir}", flush=True)
    return wait_for(job) if args.wait else 0
