"""One run per run directory: `RUN_DIR/run.lock`, held by the job's rank 0 from start-up to exit.

Two jobs on one run directory would delete and rename each other's checkpoint directories and write every step of
`metrics.jsonl` twice. The lock is a file created atomically (written under a unique name, then hard-linked into
place, which fails if it exists), so it works on the shared filesystems SLURM jobs use, where `flock` often does not.
It names its holder (pid, host, SLURM job, start time); the holder touches it every `HEARTBEAT_S` seconds.

A lock left by a job that died without releasing it (SIGKILL, a node failure) is stale, and taken over with a
message, when its holder is provably gone: a pid that no longer runs on this host, the same SLURM job id (the job
was requeued), or, for a holder on another host, no heartbeat for `STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megavictor.errors import UserError, notice

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class RunDirBusy(UserError):
    """Another job holds the run directory."""


class RunDirUnwritable(UserError):
    """The run directory (or its checkpoints folder) cannot be written, or has no room for a checkpoint."""


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(holder: dict[str, Any], age_s: float) -> str | None:
    """Why the lock of `holder` (last touched `age_s` ago) belongs to a job that is gone; None if it may run."""
    me = _holder()
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
        return "the same SLURM job, requeued"
    if holder.get("host") == me["host"]:
        return None if _pid_running(int(holder.get("pid", -1))) else "that process no longer runs"
    return f"no heartbeat for {age_s:.0f} s" if age_s > STALE_AFTER_S else None


@dataclass
class RunLock:
    """The held lock; `release` (idempotent) removes it if it is still ours."""

    path: Path
    holder: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if _read(self.path) == self.holder:
            self.path.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Put a complete lock file in place atomically; False if one exists."""
    tmp = path.with_name(f"{LOCK}.{holder['host']}.{holder['pid']}")
    try:
        tmp.write_text(json.dumps(holder))
    except OSError as exc:  # a read-only or full filesystem: no stray half-written lock left behind
        tmp.unlink(missing_ok=True)
        raise RunDirUnwritable(f"train.run_dir={path.parent} is not writable ({exc.strerror or exc}); free space "
                               "or choose another train.run_dir") from None
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(run_dir: str | Path) -> RunLock:
    """Hold `run_dir`'s lock, taking over a stale one with a message; `RunDirBusy` (one line naming the holder) if
    a live job holds it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirUnwritable(f"train.run_dir={run_dir} cannot be created ({exc.strerror or exc}); choose a "
                               "writable folder") from None
    path, me = run_dir / LOCK, _holder()
    for _ in range(3):  # a takeover races at most with other takers; a live holder always wins
        if _create(path, me):
            return RunLock(path, me)
        holder = _read(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile
        if holder is None:  # unreadable: not written by this module (lock files appear complete, by link)
            raise RunDirBusy(f"{path} exists but cannot be read; if no job uses {run_dir}, remove it")
        reason = stale_reason(holder, age)
        if reason is None:
            raise RunDirBusy(f"train.run_dir={run_dir} is in use by {_describe(holder)} ({path}); wait for that "
                             "run to end, stop it, or choose another train.run_dir")
        notice(f"{path}: taking over the stale lock of {_describe(holder)} ({reason})")
        if _read(path) == holder:  # still the stale one (not a lock another taker just put in place)
            path.unlink(missing_ok=True)
    raise RunDirBusy(f"{path}: could not take the lock (other jobs keep taking it); check who uses {run_dir}")
