"""`megavictor train` end to end on real shards: layout-invariant losses, exact resume, resharding, atomic saves."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavictor.data.manifest import load_manifest
from tests.runs import ROOT, STAGE2, assert_close, losses, run, sigterm_after, train_cmd


@pytest.mark.parametrize("world,layout,rel", [
    (2, ["parallel.tp=2"], 1e-6),
    (2, ["parallel.pp=2"], 1e-4),  # the stage boundary changes the order of float sums
    # Sequence parallelism through the real DDP + finalize_model_grads path, with full recompute.
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=full"], 1e-4),
    # tp1 pp1 dp2, same global batch of 4 rows, each rank decoding only its 2; the gradient all-reduce overlapped
    # with backward, in several buckets (the model has ~1M parameters). dp2 without overlap: the resume tests below.
    (2, ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=100000"], 1e-6),
], ids=["tp2", "pp2", "tp2-sp-recompute", "dp2-overlap"])
def test_losses_do_not_depend_on_the_layout(reference_run, digits_data: Path, tmp_path: Path, world: int,
                                            layout: list[str], rel: float) -> None:
    ref_dir, ref_summary = reference_run
    summary = run(train_cmd(world, digits_data, tmp_path, *layout))
    reference = losses(ref_dir)
    assert len(reference) == 10 and reference[-1] < reference[0]
    assert_close(losses(tmp_path), reference, rel=rel)
    # Validation: its 2 micro-batches split over the data-parallel ranks, or whole on one.
    assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], rel=rel)


def test_dp1_run_resumed_under_dp2_matches_the_uninterrupted_run(reference_run, digits_data: Path,
                                                                 tmp_path: Path) -> None:
    """The dp1 reference run rolled back to its step-5 checkpoint and resumed on 2 data-parallel ranks: the data
    position (plan rows consumed, in the checkpoint's common state) is layout-free, so steps 6-10 are the same."""
    ref_dir, _ = reference_run
    shutil.copytree(ref_dir, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000010")
    (tmp_path / "checkpoints" / "latest").write_text("step_000005\n")
    assert run(train_cmd(2, digits_data, tmp_path))["final_step"] == 10
    assert_close(losses(tmp_path), losses(ref_dir), rel=1e-6)


def test_sigterm_then_restart_resumes_exactly(reference_run, digits_data: Path, tmp_path: Path) -> None:
    ref_dir, _ = reference_run
    cmd = train_cmd(1, digits_data, tmp_path)

    sigterm_after(cmd, tmp_path, 6, 10)

    resumed = run(cmd)
    assert resumed["final_step"] == 10
    assert_close(losses(tmp_path), losses(ref_dir), rel=1e-6)


def test_half_written_checkpoint_is_never_latest(reference_run, tmp_path: Path) -> None:

    from megavictor.checkpoint import CheckpointError, latest_checkpoint

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
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        latest_checkpoint(ckpts)


def test_demo_runs_both_stages_and_prints_accuracy_json(digits_data: Path, tmp_path: Path) -> None:
    """The README's main command, shortened: stage 1, stage 2 from stage 1, eval JSON on the last line."""
    proc = subprocess.run([sys.executable, "-m", "megavictor", "demo", "--run-dir", str(tmp_path), "--data",
                           str(digits_data), "train.max_steps=3", "data.seq_length=128"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    test_records = sum(s.samples for s in load_manifest(digits_data).split_shards("vqa_test"))
    assert result["split"] == "vqa_test" and result["n"] == test_records
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


def test_resume_into_another_layout_continues_the_same_run(reference_run, digits_data: Path, tmp_path: Path) -> None:
    """The tp1 pp1 reference run rolled back to its step-5 checkpoint and resumed under tp=2 and under pp=2: model,
    optimizer state, lr schedule and data position carry over, so steps 6-10 are the uninterrupted run's (to the
    rounding a layout change brings). The tp=2 run's last checkpoint then loads back into tp=1 (`train.init_from`)
    with the same validation loss."""
    ref_dir, _ = reference_run
    summaries = {}
    for layout in ("parallel.tp=2", "parallel.pp=2"):
        run_dir = tmp_path / layout
        shutil.copytree(ref_dir, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step_000010")
        (run_dir / "checkpoints" / "latest").write_text("step_000005\n")
        summaries[layout] = run(train_cmd(2, digits_data, run_dir, layout))
        assert summaries[layout]["final_step"] == 10
        assert_close(losses(run_dir), losses(ref_dir), rel=1e-4)
    loaded = run(train_cmd(1, digits_data, tmp_path / "tp1", f"train.init_from={tmp_path / 'parallel.tp=2'}",
                           "train.max_steps=0"))
    assert loaded["val_loss"] == pytest.approx(summaries["parallel.tp=2"]["val_loss"], rel=1e-5)


def test_validation_loss_with_more_ranks_than_batches(reference_run, digits_data: Path, tmp_path: Path) -> None:
    """One val micro-batch on 2 data-parallel ranks: the idle rank contributes nothing (no double counting), so the
    val loss is the single-process one. (2 batches on 2 ranks: test_losses_do_not_depend_on_the_layout.)"""
    ref_dir, _ = reference_run
    common = (f"train.init_from={ref_dir}", "train.max_steps=0", "train.eval_batches=1")
    one = run(train_cmd(1, digits_data, tmp_path / "dp1", *common))
    two = run(train_cmd(2, digits_data, tmp_path / "dp2", *common))
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)


def test_bf16_run_starts_from_the_init_from_weights(reference_run, digits_data: Path, tmp_path: Path) -> None:
    """bf16 keeps fp32 main parameters in the optimizer; they must be cloned from the `train.init_from` weights,
    not from the random init (one step at a vanishing lr leaves the weights where they started)."""
    from megavictor.checkpoint import load_full_state

    ref_dir, _ = reference_run
    run(train_cmd(1, digits_data, tmp_path, f"train.init_from={ref_dir}", "train.precision=bf16",
                  "train.max_steps=1", "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0",
                  "train.eval_batches=1"))
    _, start = load_full_state(ref_dir)
    _, after = load_full_state(tmp_path)
    for name, tensor in start.items():
        assert after[name].dtype == torch.bfloat16, name
        assert torch.equal(after[name], tensor.to(torch.bfloat16)), name


def test_lr_schedule_warms_up_then_decays_to_min_lr(reference_run) -> None:
    """The recorded lr of each step: linear warmup from above zero to train.lr over train.warmup_steps, then cosine
    down to train.min_lr at train.max_steps (the demo recipe: lr 1e-3, min 1e-4, warmup 2, 10 steps)."""
    ref_dir, _ = reference_run
    lrs = [json.loads(line)["lr"] for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[5] == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint: step 6 of the 8 decay steps after warmup
    assert lrs[-1] == pytest.approx(1e-4)


def test_bf16_tracks_fp32_from_the_same_init_from(reference_run, digits_data: Path, tmp_path: Path) -> None:
    """bf16 the way Megatron does it (whole model in bf16, ViT conv and norms included; fp32 main parameters) trains
    like fp32 from the same `train.init_from` weights; a reset to random weights would jump to the from-scratch loss
    (the reference run's first step)."""
    ref_dir, _ = reference_run
    curves = {}
    for precision in ("fp32", "bf16"):
        run(train_cmd(1, digits_data, tmp_path / precision, f"train.init_from={ref_dir}",
                      f"train.precision={precision}", "train.max_steps=3", "train.eval_batches=1"))
        curves[precision] = losses(tmp_path / precision)
    assert_close(curves["bf16"], curves["fp32"], rel=0.02)
    assert max(curves["bf16"]) < losses(ref_dir)[0] - 1.0


def test_distributed_optimizer_trains_and_reshards_dp2_to_dp1(reference_run, digits_data: Path,
                                                              tmp_path: Path) -> None:
    """megatron's distributed optimizer (state and main params sharded over dp) on CPU, with the parameter
    all-gather overlapped with the next forward (`parallel.overlap_param_gather`, its GPU default): it trains as the
    regular optimizer does, a validation and a save between steps see the updated parameters, and its checkpoint
    (megatron's fully reshardable format) resumes under dp=1 exactly."""
    ref_dir, ref_summary = reference_run
    dp2 = tmp_path / "dp2"
    summary = run(train_cmd(2, digits_data, dp2, "train.distributed_optimizer=true",
                            "parallel.overlap_param_gather=true", "train.save_interval=5", "train.eval_interval=5"))
    assert_close(losses(dp2), losses(ref_dir), rel=1e-4)
    assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], rel=1e-4)
    dp1 = tmp_path / "dp1"
    shutil.copytree(dp2, dp1)
    shutil.rmtree(dp1 / "checkpoints" / "step_000010")
    (dp1 / "checkpoints" / "latest").write_text("step_000005\n")
    assert run(train_cmd(1, digits_data, dp1, "train.distributed_optimizer=true"))["final_step"] == 10
    assert_close(losses(dp1), losses(dp2), rel=1e-6)  # measured: identical


ANYRES_MIX = ["data.train_split=train", "data.val_split=val", "data.test_split=test",
              "vision.image_grid_pinpoints=[[32,64],[64,32],[64,64],[96,32],[32,96]]", "data.image_aspect_ratio=anyres",
              "data.seq_length=1024", "train.max_steps=8"]


def test_anyres_tp2_pp2_matches_one_process_interrupted_and_resumed(mix_data: Path, tmp_path: Path) -> None:
    """LLaVA-NeXT anyres images (five tile grids, text-only and multi-image conversations): the single-process run,
    stopped by SIGTERM after step 4 and restarted, and an uninterrupted tp2 x pp2 run give the same 8 losses and
    validation loss. Victor's drop happens inside stage 0 (k=3 of 6 layers split [3, 3]), so stage 1 receives
    variable-length short rows. (The interruption is in the one-process run: one 4-rank launch fewer.)"""
    cmd = train_cmd(1, mix_data, tmp_path / "tp1", *ANYRES_MIX)
    sigterm_after(cmd, tmp_path / "tp1", 4, 8)
    reference = run(cmd)
    parallel = run(train_cmd(4, mix_data, tmp_path / "tp2pp2", *ANYRES_MIX, "parallel.tp=2", "parallel.pp=2"))
    assert parallel["final_step"] == reference["final_step"] == 8
    expected = losses(tmp_path / "tp1")
    assert expected[-1] < expected[0]
    assert_close(losses(tmp_path / "tp2pp2"), expected, rel=1e-5)
    assert parallel["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
