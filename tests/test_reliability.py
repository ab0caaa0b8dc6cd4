"""Fault injection on real runs (CPU, gloo, kill by pid): no partial or damaged checkpoint is ever trusted, restarts
fall back to the newest good one, non-finite steps are skipped and stop the run, one run per run directory, full
disks and torn metrics lines, no process outliving a killed trainer.

One tiny reference run (2 layers, 4 steps, a checkpoint every step) is shared by the whole module; every damaged
run directory is a copy of it, so each test costs at most one or two short training processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megavictor.checkpoint.commit import (LATEST, MANIFEST, PRE_ANOMALY, checkpoint_problem, commit_atomically,
                                          resume_candidates, write_manifest)
from megavictor.checkpoint.initial_weights import WeightOrigin, choose_initial_weights
from megavictor.config import load_config
from tests.runs import ROOT, STAGE2, losses, run, train_cmd

STEPS = 4
TINY = ["model.num_layers=2", "victor.drop_layer=1", f"train.max_steps={STEPS}", "train.save_interval=1",
        "train.keep_last=0", "train.eval_batches=1"]


def tiny_cmd(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return train_cmd(1, data, run_dir, *TINY, *overrides)


def tiny_config(data: Path, run_dir: Path, *overrides: str):
    return load_config(STAGE2, [f"data.path={data}", f"train.run_dir={run_dir}", "train.init_from=null",
                                "log.wandb=false", *TINY, *overrides])


def train(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("megavictor")]


@pytest.fixture(scope="module")
def reference(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: checkpoints step_000001..4, metrics.jsonl with the losses of steps 1..4."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(tiny_cmd(digits_data, run_dir))
    return run_dir


def copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest / "checkpoints"


def step(checkpoints: Path, n: int) -> Path:
    return checkpoints / f"step_{n:06d}"


# --------------------------------------------------------------------------- manifest, re-save


def test_every_checkpoint_carries_a_manifest_of_all_its_files(reference: Path) -> None:
    for path in resume_candidates(reference / "checkpoints"):
        listed = set(json.loads((path / MANIFEST).read_text())["files"])
        on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
        assert listed == on_disk and "common.pt" in listed and "metadata.json" in listed
        assert checkpoint_problem(path) is None


def _commit(root: Path, n: int, payload: str) -> None:
    def write(tmp: Path) -> None:
        (tmp / "payload").write_text(payload)
        (tmp / "metadata.json").write_text("{}")

    commit_atomically(root, n, write)


@pytest.mark.parametrize("crash_at", range(6))
def test_a_resave_killed_at_any_point_leaves_a_verified_checkpoint_to_resume(tmp_path: Path, monkeypatch,
                                                                              crash_at: int) -> None:
    """Re-save step 2 while `latest` names it, dying at each rename / removal of the commit in turn: the first
    candidate a restart would take that verifies always holds a complete step 2 (old or new copy)."""
    from megavictor.checkpoint import commit

    _commit(tmp_path, 1, "one")
    _commit(tmp_path, 2, "old")
    calls = []

    def dying(real):
        def op(*args, **kwargs):
            calls.append(args)
            if len(calls) > crash_at:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)
        return op

    monkeypatch.setattr(commit.os, "replace", dying(os.replace))
    monkeypatch.setattr(commit.shutil, "rmtree", dying(shutil.rmtree))
    with pytest.raises(KeyboardInterrupt):
        _commit(tmp_path, 2, "new")
    monkeypatch.undo()
    good = next(p for p in resume_candidates(tmp_path) if checkpoint_problem(p) is None)
    assert commit.step_of(good) == 2 and (good / "payload").read_text() in ("old", "new")


def test_kill_during_a_resave_then_restart_reproduces_the_losses(reference: Path, digits_data: Path,
                                                                 tmp_path: Path) -> None:
    """`latest` back at step 2 while steps 3 and 4 exist: the run saves them again. SIGKILL it while a save is in
    flight (its .tmp or .old directory on disk), restart: the uninterrupted run's losses."""
    checkpoints = copy_run(reference, tmp_path / "run")
    (checkpoints / LATEST).write_text("step_000002\n")
    cmd = tiny_cmd(digits_data, tmp_path / "run")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(p.suffix in (".tmp", ".old") and p.name.startswith("step_") for p in checkpoints.iterdir()):
        assert proc.poll() is None, "the run ended before a save could be interrupted"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run(cmd)
    assert losses(tmp_path / "run") == losses(reference)
    assert not [p for p in checkpoints.iterdir() if p.suffix in (".tmp", ".old")]


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated shard": ("__0_0.distcp", _truncate),
    "deleted shard": ("__0_1.distcp", Path.unlink),
    "truncated common.pt": ("common.pt", _truncate),
    "truncated .metadata": (".metadata", _truncate),
    "bytes flipped in a shard": ("__0_0.distcp", _flip),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_latest_is_named_and_the_previous_checkpoint_chosen(reference: Path, digits_data: Path,
                                                                      tmp_path: Path, capfd, corruption: str) -> None:
    checkpoints = copy_run(reference, tmp_path / "run")
    name, damage = CORRUPTIONS[corruption]
    damage(step(checkpoints, STEPS) / name)
    weights = choose_initial_weights(tiny_config(digits_data, tmp_path / "run"))
    assert weights.origin == WeightOrigin.RESUME and weights.checkpoint == step(checkpoints, STEPS - 1)
    assert weights.rejected == (step(checkpoints, STEPS),)
    assert str(step(checkpoints, STEPS) / name) in capfd.readouterr().err


