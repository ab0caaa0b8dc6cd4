"""`megavictor launch` across nodes on the real two-node test cluster (tests/slurm_cluster.py: each node a network
namespace with its own address, tests/slurm_network.py), one task per node, the demo's tiny run of tests/runs.py:

- pp=2, requeued mid-run by `scontrol requeue`: resumes from `latest` and ends with the single-process losses;
- dp=2, one node's task killed: the whole job fails at once with a message naming that rank and node, `latest` is
  left loadable, and resubmitting resumes from it to the single-process losses;
- a rendezvous port already taken on rank 0's node: the job fails at once, naming it (the fast payload).

"Resumed from latest" is checked without trusting the job's word: the metrics lines up to the checkpoint it resumed
from stay byte for byte those of the first attempt (a run that started over rewrites them with new step times).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.cli import main
from tests.runs import ROOT, STAGE2, assert_close, losses, train_overrides, wait_for_metrics
from tests.slurm_cluster import PARTITION, Paths, sacct_state
from tests.slurm_network import on_node

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster: its jobs run one after another

NODES = ["mvnode1", "mvnode2"]
STEPS = 10  # the reference run's
ACROSS_NODES = ["--config", STAGE2, "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--partition", PARTITION, "--time",
                "10"]
# Measured: the job FAILED 3 s after the kill (srun --kill-on-bad-exit); `launch --wait` (sacct every 10 s) returned
# 24 s after it with the suite loading both cores. Without srun's kill, peers blocked in a collective wait up to
# gloo's 30 minutes.
KILLED_JOB_ENDS_WITHIN_S = 120


def submit(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main([*ACROSS_NODES, *args]) == 0
    return re.search(r"^job (\S+)$", capsys.readouterr().out, re.M).group(1)


def latest_step(run_dir: Path, timeout: float = 120) -> int:
    """The step of the checkpoint `latest` names, once there is one."""
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not latest.is_file():
        assert time.monotonic() < deadline, f"no checkpoint in {run_dir} after {timeout:.0f} s"
        time.sleep(0.1)
    return int(latest.read_text().strip().removeprefix("step_"))


def metrics_lines(run_dir: Path, up_to: int) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()[:up_to]


def rank_headers(run_dir: Path, job_id: str) -> list[str]:
    """The launcher's header lines of every rank's log (one per rank and attempt)."""
    return sorted(line for rank in (0, 1)
                  for line in (run_dir / "submitit" / f"{job_id}_{rank}_log.out").read_text().splitlines()
                  if line.startswith("megavictor launch: "))


def assert_ranks_on_both_nodes(run_dir: Path, job_id: str) -> None:
    step = subprocess.run(["sacct", "-n", "-P", "-j", f"{job_id}.0", "-o", "NodeList,NTasks"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert step[-1] == "mvnode[1-2]|2", step
    headers = rank_headers(run_dir, job_id)
    for rank, node in enumerate(NODES):
        assert any(f"rank {rank}/2 (local 0) on host {node} " in h and "rendezvous mvnode1:" in h for h in headers), \
            headers


def task_process(job_id: str, rank: int) -> psutil.Process:
    """The process running `rank` of the job (submitit's task entry point, under slurmstepd)."""
    for proc in psutil.process_iter(["cmdline", "environ"]):
        env = proc.info["environ"] or {}
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank)
                and "submitit.core._submit" in (proc.info["cmdline"] or [])):
            return proc
    raise AssertionError(f"no process of job {job_id} rank {rank}")


