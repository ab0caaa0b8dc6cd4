"""`megavictor train` end to end on real shards: layout-invariant losses, exact resume, resharding, atomic saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megavictor.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
STAGE2 = str(ROOT / "configs" / "demo_stage2.yaml")


def train_cmd(world: int, data: Path, run_dir: Path, *overrides: str) -> list[str]:
    launcher = [sys.executable, "-m", "megavictor"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={free_port()}",
        "-m", "megavictor"]
    return [*launcher, "train", "--config", STAGE2, f"data.path={data}", f"train.run_dir={run_dir}",
            "train.init_from=null", "data.seq_length=128", "data.micro_batch_size=2", "train.global_batch_size=4",
            "train.max_steps=10", "train.warmup_steps=2", "train.eval_batches=2", "log.wandb=false", *overrides]


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


@pytest.fixture(scope="module")
def reference_run(digits_data: Path, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("tp1pp1")
    return run_dir, run(train_cmd(1, digits_data, run_dir))


@pytest.mark.parametrize("world,layout", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.pp=2"]),
    (2, []),  # tp1 pp1 dp2, same global batch of 4 rows
], ids=["tp2", "pp2", "dp2"])
def test_losses_do_not_depend_on_the_layout(reference_run, digits_data: Path, tmp_path: Path, world: int,
                                            layout: list[str]) -> None:
    ref_dir, _ = reference_run
    run(train_cmd(world, digits_data, tmp_path, *layout))
    reference = losses(ref_dir)
    assert len(reference) == 10 and reference[-1] < reference[0]
    assert_close(losses(tmp_path), reference, rel=1e-4)


def sigterm_after(cmd: list[str], run_dir: Path, steps: int, total: int, ranks: bool = False) -> dict:
    """Run `cmd` until `run_dir/metrics.jsonl` has `steps` steps, then SIGTERM it (with `ranks`, each of its child
    processes instead, as SLURM signals every task); check it saved a checkpoint at a step boundary before `total`
    and return its summary."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.time() < deadline, f"training ended before step {steps}"
        time.sleep(0.05)
    for target in psutil.Process(proc.pid).children() if ranks else [proc]:
        target.send_signal(signal.SIGTERM)
    summary = json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["stopped_by_signal"] and steps <= summary["final_step"] < total
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{summary['final_step']:06d}"
    return summary


def test_sigterm_then_restart_resumes_exactly(reference_run, digits_data: Path, tmp_path: Path) -> None:
    ref_dir, _ = reference_run
    cmd = train_cmd(1, digits_data, tmp_path, "train.max_steps=12")
    uninterrupted = tmp_path / "full"
    run(train_cmd(1, digits_data, uninterrupted, "train.max_steps=12"))

    sigterm_after(cmd, tmp_path, 6, 12)

    resumed = run(cmd)
    assert resumed["final_step"] == 12
    assert_close(losses(tmp_path), losses(uninterrupted), rel=1e-6)


def test_tp2_checkpoint_loads_into_tp1(digits_data: Path, tmp_path: Path) -> None:
    saved = run(train_cmd(2, digits_data, tmp_path / "tp2", "parallel.tp=2", "train.max_steps=3"))
    loaded = run(train_cmd(1, digits_data, tmp_path / "tp1", f"train.init_from={tmp_path / 'tp2'}",
                           "train.max_steps=0"))
    assert saved["val_loss"] is not None
    assert loaded["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)


def test_half_written_checkpoint_is_never_latest(reference_run, tmp_path: Path) -> None:
    import shutil

    from megavictor.checkpoint import latest_checkpoint

    ref_dir, summary = reference_run
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints", ckpts)
    complete = latest_checkpoint(ckpts)
    assert complete is not None and complete.name == "step_000010"
    # A save that died mid-write leaves only a .tmp directory; `latest` still names the complete one.
    partial = ckpts / "step_000011.tmp"
    shutil.copytree(complete, partial)
    (partial / "metadata.json").unlink()
    assert latest_checkpoint(ckpts) == complete
    # A pointer to an incomplete directory is refused with a clear message, never loaded.
    (ckpts / "latest").write_text("step_000011.tmp\n")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        latest_checkpoint(ckpts)


def test_demo_runs_both_stages_and_prints_accuracy_json(digits_data: Path, tmp_path: Path) -> None:
    """The README's main command, shortened: stage 1, stage 2 from stage 1, eval JSON on the last line."""
    proc = subprocess.run([sys.executable, "-m", "megavictor", "demo", "--run-dir", str(tmp_path), "--data",
                           str(digits_data), "train.max_steps=3", "data.seq_length=128"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["split"] == "vqa_test" and result["n"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert 0.0 < result["chance"] < 1.0
    assert (tmp_path / "stage1" / "checkpoints" / "latest").is_file()
    assert (tmp_path / "stage2" / "checkpoints" / "latest").is_file()


def test_wandb_writes_a_real_offline_run(digits_data: Path, tmp_path: Path) -> None:
    """log.wandb defaults to on, in offline mode: a run directory that `wandb sync` would upload."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(train_cmd(1, digits_data, tmp_path, "train.max_steps=2", "log.wandb=true"),
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "no wandb event file in the offline run"


def test_fresh_run_starts_from_the_pretrained_vision_tower(digits_data: Path, tmp_path: Path) -> None:
    """`vision.init_from` under tp=2: the stage-1 checkpoint's ViT equals the pretrained file, tensor by tensor
    (loaded into the sharded tower, and kept frozen by stage 1)."""
    from safetensors.torch import load_file

    from megavictor.checkpoint import load_full_state

    stage1 = str(ROOT / "configs" / "demo_stage1.yaml")
    encoder = digits_data / "vision_encoder.safetensors"
    cmd = train_cmd(2, digits_data, tmp_path, "parallel.tp=2", "train.max_steps=2", f"vision.init_from={encoder}")
    cmd[cmd.index(STAGE2)] = stage1
    run(cmd)
    _, full = load_full_state(tmp_path)
    pretrained = load_file(str(encoder))
    assert pretrained and all(name in full for name in pretrained)
    for name, tensor in pretrained.items():
        assert torch.equal(full[name], tensor), name