def test_restart_falls_back_past_damaged_checkpoints_and_reproduces_the_losses(reference: Path, digits_data: Path,
                                                                                tmp_path: Path) -> None:
    """Step 4: bytes flipped in a shard (fails verification). Step 3: common.pt truncated and the manifest written
    again to match (verifies, fails to load). The restart names both files, resumes from step 2 with the
    reference's losses, sets the damaged ones aside and protects step 2 from rotation. The torn last line of
    metrics.jsonl (a kill during an append) is dropped with a message."""
    checkpoints = copy_run(reference, tmp_path / "run")
    _flip(step(checkpoints, 4) / "__0_0.distcp")
    _truncate(step(checkpoints, 3) / "common.pt")
    write_manifest(step(checkpoints, 3))
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 3.')
    proc = train(tiny_cmd(digits_data, tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = "\n".join(notices(proc.stderr))
    assert "step_000004/__0_0.distcp" in said and "step_000003/common.pt" in said and "torn" in said
    assert "resuming from " + str(step(checkpoints, 2)) in said
    assert losses(tmp_path / "run") == losses(reference)
    assert (checkpoints / PRE_ANOMALY).read_text().strip() == "step_000002"
    assert step(checkpoints, 3).with_suffix(".bad").is_dir() and step(checkpoints, 4).with_suffix(".bad").is_dir()


def test_with_no_checkpoint_that_verifies_the_restart_stops_in_one_line(reference: Path, digits_data: Path,
                                                                        tmp_path: Path) -> None:
    checkpoints = copy_run(reference, tmp_path / "run")
    for n in range(1, STEPS + 1):
        _truncate(step(checkpoints, n) / "common.pt")
    proc = train(tiny_cmd(digits_data, tmp_path / "run"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "step_000004/common.pt" in lines[0], proc.stderr


# --------------------------------------------------------------------------- non-finite steps


def test_a_diverging_lr_stops_in_one_line_and_keeps_the_pre_divergence_checkpoint(digits_data: Path,
                                                                                   tmp_path: Path) -> None:
    """lr=1e10: step 1 is finite (and saved), from step 2 on the loss is NaN. Three skipped updates in a row stop
    the run with one line; no NaN step is saved; `pre_anomaly` protects step 1 from rotation (keep_last=1), and
    it loads with finite weights. (On this 2-layer model lr=1e6 does not give NaN: it stalls at a uniform
    prediction with zero gradients, finite, so nothing is skipped; lr=1e10 overflows.)"""
    from megavictor.checkpoint import load_full_state

    proc = train(tiny_cmd(digits_data, tmp_path, "train.lr=1e10", "train.max_steps=8", "train.keep_last=1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    final = [line for line in notices(proc.stderr) if line.startswith("megavictor train: error")]
    assert len(final) == 1 and "3 consecutive steps with a non-finite loss" in final[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000001"]
    assert (checkpoints / PRE_ANOMALY).read_text().strip() == "step_000001"
    _, weights = load_full_state(step(checkpoints, 1))
    assert all(bool(t.isfinite().all()) for t in weights.values())


# --------------------------------------------------------------------------- one run per run directory, lifetime


def test_a_busy_run_dir_is_refused_and_a_killed_trainer_leaves_no_process(digits_data: Path, tmp_path: Path,
                                                                         capfd) -> None:
    """A run that has saved (megatron's checkpoint writer and its queue manager are up): a second run on its
    directory exits 2 within seconds naming the holder; SIGKILL the first: after 10 s none of its processes is
    left; the lock it left behind is taken over, with a message, by the next run."""
    import psutil

    from megavictor.training.run_lock import acquire

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(tiny_cmd(digits_data, run_dir, "train.max_steps=100000"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (run_dir / "checkpoints" / LATEST).exists():
            assert proc.poll() is None, "the first run ended early"
            time.sleep(0.1)
        start = time.monotonic()
        second = train(tiny_cmd(digits_data, run_dir), timeout=120)
        elapsed = time.monotonic() - start
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and f"pid {proc.pid}" in lines[0], second.stderr
        assert elapsed < 30, f"refused after {elapsed:.1f} s"
        helpers = psutil.Process(proc.pid).children(recursive=True)
        assert helpers, "no checkpoint-writer helper process found to check"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    _, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    acquire(run_dir).release()
    assert "taking over the stale lock of pid" in capfd.readouterr().err


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mount at tmp_path/disk, sized by the test (needs root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size_bytes: int) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_save_on_a_full_disk_fails_in_one_line_and_keeps_latest(reference: Path, digits_data: Path,
                                                                   small_disk) -> None:
    """The reference run on a tmpfs with room for the start-up check's lower bound of a checkpoint, but not for a
    whole one: resuming it to step 5, the save fails with one line naming the path and the space; no partial
    directory; `latest` still step 4 and verified. (A disk with less room stops before step 1: test_faults.py.)"""
    from megavictor.checkpoint.manager import checkpoint_bytes

    page = 4096  # tmpfs holds whole pages: every file and directory costs at least one
    used = sum(-(-p.stat().st_size // page) * page if p.is_file() else page for p in reference.rglob("*"))
    one = sum(p.stat().st_size for p in step(reference / "checkpoints", STEPS).iterdir())
    bound = checkpoint_bytes(tiny_config(digits_data, reference))
    assert bound + 2**17 < one, "the lower bound leaves no room to fail the save after the check passes"
    disk = small_disk(used + bound + 2**17)
    checkpoints = copy_run(reference, disk / "run")
    proc = train(tiny_cmd(digits_data, disk / "run", f"train.max_steps={STEPS + 1}"))
    assert proc.returncode == 2
    errors = [line for line in notices(proc.stderr) if "error" in line]
    assert len(errors) == 1 and "step_000005.tmp" in errors[0] and "MiB left on that filesystem" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (checkpoints / LATEST).read_text().strip() == "step_000004"
    assert checkpoint_problem(step(checkpoints, STEPS)) is None
    assert not list(checkpoints.glob("*.tmp"))


# --------------------------------------------------------------------------- the DeepSpeed engine


@pytest.fixture(scope="module")
def deepspeed_reference(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("deepspeed")
    run(tiny_cmd(digits_data, run_dir, "train.engine=deepspeed", "train.max_steps=2"))
    return run_dir


def test_deepspeed_damaged_latest_falls_back_and_reproduces_the_loss(deepspeed_reference: Path, digits_data: Path,
                                                                     tmp_path: Path) -> None:
    """A DeepSpeed checkpoint's manifest covers its ZeRO shards: bytes flipped in step 2's optimizer shard are
    named, the restart resumes from step 1 and reproduces step 2's loss."""
    checkpoints = copy_run(deepspeed_reference, tmp_path / "run")
    shard = max(step(checkpoints, 2).rglob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    _flip(shard)
    proc = train(tiny_cmd(digits_data, tmp_path / "run", "train.engine=deepspeed", "train.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(shard) in "\n".join(notices(proc.stderr))
    assert losses(tmp_path / "run") == losses(deepspeed_reference)


def test_deepspeed_skips_non_finite_steps_and_stops(digits_data: Path, tmp_path: Path) -> None:
    proc = train(tiny_cmd(digits_data, tmp_path, "train.engine=deepspeed", "train.lr=1e10", "train.max_steps=8",
                          "train.max_nonfinite_steps=2"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 consecutive steps with a non-finite loss" in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]
    assert (tmp_path / "checkpoints" / PRE_ANOMALY).read_text().strip() == "step_000001"
