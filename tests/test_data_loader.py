"""The packed, resumable loader on real digits shards: exactly-once epochs over 2 dp ranks x 2 workers,
identical batches for tensor-parallel peers, seeded order, exact resume in a fresh process, truncation."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import tarfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megavictor.config import load_config
from megavictor.data import VictorLoader
from megavictor.data.images import CLIP_MEAN, CLIP_STD, load_image
from megavictor.data.manifest import load_manifest
from megavictor.data.order import epoch_order
from megavictor.data.packing import MAX_WAIT_ROWS, Packer, PackItem
from megavictor.data.tokenizer import ChatTokenizer, load_tokenizer
from megavictor.model.batch import IGNORE_INDEX, IMAGE_PLACEHOLDER, KIND_TEXT, VictorBatch

SEQ, V, R = 256, 16, 8
LOADER_ARGS = dict(seq_length=SEQ, micro_batch_size=2, visual_tokens=V, registers=R, image_size=32)


def loader(root: Path, split: str = "vqa_val", **kw) -> VictorLoader:
    return VictorLoader(root, split, **{**LOADER_ARGS, **kw})


def split_keys(root: Path, split: str) -> list[str]:
    """Sample keys of a split, read straight from the tar files."""
    keys = set()
    for shard in load_manifest(root).split_shards(split):
        with tarfile.open(root / shard.name) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar}
    return sorted(keys)


def epoch_keys(lo: VictorLoader) -> list[str]:
    keys = []
    for batch, rows in lo.iter_with_keys():
        batch.validate(V, R)
        assert batch.shape == (LOADER_ARGS["micro_batch_size"], SEQ)
        assert batch.images.shape[0] == sum(len(row) for row in rows)  # one image per digits sample
        keys += [key for row in rows for key in row]
    return keys


def assert_same_batches(a: list[VictorBatch], b: list[VictorBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in fields(VictorBatch):
            assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f.name


# ----------------------------------------------------------------------------------------------- loader


def test_epoch_is_read_exactly_once_across_dp_ranks_and_workers(digits_data: Path) -> None:
    # vqa_val: 500 samples in 3 shards (170/170/160) for 2 ranks x 2 workers: ranges cross shard boundaries.
    per_rank = [epoch_keys(loader(digits_data, dp_rank=r, dp_size=2, num_workers=2, epochs=1)) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == split_keys(digits_data, "vqa_val")
    assert len(per_rank[0]) == len(per_rank[1]) == 250
    assert not set(per_rank[0]) & set(per_rank[1])


def test_batches_hold_the_chat_template_and_loss_on_answers_only(digits_data: Path) -> None:
    lo = loader(digits_data, num_workers=0, epochs=1)
    tokenizer = lo.tokenizer
    batch, rows = next(lo.iter_with_keys())
    assert len(rows[0]) > 1  # packed: several samples in one row
    seg = batch.segment_ids()[0]
    first = seg == seg[0]
    text = batch.tokens[0][first & (batch.kinds[0] == KIND_TEXT)].tolist()
    targets = batch.labels[0][first & (batch.labels[0] != IGNORE_INDEX)].tolist()
    records = {}
    for shard in load_manifest(digits_data).split_shards("vqa_val"):
        with tarfile.open(digits_data / shard.name) as tar:
            records |= {m.name.split(".")[0]: json.load(tar.extractfile(m)) for m in tar if m.name.endswith("json")}
    question, answer = (t["value"] for t in records[rows[0][0]]["conversations"])
    words = question.removeprefix("<image>\n").replace("?", " ?").split()
    assert tokenizer.convert_ids_to_tokens(text) == ["<s>", "USER", ":", *words, "ASSISTANT", ":", answer, "</s>"]
    assert tokenizer.convert_ids_to_tokens(targets) == [answer, "</s>"]
    assert batch.position_ids[0][: int(first.sum())].tolist() == list(range(int(first.sum())))


def test_tensor_parallel_peers_get_identical_batches(digits_data: Path) -> None:
    peers = [list(itertools.islice(loader(digits_data, dp_rank=1, dp_size=2, num_workers=2), 6)) for _ in range(2)]
    assert_same_batches(*peers)
    other_rank = list(itertools.islice(loader(digits_data, dp_rank=0, dp_size=2, num_workers=2), 6))
    assert not torch.equal(other_rank[0].tokens, peers[0][0].tokens)


def test_seed_fixes_the_order(digits_data: Path) -> None:
    runs = {seed: epoch_keys(loader(digits_data, seed=seed, epochs=1)) for seed in (1, 2)}
    assert epoch_keys(loader(digits_data, seed=1, epochs=1)) == runs[1]
    assert runs[1] != runs[2] and sorted(runs[1]) == sorted(runs[2]) == split_keys(digits_data, "vqa_val")


RESUME_SCRIPT = """
import itertools, json, sys, torch
from megavictor.data import VictorLoader
root, state, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lo = VictorLoader(root, "vqa_val", **json.loads(sys.argv[5]))
lo.load_state_dict(json.loads(open(state).read()))
got = list(itertools.islice(lo.iter_with_keys(), n))
torch.save({"batches": [vars(b) for b, _ in got], "keys": [k for _, k in got], "state": lo.state_dict()}, out)
"""


def test_resume_in_a_fresh_process_gives_the_same_next_batches(digits_data: Path, tmp_path: Path) -> None:
    # dp rank 1 of 2, 2 workers, small buffers: ~20 batches per epoch, so the resumed part crosses an epoch.
    args = dict(LOADER_ARGS, dp_rank=1, dp_size=2, num_workers=2, pack_buffer=16, shuffle_buffer=32, seed=7)
    lo = VictorLoader(digits_data, "vqa_val", **args)
    stream = lo.iter_with_keys()
    list(itertools.islice(stream, 15))
    state = lo.state_dict()
    (tmp_path / "state.json").write_text(json.dumps(state))
    expected = list(itertools.islice(stream, 20))
    assert min(w["epoch"] for w in lo.state_dict()["workers"]) >= 1
    assert any(w["pending"] for w in state["workers"])  # the packing buffer is part of the saved state

    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(digits_data), str(tmp_path / "state.json"),
                    str(tmp_path / "out.pt"), "20", json.dumps(args)], check=True, timeout=300)
    resumed = torch.load(tmp_path / "out.pt")
    assert resumed["keys"] == [k for _, k in expected]
    assert_same_batches([VictorBatch(**b) for b in resumed["batches"]], [b for b, _ in expected])
    assert resumed["state"] == lo.state_dict()


def test_restore_with_another_data_parallel_layout_is_refused(digits_data: Path) -> None:
    lo = loader(digits_data, dp_rank=0, dp_size=2)
    next(iter(lo))
    state = lo.state_dict()
    with pytest.raises(ValueError, match="dp_size: saved 2, now 4"):
        loader(digits_data, dp_rank=0, dp_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        loader(digits_data, dp_rank=0, dp_size=2, num_workers=2).load_state_dict(state)
    fresh = loader(digits_data, dp_rank=0, dp_size=2)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.state_dict() == state


def test_long_samples_are_truncated_and_counted_not_dropped(digits_data: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # 40 slots hold the image (24) and one question; multi-turn training records do not fit.
    lo = loader(digits_data, "vqa_train", seq_length=40, micro_batch_size=8, epochs=1)
    with caplog.at_level(logging.WARNING, logger="megavictor.data.loader"):
        keys = [k for _, rows in lo.iter_with_keys() for row in rows for k in row]
    assert sorted(keys) == split_keys(digits_data, "vqa_train")
    assert lo.truncated > 100
    assert "truncated" in caplog.text


def test_from_config_checks_the_vocab(digits_data: Path) -> None:
    cfg = load_config(None, [f"data.path={digits_data}", "model.vocab_size=64"])
    with pytest.raises(ValueError, match="vocab_size"):
        VictorLoader.from_config(cfg, "vqa_val")
    cfg.model.vocab_size = 512
    lo = VictorLoader.from_config(cfg, "vqa_val", dp_rank=1, dp_size=2)
    assert (lo.spec.visual_tokens, lo.spec.registers, lo.spec.seq_length) == (16, 8, cfg.data.seq_length)


# ----------------------------------------------------------------------------------------------- parts


def test_epoch_order_partitions_each_epoch_and_reshuffles() -> None:
    sizes = [7, 5, 9]
    orders = [epoch_order(sizes, seed=3, epoch=0, consumer=c, num_consumers=4, shuffle=True, shuffle_buffer=4)
              for c in range(4)]
    assert sorted(i for _, order in orders for i in order) == list(range(21))
    for read, order in orders:
        assert sorted(read) == sorted(order)
    assert epoch_order(sizes, 3, 1, 0, 4, True, 4)[1] != orders[0][1]
    assert epoch_order(sizes, 3, 0, 0, 1, False, 4) == (list(range(21)), list(range(21)))


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
    assert sum(sizes) / (len(rows) * 1024) >= 0.97
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


def test_images_are_resized_and_clip_normalised(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (255, 255, 255)).save(buf, format="PNG")
    pixels = load_image(buf.getvalue(), 32)
    assert pixels.shape == (3, 32, 32)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=1e-4)
