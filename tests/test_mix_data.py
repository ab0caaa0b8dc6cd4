"""`megavictor prep mix`: the LLaVA-mix-shaped set really has its shape in the written shards (text-only, one and
several images, aspect ratios 1:3 .. 3:1, multi-turn, varied answers), is indexed, is read by the training data
path with the demo config, and trains."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.cli import main as prep_main
from data_prep.llava_mix import MAX_SIDE, MIN_SIDE, SOURCE_KIND, VOCAB_LIMIT
from megavictor.config import load_config
from megavictor.data.index import IMAGE_RUN, INDEX_NAME, load_index
from megavictor.data.manifest import load_manifest
from megavictor.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from megavictor.distributed import ParallelDims
from tests.conftest import TEXT_HEAVY_MIX
from tests.runs import STAGE2, losses, run

SPLITS = {"train": 400, "val": 64, "test": 64}
DIMS = ParallelDims(world=1, rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)


def shard_samples(root: Path, split: str) -> list[tuple[dict, list[Image.Image]]]:
    """(json record, decoded images in marker order) of every sample of the split, read from the tar shards."""
    out = []
    for shard in load_manifest(root).split_shards(split):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(root / shard.name) as tar:
            for member in tar:
                key, suffix = member.name.split(".", 1)
                members.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        assert len(members) == shard.samples
        for sample in members.values():
            record = json.loads(sample["json"])
            images = []
            for name in record["images"]:
                image = Image.open(io.BytesIO(sample[name]))
                image.load()
                images.append(image)
            out.append((record, images))
    return out


def mix_config(root: Path, *overrides: str):
    return load_config(STAGE2, [f"data.path={root}", "data.train_split=train", "data.val_split=val",
                                "data.test_split=test", "train.init_from=null", *overrides])


def test_mix_is_a_complete_indexed_data_set(mix_data: Path) -> None:
    manifest = load_manifest(mix_data)
    assert manifest.source["kind"] == SOURCE_KIND and manifest.tokenizer == "tokenizer"
    assert not manifest.skipped
    counts = {split: sum(s.samples for s in manifest.split_shards(split)) for split in SPLITS}
    assert counts == SPLITS
    assert sorted(p.name for p in mix_data.glob("*.tar")) == sorted(s.name for s in manifest.shards)
    assert not list(mix_data.glob(".staging-*"))
    # The LLaVA JSON the shards came from stays beside them (what `prep llava` read).
    for split, size in SPLITS.items():
        assert len(json.loads((mix_data / "llava" / f"{split}.json").read_text())) == size
        assert manifest.source["splits"][split]["kind"] == "llava"
    assert (mix_data / INDEX_NAME).is_file()
    tokenizer = load_tokenizer(mix_data / "tokenizer")
    assert len(tokenizer) <= VOCAB_LIMIT < 120
    index = load_index(mix_data, None, "v1", "")
    for split, size in SPLITS.items():
        assert len(index.split(split)) == size


def test_mix_has_the_llava_mix_shape(mix_data: Path) -> None:
    samples = shard_samples(mix_data, "train")
    per_sample = [len(images) for _, images in samples]
    assert per_sample.count(0) == 80 and per_sample.count(1) == 220
    assert sum(n >= 2 for n in per_sample) == 100 and set(per_sample) == {0, 1, 2, 3}
    aspects = [image.width / image.height for _, images in samples for image in images]
    sides = [side for _, images in samples for image in images for side in image.size]
    assert all(1 / 3 - 1e-9 <= a <= 3 + 1e-9 for a in aspects)
    assert math.isclose(min(aspects), 1 / 3) and math.isclose(max(aspects), 3.0)
    assert sum(a < 0.5 for a in aspects) > 10 and sum(a > 2 for a in aspects) > 10  # spread, not just the two
    assert MIN_SIDE <= min(sides) and max(sides) <= MAX_SIDE
    formats = {image.format for _, images in samples for image in images}
    assert formats == {"PNG", "JPEG"}
    turns = [len(record["conversations"]) // 2 for record, _ in samples]
    assert set(turns) == {1, 2, 3, 4} and sum(t > 1 for t in turns) > len(turns) / 2
    answers = [len(t["value"].split()) for record, _ in samples for t in record["conversations"][1::2]]
    humans = [len(t["value"].replace(IMAGE_TOKEN, " ").split()) for record, _ in samples
              for t in record["conversations"][::2]]
    assert min(answers) == 1 and 40 <= max(answers) <= 60 and len(set(answers)) > 30
    assert 3 <= min(humans) and max(humans) <= 40 and len(set(humans)) > 20
    first = inside = 0
    for (record, images), n in zip(samples, per_sample):
        human = [t["value"] for t in record["conversations"][::2]]
        assert sum(h.count(IMAGE_TOKEN) for h in human) == n == human[0].count(IMAGE_TOKEN)
        if n:
            first += human[0].startswith(IMAGE_TOKEN)
            inside += not human[0].startswith(IMAGE_TOKEN)
    assert first > 50 and inside > 50


def test_mix_eval_splits_have_both_aspect_extremes(mix_data: Path) -> None:
    for split in ("val", "test"):
        samples = shard_samples(mix_data, split)
        aspects = [image.width / image.height for _, images in samples for image in images]
        assert math.isclose(min(aspects), 1 / 3) and math.isclose(max(aspects), 3.0)
        assert {len(images) for _, images in samples} == {0, 1, 2, 3}


def test_text_heavy_mix(text_heavy_mix_data: Path) -> None:
    samples = shard_samples(text_heavy_mix_data, "train")
    per_sample = [len(images) for _, images in samples]
    assert len(samples) == 120 and per_sample.count(0) == 72 and per_sample.count(1) > 0
    assert sum(n >= 2 for n in per_sample) > 0
    index = load_index(text_heavy_mix_data, None, "v1", "").split("train")
    no_image = [i for i in range(len(index)) if IMAGE_RUN not in index.shape("v1", i)]
    assert len(no_image) == 72


def test_mix_prep_is_deterministic_and_refuses_foreign_folders(text_heavy_mix_data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    again = tmp_path / "again"
    assert prep_main([*TEXT_HEAVY_MIX, "--out", str(again)]) == 0
    assert [(s.name, s.sha256) for s in load_manifest(again).shards] == \
        [(s.name, s.sha256) for s in load_manifest(text_heavy_mix_data).shards]
    assert prep_main([*TEXT_HEAVY_MIX, "--seed", "2", "--out", str(again)]) == 0  # rewrites its own folder
    assert load_manifest(again).shards[0].sha256 != load_manifest(text_heavy_mix_data).shards[0].sha256
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert prep_main(["mix", "--out", str(foreign)]) == 2
    assert "megavictor prep mix: error:" in capsys.readouterr().err and (foreign / "notes.txt").is_file()
    assert prep_main(["mix", "--out", str(tmp_path / "bad"), "--text-only-fraction", "1.5"]) == 2


def test_mix_is_read_by_the_training_data_path(mix_data: Path) -> None:
    from megavictor.data.training_data import TrainData, validation_batches

    cfg = mix_config(mix_data)
    data = TrainData(cfg, DIMS)
    assert not any(data.counts.values())  # nothing truncated or skipped with the demo's seq_length 512
    samples = images = 0
    for _ in range(3):
        step = data.next_step()
        samples, images = samples + step.samples, images + step.images
        assert step.loss_tokens > 0
        for batch in step.mine:
            assert batch.images.shape[1:] == (3, cfg.vision.image_size, cfg.vision.image_size)
    assert samples > 3 * cfg.train.global_batch_size and images > 0  # rows pack several samples
    batches, count = validation_batches(cfg, DIMS)
    assert count == cfg.train.eval_batches and len(batches) == count


def test_bench_loader_reads_the_mix(mix_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megavictor.benchmarks.loader import main as bench_main

    assert bench_main(["--data", str(mix_data), "--split", "train", "--steps", "2", "--global-batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["images_decoded_per_rank_per_step"] > 0
    assert 0 < result["packing_efficiency"] <= 1


def test_demo_stage2_trains_on_the_mix(mix_data: Path, tmp_path: Path) -> None:
    import sys

    run_dir = tmp_path / "run"
    summary = run([sys.executable, "-m", "megavictor", "train", "--config", STAGE2, f"data.path={mix_data}",
                   "data.train_split=train", "data.val_split=train", "train.init_from=null",
                   "data.micro_batch_size=1", "train.max_steps=3", "train.global_batch_size=2",
                   "train.eval_batches=1", "log.wandb=false", f"train.run_dir={run_dir}"])
    assert summary["final_step"] == 3 and math.isfinite(summary["val_loss"])
    assert len(losses(run_dir)) == 3 and all(math.isfinite(x) for x in losses(run_dir))
