"""Per-rank training data on real digits shards: the length index agrees with decoding, the global plan is
layout-free (dp ranks split one global batch, each decoding only its rows), exact resume under another dp,
workers, pipeline stages that read less, load-time truncation counted once, the chat template and images. The same
under LLaVA-NeXT's anyres on the LLaVA-mix-shaped shards (text-only, 1-3 images of aspect 1:3..3:1, 16-160 px: five
different tile grids at tile 32), where each image's slots come from its size in the index."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megavictor.config import load_config
from megavictor.data.collate import IMAGE_PLACEHOLDER
from megavictor.data.images import CLIP_MEAN, CLIP_STD, PAD_COLOR, load_image
from megavictor.data.index import IMAGE_RUN, INDEX_NAME, load_index, loss_tokens, slots, truncate
from megavictor.data.manifest import DataError, load_manifest
from megavictor.data.packing import MAX_WAIT_ROWS, Packer, PackItem
from megavictor.data.tokenizer import ChatTokenizer, load_tokenizer
from megavictor.data.training_data import RowDecoder, TrainData, validation_batches
from megavictor.distributed import ParallelDims
from megavictor.model.batch import IGNORE_INDEX, KIND_TEXT, KIND_VISUAL, VictorBatch
from megavictor.model.flops import batch_train_flops

STAGE2 = Path(__file__).resolve().parents[1] / "configs" / "demo_stage2.yaml"
# LLaVA-NeXT's grids (llava-v1.6's pinpoints scaled from tile 336 to the demo's 32): 1x2, 2x1, 2x2, 3x1 and 1x3 tiles.
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def config(data: Path, *overrides: str):
    """The demo's stage-2 shape (64 visual + 8 register slots per image) on 256-slot rows, 8 rows per step."""
    return load_config(STAGE2, [f"data.path={data}", "data.seq_length=256", "data.micro_batch_size=2",
                                "train.global_batch_size=8", "train.init_from=null", *overrides])


def anyres_config(data: Path, *overrides: str):
    """The demo's stage-2 model with anyres images on the mix: at most 336 visual + 8 register slots per image, on
    768-slot rows (three large images do not fit: samples are truncated and skipped), 8 rows per step."""
    return config(data, "data.train_split=train", "data.val_split=val", "data.test_split=test",
                  f"vision.image_grid_pinpoints={PINPOINTS}", "data.image_aspect_ratio=anyres",
                  "data.seq_length=768", *overrides)


def dims(dp: int = 1, dp_rank: int = 0, pp: int = 1, pp_rank: int = 0) -> ParallelDims:
    return ParallelDims(world=dp * pp, rank=0, tp=1, pp=pp, dp=dp, tp_rank=0, pp_rank=pp_rank, dp_rank=dp_rank)


def steps(data: TrainData, n: int) -> list:
    return [data.next_step() for _ in range(n)]


def assert_same_batches(a: list[VictorBatch], b: list[VictorBatch], names: tuple[str, ...] | None = None) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in names or [f.name for f in fields(VictorBatch)]:
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def records(root: Path, split: str) -> dict[str, dict]:
    out = {}
    for shard in load_manifest(root).split_shards(split):
        with tarfile.open(root / shard.name) as tar:
            out |= {m.name.split(".")[0]: json.load(tar.extractfile(m)) for m in tar if m.name.endswith("json")}
    return out


# ----------------------------------------------------------------------------------------------- index and plan


@pytest.mark.parametrize("registers", [8, 0], ids=["R8", "R0"])
def test_index_shapes_match_the_decoded_samples(digits_data: Path, registers: int) -> None:
    cfg = config(digits_data, f"victor.num_registers={registers}")
    split = load_index(digits_data, None, "v1", "").split("vqa_train")
    image_slots = 64 + registers
    decoder = RowDecoder(TrainData(cfg, dims()).data.settings, split)
    for limit in (10_000, 90):  # whole, and cut inside the text (multi-turn samples)
        decoder.settings = replace(decoder.settings, seq_length=limit)
        for i in range(0, 400, 7):
            code = truncate(split.shape("v1", i), limit, image_slots)
            batch = decoder.batch(((i,),))
            used = int(batch.cu_seqlens[1])
            assert used == slots(code, image_slots) <= limit
            assert batch.num_loss_tokens() == loss_tokens(code, registers)


