"""`megavictor launch` on a real single-node SLURM cluster (tests/slurm_cluster.py): sbatch rendering, a 2-task
gloo job to COMPLETED in sacct, preemption by USR2 and by `scontrol requeue` (checkpoint at a step boundary,
requeue, resume, same result), scancel (no resurrection), a failing rank, and `--cluster local`.

The payload is tests/slurm_payload.py (the trainer's contract, with a real gloo all_reduce) until megavictor.trainer
lands. Needs root to start SLURM; if it cannot start, the fixture errors (it never skips).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import submitit
import yaml

from launch.cli import main
from tests.slurm_cluster import PARTITION, Paths, session
from tests.slurm_payload import Summary, expected_total

STEPS = 40  # x 0.25 s per step: long enough to interrupt mid-run
PAYLOAD = ["--entry", "tests.slurm_payload:run", "--tasks-per-node", "2", "--time", "5", "--signal-delay", "15"]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Paths]:
    """The running test cluster, or one started for this session and stopped at its end. Errors, never skips,
    when SLURM cannot start: CI must not pass without these tests."""
    with session() as paths:
        yield paths


def launch(capsys: pytest.CaptureFixture[str], run_dir: Path, *extra: str, steps: int = STEPS) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, job id, stderr)."""
    rc = main([*PAYLOAD, *extra, f"train.run_dir={run_dir}", f"train.max_steps={steps}"])
    out, err = capsys.readouterr()
    match = re.search(r"^job (\S+)$", out, re.M)
    assert match and f"run dir {run_dir}" in out, out + err
    return rc, match.group(1), err