@pytest.mark.timeout(900)
def test_pp2_across_nodes_requeued_mid_run_matches_one_process(
        slurm_cluster: Paths, reference_run: tuple[Path, dict], digits_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    job_id = submit(capsys, *train_overrides(digits_data, tmp_path, "parallel.pp=2", "train.save_interval=2"))
    wait_for_metrics(tmp_path, 3, timeout=300)  # checkpoint 2 was saved before step 3
    before = metrics_lines(tmp_path, latest_step(tmp_path))
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM: save at a step boundary, SLURM requeues

    assert sacct_state(job_id, timeout=400) == "COMPLETED"
    assert len(before) >= 2 and metrics_lines(tmp_path, len(before)) == before  # resumed, not started over
    assert_close(losses(tmp_path), losses(reference_run[0]), rel=1e-4)  # pp: the order of float sums changes
    assert_ranks_on_both_nodes(tmp_path, job_id)
    restarts = [re.search(r"restart (\d+):", h).group(1) for h in rank_headers(tmp_path, job_id)]
    assert sorted(restarts) == ["0", "0", "1", "1"], restarts


@pytest.mark.timeout(900)
def test_dp2_across_nodes_killed_task_fails_the_job_and_latest_resumes(
        slurm_cluster: Paths, reference_run: tuple[Path, dict], digits_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    overrides = train_overrides(digits_data, tmp_path, "train.save_interval=2")
    # The user's view: `launch --wait` in its own process, which must end (not hang) when a node's task dies.
    cli = subprocess.Popen([sys.executable, "-m", "launch", *ACROSS_NODES, "--wait", *overrides], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(tmp_path, 3, timeout=300)
    latest_step(tmp_path)  # killed after a checkpoint
    job_id = next(p.name.split("_")[0] for p in (tmp_path / "submitit").glob("*_submission.sh"))
    victim = task_process(job_id, 1)
    assert os.stat(f"/proc/{victim.pid}/ns/net").st_ino == os.stat("/run/netns/mvnode2").st_ino  # the other node
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = cli.communicate(timeout=KILLED_JOB_ENDS_WITHIN_S)
    with capsys.disabled():
        print(f"\nkilled task -> `launch --wait` exited after {time.monotonic() - killed:.1f} s")
    assert cli.returncode == 1
    assert f"job {job_id}: rank 1 failed first" in err and "srun: error: mvnode2: task 1: Killed" in err, err
    assert sacct_state(job_id).startswith("FAILED")
    assert_ranks_on_both_nodes(tmp_path, job_id)

    saved = latest_step(tmp_path)
    before = metrics_lines(tmp_path, saved)
    assert 2 <= saved < STEPS and len(before) == saved
    # `latest` loads: the same job resubmitted resumes from it (here with the interface named explicitly).
    assert main([*ACROSS_NODES, "--network-interface", "mvnet", "--wait", *overrides]) == 0
    assert metrics_lines(tmp_path, saved) == before
    assert_close(losses(tmp_path), losses(reference_run[0]), rel=1e-6)  # dp: as tests/test_train.py
    resumed = re.search(r"^job (\S+)$", capsys.readouterr().out, re.M).group(1)
    assert all("GLOO_SOCKET_IFNAME=mvnet (--network-interface)" in h for h in rank_headers(tmp_path, resumed))


@pytest.mark.timeout(300)
def test_taken_rendezvous_port_fails_at_once_naming_it(slurm_cluster: Paths, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process listening on the job's port on rank 0's node (mvnode1): rank 0 says so, the job ends."""
    holder = subprocess.Popen(on_node("mvnode1", [sys.executable, "-c", HOLD_PORT]), stdout=subprocess.PIPE, text=True)
    try:
        port = holder.stdout.readline().strip()
        monkeypatch.setenv("MASTER_PORT", port)  # the submitting shell's, passed through
        rc = main([*ACROSS_NODES, "--entry", "tests.slurm_payload:run", "--wait", f"train.run_dir={tmp_path}",
                   "train.max_steps=2"])
    finally:
        holder.kill()
    err = capsys.readouterr().err
    assert rc == 1
    assert f"rendezvous port {port} on mvnode1 is taken" in err, err


HOLD_PORT = """
import socket, time
s = socket.socket(); s.bind(("", 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(600)
"""