def test_dp_ranks_split_one_global_plan_and_decode_only_their_rows(digits_data: Path) -> None:
    cfg = config(digits_data)
    whole = steps(TrainData(cfg, dims()), 3)
    halves = [steps(TrainData(cfg, dims(dp=2, dp_rank=r)), 3) for r in range(2)]
    for step, (a, b) in zip(whole, zip(*halves)):
        assert_same_batches(step.mine, a.mine + b.mine)
        assert step.loss_tokens == a.loss_tokens == b.loss_tokens == sum(m.num_loss_tokens() for m in step.mine)
        assert step.images == a.images + b.images == sum(m.images.shape[0] for m in step.mine)
        assert a.images == sum(m.images.shape[0] for m in a.mine) < step.images
        assert (step.samples, step.real_tokens, step.flops) == (a.samples, a.real_tokens, a.flops)
    assert len(whole[0].mine[0].cu_seqlens) > 3  # packed: several samples per row


def test_resume_under_another_data_parallel_size_continues_the_plan(digits_data: Path) -> None:
    cfg = config(digits_data)
    first = TrainData(cfg, dims())
    reference = steps(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, the same on every rank
    assert state["rows"] == 16
    uninterrupted = steps(TrainData(cfg, dims()), 4)
    resumed = []
    for r in range(2):
        data = TrainData(cfg, dims(dp=2, dp_rank=r))
        data.load_state_dict(state)
        resumed.append(steps(data, 2))
    for step, (a, b) in zip(uninterrupted[2:], zip(*resumed)):
        assert_same_batches(step.mine, a.mine + b.mine)
        assert step.loss_tokens == a.loss_tokens
    assert_same_batches(reference[0].mine, uninterrupted[0].mine)
    other = TrainData(config(digits_data, "data.seed=7"), dims())
    with pytest.raises(DataError, match="data order"):
        other.load_state_dict(state)


def test_workers_and_prefetch_give_the_same_batches(digits_data: Path) -> None:
    reference = steps(TrainData(config(digits_data), dims()), 3)
    workers = steps(TrainData(config(digits_data, "data.num_workers=2", "data.prefetch=3"), dims()), 3)
    for a, b in zip(reference, workers):
        assert_same_batches(a.mine, b.mine)


def test_later_pipeline_stages_read_less_but_see_the_same_structure(digits_data: Path) -> None:
    cfg = config(digits_data)
    first = steps(TrainData(cfg, dims(pp=3)), 1)[0].mine
    middle = steps(TrainData(cfg, dims(pp=3, pp_rank=1)), 1)[0]
    last = steps(TrainData(cfg, dims(pp=3, pp_rank=2)), 1)[0]
    structure = ("kinds", "position_ids", "cu_seqlens", "image_segments")
    assert_same_batches(first, middle.mine, structure)
    assert_same_batches(first, last.mine, (*structure, "tokens", "labels"))
    assert middle.images == last.images == 0
    assert all(m.images.shape[1:] == (3, 0, 0) for m in middle.mine + last.mine)


def test_long_samples_truncated_while_an_answer_survives_else_skipped_counted_once(
        digits_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 84 slots: the image (72) and a short question with its answer fit; later turns of multi-turn records do
    # not, and a record whose (longer) first question fills the row keeps no answer token.
    cfg = config(digits_data, "data.seq_length=84", "data.micro_batch_size=4")
    with caplog.at_level(logging.WARNING, logger="megavictor.data.training_data"):
        data = TrainData(cfg, dims())
    counts = data.counts
    assert counts["truncated"] > 100 and counts["skipped_too_long"] > 100 and "truncated" in caplog.text
    split = data.data.index
    for i in data.data.order.truncated[:50]:
        assert loss_tokens(truncate(split.shape("v1", i), 84, 72), 8) > 0
    for i in data.data.order.skipped["too_long"][:50]:
        assert loss_tokens(truncate(split.shape("v1", i), 84, 72), 8) == 0
    many = steps(data, 40)  # more than one epoch: the counts are per sample of the split, not per epoch
    assert data.counts == counts
    assert all(step.loss_tokens > 0 for step in many)
    for step in many[:5]:
        for batch in step.mine:
            segments = batch.segment_ids()
            for seg in segments.unique().tolist():  # every packed sample keeps at least one loss token
                inside = segments == seg
                if (batch.kinds[inside] != 3).any():
                    assert (batch.labels[inside] != IGNORE_INDEX).any()


def test_images_outside_the_configured_limits_are_skipped_at_load_by_kind(digits_data: Path) -> None:
    # The digits images are all 32x32: limits just past them skip every sample, each kind counted.
    with pytest.raises(DataError, match="'skipped_image_too_small': 4000"):
        TrainData(config(digits_data, "data.min_image_side=33"), dims())
    with pytest.raises(DataError, match="'skipped_image_too_large': 4000"):
        TrainData(config(digits_data, "data.max_image_pixels=1000"), dims())
    assert TrainData(config(digits_data, "data.min_image_side=32", "data.max_image_pixels=1024"), dims()).counts \
        == {"truncated": 0, "skipped_too_long": 0, "skipped_image_too_small": 0, "skipped_image_too_large": 0}


def test_batches_hold_the_chat_template_and_loss_on_answers_only(digits_data: Path) -> None:
    cfg = config(digits_data)
    batches, total = validation_batches(cfg, dims())
    tokenizer = load_tokenizer(digits_data / "tokenizer")
    batch = batches[0]
    seg = batch.segment_ids()[0]
    first = seg == seg[0]
    text = batch.tokens[0][first & (batch.kinds[0] == KIND_TEXT)].tolist()
    targets = batch.labels[0][first & (batch.labels[0] != IGNORE_INDEX)].tolist()
    record = records(digits_data, "vqa_val")["000000"]  # the val plan is unshuffled: the first sample first
    question, answer = (t["value"] for t in record["conversations"])
    words = question.removeprefix("<image>\n").replace("?", " ?").split()
    assert tokenizer.convert_ids_to_tokens(text) == ["<s>", "USER", ":", *words, "ASSISTANT", ":", answer, "</s>"]
    assert tokenizer.convert_ids_to_tokens(targets) == [answer, "</s>"]
    assert batch.position_ids[0][: int(first.sum())].tolist() == list(range(int(first.sum())))
    assert total == cfg.train.eval_batches


def test_the_vocab_is_checked_before_training(digits_data: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TrainData(config(digits_data, "model.vocab_size=64"), dims())


# ----------------------------------------------------------------------------------------------- parts


def test_packer_places_every_item_once_in_full_rows() -> None:
    rng = np.random.default_rng(0)
    packer = Packer(capacity=1024, buffer_size=64)
    sizes = rng.integers(20, 120, 3000).tolist()
    rows: list[list[PackItem]] = []
    ages = []
    for key, size in enumerate(sizes):
        packer.add(PackItem(key, size, None))
        while packer.full():
            rows.append(packer.pop_row())
            ages += [item.age for item in rows[-1]]
    while len(packer):
        rows.append(packer.pop_row())
    assert sorted(item.key for row in rows for item in row) == list(range(len(sizes)))
    assert all(sum(item.size for item in row) <= 1024 for row in rows)
    assert sum(sizes) / (len(rows) * 1024) >= 0.99
    assert max(ages) <= 2 * MAX_WAIT_ROWS  # small items do not drift to the end


def test_chat_template_targets_with_a_byte_level_bpe(tmp_path: Path) -> None:
    # GPT-2-style tokens carry the leading space ("Ġno"): they still count as answer tokens.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["USER: are they the same? ASSISTANT: no yes"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>").save_pretrained(str(tmp_path))
    chat = ChatTokenizer(load_tokenizer(tmp_path), "v1")
    conversation = [{"from": "human", "value": "<image>\nare they the same?"}, {"from": "gpt", "value": "no"},
                    {"from": "human", "value": "same?"}, {"from": "gpt", "value": "yes"}]
    sample = chat.sample(conversation, [torch.zeros(3, 32, 32)])
    assert chat.prefix == [] and sample.tokens.count(IMAGE_PLACEHOLDER) == 1
    targets = [t for t, train in zip(sample.tokens, sample.trainable) if train]
    assert chat.tokenizer.convert_ids_to_tokens(targets) == ["Ġno", "</s>", "Ġyes", "</s>"]
    plain = ChatTokenizer(chat.tokenizer, "plain").sample(conversation, [torch.zeros(3, 32, 32)])
    assert plain.tokens[0] == IMAGE_PLACEHOLDER
    assert chat.tokenizer.convert_ids_to_tokens([t for t, tr in zip(plain.tokens, plain.trainable) if tr]) == \
        ["no", "</s>"]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_resized_and_clip_normalised_crop_or_pad() -> None:
    white = png(Image.new("RGB", (64, 32), (255, 255, 255)))
    crop = load_image(white, 32, "crop")
    assert crop.shape == (3, 32, 32)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(crop.mean(dim=(1, 2)), expected, atol=1e-4)
    pad = load_image(white, 32)  # the default, LLaVA-1.5's: the whole image, padded with the mean colour
    mean_colour = (torch.tensor(PAD_COLOR) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pad[:, 0, 16], mean_colour, atol=1e-4)  # top band: padding
    assert torch.allclose(pad[:, 16, 16], expected, atol=1e-4)  # middle: the image


def test_transparent_images_are_composited_on_the_pad_colour() -> None:
    clear = np.zeros((32, 32, 4), dtype=np.uint8)
    clear[:16, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    pixels = load_image(png(Image.fromarray(clear, "RGBA")), 32)
    mean_colour = (torch.tensor(PAD_COLOR) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, 28, 5], mean_colour, atol=1e-4)
    assert torch.allclose(pixels[:, 3, 5], red, atol=1e-4)


# ----------------------------------------------------------------------------------------------- start-up checks


def data_copy(digits_data: Path, out: Path) -> Path:
    """The digits data set through symlinks, so that single files can be replaced."""
    out.mkdir()
    for item in digits_data.iterdir():
        (out / item.name).symlink_to(item)
    return out


def test_a_bad_shard_stops_the_run_before_step_one_with_one_line(digits_data: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from megavictor.data.preflight import check_data_set

    data = data_copy(digits_data, tmp_path / "data")
    shard = load_manifest(digits_data).split_shards("vqa_train")[1].name
    original = (digits_data / shard).read_bytes()
    (data / shard).unlink()
    (data / shard).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes
    check_data_set(config(data))  # sizes only by default
    with pytest.raises(DataError, match=f"{shard} does not match its sha256"):
        check_data_set(config(data, "data.verify_sha256=true"))
    (data / shard).write_bytes(original[: len(original) // 2])  # truncated
    proc = subprocess.run([sys.executable, "-m", "megavictor", "train", "--config", str(STAGE2),
                           f"data.path={data}", f"train.run_dir={tmp_path / 'run'}", "train.init_from=null"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and shard in lines[0] and "bytes" in lines[0] and "re-run megavictor prep" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_data_without_an_index_names_the_command_that_builds_it(digits_data: Path, tmp_path: Path) -> None:
    from data_prep.cli import main as prep
    from megavictor.data.preflight import check_data_set

    data = data_copy(digits_data, tmp_path / "data")
    (data / "index.npz").unlink()
    with pytest.raises(DataError, match=f"run `megavictor prep index --data {data}`"):
        check_data_set(config(data))
    with pytest.raises(DataError, match="another system prompt.*--system-prompt"):
        check_data_set(config(digits_data, "data.system_prompt='Be brief.'"))
    assert prep(["index", "--data", str(data)]) == 0
    check_data_set(config(data))
    assert load_index(data, None, "v1", "").meta == load_index(digits_data, None, "v1", "").meta


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_the_exported_hf_processor_prepares_images_as_the_loader_does(aspect: str) -> None:
    from megavictor.hf.convert import image_processor

    cfg = load_config(None, [f"data.image_aspect_ratio={aspect}"])
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 50, 3), dtype=np.uint8))
    hf = image_processor(cfg)(images=[picture], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(hf, load_image(png(picture), cfg.vision.image_size, aspect), atol=1e-5, rtol=0)


def test_the_deprecated_shuffle_buffer_is_accepted_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_config(None, ["data.shuffle_buffer=256"]).data.shuffle_buffer == 256
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.shuffle_buffer=256 is deprecated and ignored" in err[0]
    load_config(None, [])
    assert capsys.readouterr().err == ""


def test_bench_loader_reports_per_rank_decoding_and_packing(digits_data: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from megavictor.benchmarks.cli import main as bench

    results = {}
    for dp in (1, 8):
        assert bench(["loader", "--data", str(digits_data), "--dp", str(dp), "--steps", "2"]) == 0
        results[dp] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for dp, result in results.items():
        assert result["dp"] == dp and result["visual_tokens"] == result["visual_per_image"] == 64
        assert result["samples_per_s_per_rank"] > 0
        assert result["packing_efficiency"] >= 0.97
    assert results[8]["images_decoded_per_rank_per_step"] <= results[1]["images_decoded_per_rank_per_step"] / 6


# ----------------------------------------------------------------------------------------------- anyres on the mix


def test_anyres_index_sizes_and_slots_match_the_decoded_samples(mix_data: Path) -> None:
    cfg = anyres_config(mix_data)
    spec, registers = cfg.vision.anyres(), cfg.victor.registers_per_image
    data = TrainData(cfg, dims())
    order, split, decoder = data.data.order, data.data.index, data.data.decoder
    headers = {}  # record id -> (height, width) of its images, read from the shards with tarfile and PIL
    for shard in load_manifest(mix_data).split_shards("train"):
        with tarfile.open(mix_data / shard.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, raw in members.items():
            if name.endswith(".json"):
                record, key = json.loads(raw), name.removesuffix(".json")
                headers[record["id"]] = [Image.open(io.BytesIO(members[f"{key}.{m}"])).size[::-1]
                                         for m in record["images"]]
    assert {str(split.ids[i]): split.image_sizes(i) for i in range(len(split))} == headers
    grids = {(layout.rows, layout.cols) for sizes in headers.values()
             for layout in (spec.layout(h, w) for h, w in sizes)}
    assert grids == {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)}
    # The row order's per-sample counts (from the index alone) are what decoding produces.
    assert order.counts()["truncated"] > 0 and order.counts()["skipped_too_long"] > 0
    for i in np.flatnonzero(order.usable).tolist():
        batch = decoder.batch(((i,),))
        batch.validate(cfg.vision.num_visual_tokens, registers, spec)  # what the model checks
        assert batch.image_sizes.tolist() == [list(hw) for hw in split.image_sizes(i)[:batch.num_images]]
        assert (int(batch.cu_seqlens[1]), batch.num_loss_tokens(), batch.num_images) == \
            (order.slots[i], order.loss[i], order.images[i])
        assert (int((batch.kinds == KIND_VISUAL).sum()), batch.images.shape[0]) == (order.visual[i], order.views[i])
    # Cut shorter than one large image: whole images are dropped, as the index's code says.
    decoder.settings = replace(decoder.settings, seq_length=300)
    dropped = 0
    for i in range(0, len(split), 3):
        code = truncate(split.shape("v1", i), 300, order.sample_image_slots(i))
        batch = decoder.batch(((i,),))
        assert int(batch.cu_seqlens[1]) == slots(code, order.sample_image_slots(i)) <= 300
        assert batch.num_loss_tokens() == loss_tokens(code, registers)
        assert batch.num_images == code.count(IMAGE_RUN)
        dropped += code.count(IMAGE_RUN) < len(split.image_sizes(i))
    assert dropped > 10


def test_anyres_later_stages_build_the_same_structure_without_decoding(mix_data: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = anyres_config(mix_data)
    first = steps(TrainData(cfg, dims(pp=3)), 2)
    monkeypatch.setattr("megavictor.data.training_data.load_anyres", lambda *_: pytest.fail("decoded an image"))
    middle = steps(TrainData(cfg, dims(pp=3, pp_rank=1)), 2)
    last = steps(TrainData(cfg, dims(pp=3, pp_rank=2)), 2)
    structure = ("kinds", "position_ids", "cu_seqlens", "image_segments", "image_sizes")
    for a, b, c in zip(first, middle, last):
        assert_same_batches(a.mine, b.mine, structure)
        assert_same_batches(a.mine, c.mine, (*structure, "tokens", "labels"))
        for x, y, z in zip(a.mine, b.mine, c.mine):  # as many ViT views, without pixels
            assert x.images.shape[0] == y.images.shape[0] == z.images.shape[0] > x.num_images
            assert y.images.shape[1:] == z.images.shape[1:] == (3, 0, 0)
        assert a.images > 0 and b.images == c.images == 0
        assert (a.loss_tokens, a.flops) == (b.loss_tokens, b.flops) == (c.loss_tokens, c.flops)


def test_anyres_dp_ranks_decode_only_their_rows_and_resume_under_another_dp(mix_data: Path) -> None:
    cfg = anyres_config(mix_data)
    run = TrainData(cfg, dims())
    whole = steps(run, 2)
    state = json.loads(json.dumps(run.state_dict()))
    whole += steps(run, 2)  # uninterrupted
    halves = [steps(TrainData(cfg, dims(dp=2, dp_rank=r)), 2) for r in range(2)]
    resumed = []
    for r in range(2):
        data = TrainData(cfg, dims(dp=2, dp_rank=r))
        data.load_state_dict(state)
        resumed.append(steps(data, 2))
    for step, (a, b) in zip(whole, [*zip(*halves), *zip(*resumed)]):
        assert_same_batches(step.mine, a.mine + b.mine)
        assert a.images == sum(m.num_images for m in a.mine) < step.images == a.images + b.images
        assert (step.loss_tokens, step.samples, step.real_tokens, step.flops) == \
            (a.loss_tokens, a.samples, a.real_tokens, a.flops)
        # The global FLOPs from the order's per-row visual slots and ViT views are the decoded batches' own.
        assert step.flops == pytest.approx(sum(batch_train_flops(cfg, m) for m in step.mine), rel=1e-12)
    with pytest.raises(DataError, match="data order"):  # the grids are part of the order
        TrainData(config(mix_data, "data.train_split=train", "data.val_split=val", "data.test_split=test",
                         "data.seq_length=768"), dims()).load_state_dict(state)


def write_index(root: Path, change) -> None:
    """Rewrite `root`'s index.npz (a symlink in a data_copy) with `change(arrays, meta)` applied."""
    with np.load(root / INDEX_NAME) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays.pop("meta")))
    change(arrays, meta)
    (root / INDEX_NAME).unlink()
    np.savez(root / INDEX_NAME, meta=np.array(json.dumps(meta)), **arrays)


def test_a_v1_index_serves_fixed_resolution_and_stops_anyres_with_one_line(mix_data: Path, tmp_path: Path) -> None:
    from data_prep.cli import main as prep
    from megavictor.data.preflight import check_data_set

    def to_v1(arrays: dict, meta: dict) -> None:  # an index written before per-image sizes
        for name in [n for n in arrays if n.endswith(("/image_hw", "/image_offsets"))]:
            del arrays[name]
        meta["version"] = 1

    data = data_copy(mix_data, tmp_path / "data")
    write_index(data, to_v1)
    fixed = config(data, "data.train_split=train", "data.val_split=val", "data.test_split=test")
    check_data_set(fixed)
    on_v2 = config(mix_data, "data.train_split=train", "data.val_split=val", "data.test_split=test")
    assert_same_batches(steps(TrainData(fixed, dims()), 1)[0].mine, steps(TrainData(on_v2, dims()), 1)[0].mine)
    for start in (check_data_set, lambda cfg: TrainData(cfg, dims())):
        with pytest.raises(DataError) as refused:
            start(anyres_config(data))
        assert str(refused.value) == (f"{data}/{INDEX_NAME} holds no image sizes (index version 1), which anyres "
                                      f"images (vision.image_grid_pinpoints) need: run `megavictor prep index "
                                      f"--data {data}`")
    assert prep(["index", "--data", str(data)]) == 0
    check_data_set(anyres_config(data))
    assert load_index(data, None, "v1", "").meta["version"] == 2


def test_an_image_off_its_indexed_size_stops_decoding_with_one_line(mix_data: Path, tmp_path: Path) -> None:
    def taller(arrays: dict, meta: dict) -> None:
        arrays["train/image_hw"][:, 0] += 1

    data = data_copy(mix_data, tmp_path / "data")
    write_index(data, taller)
    train = TrainData(anyres_config(data, "data.num_workers=1"), dims())  # a worker decodes: still one line
    with pytest.raises(DataError) as stopped:
        train.next_step()
    message = str(stopped.value)
    found = re.fullmatch(rf"{data}/(train-\d+\.tar): image '(\S+)' of sample '(mix-train-\d+)' is (\d+)x(\d+) "
                         rf"\(height x width\) but {data}/index.npz says (\d+)x(\d+): the shard or the index changed "
                         rf"after indexing; run `megavictor prep index --data {data}` \(or re-run megavictor prep if "
                         r"the shard is damaged\)", message)
    assert found, message
    shard, member, record, height, width, indexed_height, indexed_width = found.groups()
    key = {r["id"]: key for key, r in records(mix_data, "train").items()}[record]
    with tarfile.open(mix_data / shard) as tar:
        assert Image.open(tar.extractfile(f"{key}.{member}")).size == (int(width), int(height))
    assert (int(indexed_height), int(indexed_width)) == (int(height) + 1, int(width))


def test_bench_loader_reports_the_mean_anyres_visual_slots(mix_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megavictor.benchmarks.cli import main as bench

    assert bench(["loader", "--data", str(mix_data), "--split", "train", "--steps", "1", "--global-batch-size", "8",
                  f"vision.image_grid_pinpoints={PINPOINTS}", "data.image_aspect_ratio=anyres",
                  "data.seq_length=768"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    order = TrainData(anyres_config(mix_data), dims()).data.order  # one epoch holds each usable sample once
    mean = order.visual[order.usable].sum() / order.images[order.usable].sum()
    assert result["visual_per_image"] == round(mean, 2) and 64 < mean < 336
    assert result["images_decoded_per_rank_per_step"] > 0 and result["packing_efficiency"] >= 0.9


def test_prep_index_refuses_a_sample_whose_image_markers_and_images_differ(mix_data: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from data_prep.cli import main as prep

    data = data_copy(mix_data, tmp_path / "data")
    shard = load_manifest(mix_data).split_shards("val")[0].name
    (data / shard).unlink()
    with tarfile.open(mix_data / shard) as source, tarfile.open(data / shard, "w") as out:
        edited = None
        for member in source:
            raw = source.extractfile(member).read()
            if edited is None and member.name.endswith(".json") and json.loads(raw)["images"]:
                record = json.loads(raw)
                record["conversations"][0]["value"] += " <image>"  # one marker more than the sample has images
                raw, edited = json.dumps(record).encode(), member.name.removesuffix(".json")
            member.size = len(raw)
            out.addfile(member, io.BytesIO(raw))
    capsys.readouterr()
    assert prep(["index", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    found = re.fullmatch(rf"megavictor prep index: error: {data}/{shard}: sample '{edited}' has (\d) <image> "
                         r"markers but (\d) images; re-run megavictor prep on its source", err[-1])
    assert len(err) == 1 and found and int(found[1]) == int(found[2]) + 1, err
