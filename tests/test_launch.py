"""`megavictor launch` on one node of the real test SLURM cluster (tests/slurm_cluster.py): sbatch rendering, a 2-task
(tp=2) demo training job to COMPLETED in sacct with the losses of the same run under torchrun, preemption by USR2
(checkpoint at a step boundary, requeue, resume, the uninterrupted losses), and, with the fast payload
tests/slurm_payload.py (the trainer's contract, with a real gloo all_reduce): scancel (no resurrection), a failing
rank, and `--cluster local`. Preemption by `scontrol requeue` (SIGTERM, save within KillWait, SLURM requeues) is
tests/test_multinode.py's pp=2 job across two nodes.

Needs root to start SLURM; if it cannot start, the fixture errors (it never skips).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
import yaml

from launch.cli import main
from tests.runs import STAGE2, assert_close, losses, run, train_cmd, train_overrides, wait_for_metrics
from tests.slurm_cluster import PARTITION, Paths, sacct_state
from tests.slurm_payload import expected_total

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster: its jobs run one after another

STEPS = 40  # x 0.25 s per step: long enough to interrupt mid-run
PAYLOAD = ["--entry", "tests.slurm_payload:run", "--tasks-per-node", "2", "--time", "5", "--signal-delay", "15"]
TRAIN_STEPS = 20  # demo training, tp=2: ~0.25 s per step after a first one of a few seconds
TRAINING = ["--config", STAGE2, "--cluster", "slurm", "--nodes", "1", "--tasks-per-node", "2", "--partition",
            PARTITION]


def launch(capsys: pytest.CaptureFixture[str], run_dir: Path, *extra: str, steps: int = STEPS) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, job id, stderr)."""
    rc = main([*PAYLOAD, *extra, f"train.run_dir={run_dir}", f"train.max_steps={steps}"])
    out, err = capsys.readouterr()
    match = re.search(r"^job (\S+)$", out, re.M)
    assert match and f"run dir {run_dir}" in out, out + err
    return rc, match.group(1), err


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 60) -> None:
    progress = run_dir / "progress" / "rank0.txt"
    deadline = time.monotonic() + timeout
    while not (progress.is_file() and len(progress.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"the job made no progress in {timeout:.0f} s"
        time.sleep(0.2)


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


def training_overrides(data: Path, run_dir: Path) -> list[str]:
    """The overrides of tests/test_train.py's tiny demo run (tp=2, TRAIN_STEPS steps)."""
    return train_overrides(data, run_dir, "parallel.tp=2", f"train.max_steps={TRAIN_STEPS}")


@pytest.fixture(scope="module")
def trained(slurm_cluster: Paths, digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo training job (2 tasks, tp=2) run to completion through `launch.cli.main(... --wait)`."""
    run_dir = tmp_path_factory.mktemp("trained")
    rc = main([*TRAINING, "--wait", *training_overrides(digits_data, run_dir)])
    job_id = next(p.name.split("_")[0] for p in (run_dir / "submitit").glob("*_submission.sh"))
    return {"rc": rc, "job_id": job_id, "run_dir": run_dir}


@pytest.mark.timeout(900)  # with the fixture's job and, first in a session, the data set: ~300 s on a loaded machine
def test_slurm_training_matches_torchrun(trained: dict[str, Any], digits_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, job_id = trained["run_dir"], trained["job_id"]
    assert trained["rc"] == 0
    assert sacct_state(job_id) == "COMPLETED"
    results = submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=(0, 1)).results()
    assert [(r.final_step, r.stopped_by_signal) for r in results] == [(TRAIN_STEPS, False)] * 2
    for rank in (0, 1):
        assert (run_dir / "submitit" / f"{job_id}_{rank}_log.out").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["run_dir"] == str(run_dir)
    # --dry-run shows exactly what was submitted
    assert main([*TRAINING, "--dry-run", *training_overrides(digits_data, run_dir)]) == 0
    assert capsys.readouterr().out.strip() == (run_dir / "submitit" / f"{job_id}_submission.sh").read_text().strip()

    torchrun = tmp_path / "torchrun"
    summary = run(train_cmd(2, digits_data, torchrun, "parallel.tp=2", f"train.max_steps={TRAIN_STEPS}"))
    reference = losses(torchrun)
    assert len(reference) == TRAIN_STEPS and reference[-1] < reference[0]
    assert_close(losses(run_dir), reference, rel=1e-6)
    assert results[0].final_loss == pytest.approx(summary["final_loss"], rel=1e-6)


@pytest.mark.timeout(900)  # ~270 s measured on a loaded machine
def test_usr2_checkpoints_requeues_and_resumes(trained: dict[str, Any], digits_data: Path,
                                               capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The time-limit warning / preemption signal: the job saves at a step boundary, requeues itself, resumes
    and trains on to the same per-step and final losses as the uninterrupted job."""
    rc = main([*TRAINING, *training_overrides(digits_data, tmp_path)])
    job_id = re.search(r"^job (\S+)$", capsys.readouterr().out, re.M).group(1)
    assert rc == 0
    wait_for_metrics(tmp_path, 2)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    results = submitit.SlurmJob(folder=tmp_path / "submitit", job_id=job_id, tasks=(0, 1)).results()
    assert [(r.final_step, r.stopped_by_signal) for r in results] == [(TRAIN_STEPS, False)] * 2
    assert sacct_state(job_id) == "COMPLETED"
    assert "requeueing job" in (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()
    # The checkpoint of the interrupted run (mid-run, at a step boundary), then the final one.
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 2 and saved[1] == f"step_{TRAIN_STEPS:06d}", saved
    assert 2 <= int(saved[0].removeprefix("step_")) < TRAIN_STEPS, saved
    uninterrupted = losses(trained["run_dir"])
    assert_close(losses(tmp_path), uninterrupted, rel=1e-6)
    assert results[0].final_loss == pytest.approx(uninterrupted[-1], rel=1e-6)


@pytest.mark.timeout(300)
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


@pytest.mark.timeout(300)
def test_failing_rank_ends_the_job_with_its_traceback(slurm_cluster: Paths, capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGAVICTOR_TEST_FAIL", "1:3")  # sbatch exports the environment to the job
    rc, job_id, err = launch(capsys, tmp_path, "--partition", PARTITION, "--wait")
    assert rc == 1
    assert "rank 1 failed first" in err and "injected failure on rank 1 at step 3" in err, err
    assert "injected failure on rank 1" in (tmp_path / "submitit" / f"{job_id}_1_log.err").read_text()
    assert sacct_state(job_id) == "FAILED"


@pytest.mark.timeout(300)
def test_local_cluster(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, job_id, _ = launch(capsys, tmp_path, "--cluster", "local", "--wait", steps=8)
    assert rc == 0
    results = submitit.LocalJob(folder=tmp_path / "submitit", job_id=job_id, tasks=(0, 1)).results()
    assert [r.total for r in results] == [expected_total(2, 8)] * 2