def sacct_state(job_id: str, timeout: float = 60) -> str:
    """The job's accounting state once SLURM is done with it: squeue no longer lists it (its processes are gone)
    and slurmdbd has recorded the end (that lags squeue by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=True).stdout
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                               capture_output=True, text=True, check=True).stdout.strip()
        if not queued.strip() and state.split(" ")[0] not in ("", "PENDING", "RUNNING", "REQUEUED"):
            return state
        assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout:.0f} s: {state}"
        time.sleep(0.5)


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 60) -> None:
    progress = run_dir / "progress" / "rank0.txt"
    deadline = time.monotonic() + timeout
    while not (progress.is_file() and len(progress.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"the job made no progress in {timeout:.0f} s"
        time.sleep(0.2)


def slurm_results(run_dir: Path, job_id: str) -> list[Summary]:
    return submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=(0, 1)).results()


def attempts(run_dir: Path) -> list[str]:
    """The restart count of every step rank 0 ran, in order."""
    return [line.split("restart=")[1] for line in (run_dir / "progress" / "rank0.txt").read_text().splitlines()]


def test_dry_run_renders_the_sbatch_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rc = main(["--config", "configs/llava15_7b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
               "--time", "240", "--dry-run", f"train.run_dir={run_dir}"])
    script = capsys.readouterr().out
    assert rc == 0
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=240", "#SBATCH --signal=USR2@90", "#SBATCH --partition=gpu", "#SBATCH --requeue"]:
        assert line in script.splitlines(), f"{line} missing from:\n{script}"
    assert "--kill-on-bad-exit=1" in script and f"submitit.core._submit {run_dir}/submitit" in script
    assert not run_dir.exists()  # nothing submitted


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: Paths, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-task job run to completion through `launch.cli.main(... --wait)`."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    rc = main([*PAYLOAD, "--partition", PARTITION, "--wait", f"train.run_dir={run_dir}", f"train.max_steps={STEPS}"])
    job_id = next(p.name.split("_")[0] for p in (run_dir / "submitit").glob("*_submission.sh"))
    return {"rc": rc, "job_id": job_id, "run_dir": run_dir, "results": slurm_results(run_dir, job_id)}


@pytest.mark.timeout(120)
def test_slurm_job_completes(uninterrupted: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, job_id = uninterrupted["run_dir"], uninterrupted["job_id"]
    assert uninterrupted["rc"] == 0
    assert sacct_state(job_id) == "COMPLETED"
    assert [r.total for r in uninterrupted["results"]] == [expected_total(2, STEPS)] * 2
    assert [r.world for r in uninterrupted["results"]] == [2, 2]
    for rank in (0, 1):
        assert (run_dir / "submitit" / f"{job_id}_{rank}_log.out").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["run_dir"] == str(run_dir)
    # --dry-run shows exactly what was submitted
    assert main([*PAYLOAD, "--partition", PARTITION, "--dry-run", f"train.run_dir={run_dir}"]) == 0
    assert capsys.readouterr().out.strip() == (run_dir / "submitit" / f"{job_id}_submission.sh").read_text().strip()


@pytest.mark.timeout(150)
def test_usr2_checkpoints_requeues_and_resumes(uninterrupted: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    """The time-limit warning / preemption signal: the job saves at a step boundary and requeues itself."""
    rc, job_id, _ = launch(capsys, tmp_path, "--partition", PARTITION)
    assert rc == 0
    wait_for_steps(tmp_path, 5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    results = slurm_results(tmp_path, job_id)
    assert [r.total for r in results] == [r.total for r in uninterrupted["results"]]
    assert all(5 <= r.resumed_from < STEPS for r in results), results
    assert sacct_state(job_id) == "COMPLETED"
    restarts = attempts(tmp_path)
    assert restarts[0] == "0" and restarts[-1] == "1" and len(restarts) == STEPS  # no step lost or repeated
    assert "requeueing job" in (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()


@pytest.mark.timeout(150)
def test_scontrol_requeue_checkpoints_and_resumes(uninterrupted: dict[str, Any],
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """SLURM-side requeue (as preemption with PreemptMode=REQUEUE): SIGTERM, save within KillWait, SLURM requeues."""
    rc, job_id, _ = launch(capsys, tmp_path, "--partition", PARTITION)
    assert rc == 0
    wait_for_steps(tmp_path, 5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    results = slurm_results(tmp_path, job_id)
    assert [r.total for r in results] == [r.total for r in uninterrupted["results"]]
    assert all(5 <= r.resumed_from < STEPS for r in results), results
    assert len(attempts(tmp_path)) == STEPS
    assert "requeueing job" not in (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()  # SLURM did it


@pytest.mark.timeout(90)
def test_scancel_saves_and_stays_cancelled(slurm_cluster: Paths, capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    rc, job_id, _ = launch(capsys, tmp_path, "--partition", PARTITION)
    assert rc == 0
    wait_for_steps(tmp_path, 5)
    subprocess.run(["scancel", job_id], check=True)
    assert sacct_state(job_id).startswith("CANCELLED")
    saved = (tmp_path / "checkpoints" / "latest").read_text()  # saved within KillWait, at a step boundary
    assert 5 <= int(saved.removeprefix("step_").removesuffix(".json")) < STEPS
    # not resurrected: a requeue would have kept it in squeue (PENDING), and the job logs it
    assert "requeueing job" not in (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()


@pytest.mark.timeout(90)
def test_failing_rank_ends_the_job_with_its_traceback(slurm_cluster: Paths, capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGAVICTOR_TEST_FAIL", "1:3")  # sbatch exports the environment to the job
    rc, job_id, err = launch(capsys, tmp_path, "--partition", PARTITION, "--wait")
    assert rc == 1
    assert "rank 1 failed first" in err and "injected failure on rank 1 at step 3" in err, err
    assert "injected failure on rank 1" in (tmp_path / "submitit" / f"{job_id}_1_log.err").read_text()
    assert sacct_state(job_id) == "FAILED"


@pytest.mark.timeout(90)
def test_local_cluster(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, job_id, _ = launch(capsys, tmp_path, "--cluster", "local", "--wait", steps=8)
    assert rc == 0
    results = submitit.LocalJob(folder=tmp_path / "submitit", job_id=job_id, tasks=(0, 1)).results()
    assert [r.total for r in results] == [expected_total(2, 8)] * 2
