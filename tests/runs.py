"""Helpers shared by the test modules that run `megavictor` verbs and training jobs in fresh processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


ROOT = Path(__file__).resolve().parents[1]
STAGE2 = str(ROOT / "configs" / "demo_stage2.yaml")


def train_cmd(world: int, data: Path, run_dir: Path, *overrides: str) -> list[str]:
    # --standalone: torchrun binds a port the OS picks when it starts, so a command run twice (a restart) never
    # finds its port still held, and no other process can take it between choosing and binding.
    launcher = [sys.executable, "-m", "megavictor"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m", "megavictor"]
    return [*launcher, "train", "--config", STAGE2, f"data.path={data}", f"train.run_dir={run_dir}",
            "train.init_from=null", "data.seq_length=128", "data.micro_batch_size=2", "train.global_batch_size=4",
            "train.max_steps=10", "train.warmup_steps=2", "train.eval_batches=2", "log.wandb=false", *overrides]


def train_overrides(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """train_cmd's config overrides alone (for `megavictor launch`)."""
    cmd = train_cmd(1, data, run_dir, *overrides)
    return cmd[cmd.index("--config") + 2:]


def wait_for_metrics(run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Until run_dir/metrics.jsonl has `steps` steps (a job elsewhere is training)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"the job logged no step {steps} in {timeout:.0f} s"
        time.sleep(0.05)


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= r.keys()
    return [r["loss"] for r in records]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} vs {y}"


def sigterm_after(cmd: list[str], run_dir: Path, steps: int, total: int, ranks: bool = False,
                  sig: signal.Signals = signal.SIGTERM) -> dict:
    """Run `cmd` until `run_dir/metrics.jsonl` has `steps` steps, then SIGTERM it (or `sig`; with `ranks`, each of
    its child processes instead, as SLURM signals every task); check it saved a checkpoint at a step boundary before
    `total` and return its summary."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.time() < deadline, f"training ended before step {steps}"
        time.sleep(0.05)
    for target in psutil.Process(proc.pid).children() if ranks else [proc]:
        target.send_signal(sig)
    summary = json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["stopped_by_signal"] and steps <= summary["final_step"] < total
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{summary['final_step']:06d}"
    return summary


def megavictor(*args: str | Path) -> str:
    """A `megavictor` verb in a fresh process; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "megavictor", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
