"""`megavictor prep`: digits and LLaVA data to tar shards; manifest vs tar contents, bad records, determinism,
resume after an interruption."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_prep.llava
from data_prep.digits import SPLITS, TEST_SAMPLES, TEST_SPLIT
from megavictor.cli import main as megavictor_main
from megavictor.data.manifest import load_manifest
from megavictor.data.tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------------- helpers


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of a tar shard read with plain tarfile (key = name up to the first dot), checking tar metadata."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            assert (member.mtime, member.uname, member.gname, member.uid) == (0, "megavictor", "megavictor", 0)
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def check_manifest_matches_tars(root: Path) -> dict[str, int]:
    """Every listed shard exists with the listed size, checksum and sample count; nothing unlisted or partial."""
    manifest = load_manifest(root)
    per_split: dict[str, int] = {}
    for shard in manifest.shards:
        path = root / shard.name
        assert path.stat().st_size == shard.bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
        assert len(tar_samples(path)) == shard.samples > 0
        per_split[shard.split] = per_split.get(shard.split, 0) + shard.samples
    assert sorted(p.name for p in root.glob("*.tar")) == sorted(s.name for s in manifest.shards)
    assert not list(root.glob("*.tmp")) and not (root / ".prep-progress.json").exists()
    return per_split


def checksums(root: Path) -> list[tuple[str, str]]:
    return [(s.name, s.sha256) for s in load_manifest(root).shards]


# ----------------------------------------------------------------------------------------------- digits


def fixture_sizes() -> dict[str, int]:
    """The splits' sizes in the session's digits data sets (their test split cut to conftest's TEST_SAMPLES)."""
    from tests.conftest import TEST_SAMPLES as FIXTURE_TEST_SAMPLES

    return {s.name: FIXTURE_TEST_SAMPLES if s.name == TEST_SPLIT else s.size for s in SPLITS}


def test_the_test_split_is_large_enough_for_one_point_of_noise_and_any_size_extends_the_same_records() -> None:
    """2500 test questions by default: one run's exact-match noise sqrt(p (1 - p) / n) is at most 1 point; a smaller
    or larger `--test-samples` cuts or extends the same sequence of records (the first 500 are those of every size)."""
    from sklearn.datasets import load_digits

    from data_prep.digits import source_pools, split_records

    spec = next(s for s in SPLITS if s.name == TEST_SPLIT)
    assert spec.size == TEST_SAMPLES == 2500 and (0.25 / spec.size) ** 0.5 <= 0.01
    labels = load_digits().target
    pool = source_pools(labels, 0)[spec.pool]
    small, default = split_records(spec, labels, pool, 0, size=500), split_records(spec, labels, pool, 0)
    assert len(small) == 500 and len(default) == 2500 and default[:500] == small
    assert len({json.dumps(r, sort_keys=True) for r in default}) > 2000  # mostly distinct questions


def test_digits_manifest_matches_tar_contents(digits_data: Path) -> None:
    assert check_manifest_matches_tars(digits_data) == fixture_sizes()
    assert {s.name for s in SPLITS} >= {"caption_train", "caption_val", "vqa_train", "vqa_val", "vqa_test"}
    tokenizer = load_tokenizer(digits_data / load_manifest(digits_data).tokenizer)
    assert len(tokenizer) <= 512
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _records(root: Path, split: str) -> list[tuple[dict, np.ndarray]]:
    out = []
    for shard in load_manifest(root).split_shards(split):
        for sample in tar_samples(root / shard.name).values():
            out.append((json.loads(sample["json"]), np.asarray(Image.open(io.BytesIO(sample["png"])))))
    return out


def test_digits_splits_use_disjoint_scans(digits_data: Path) -> None:
    pools = {}
    for pool in ("train", "val", "test"):
        scans: set[int] = set()
        for split in (s.name for s in SPLITS if s.pool == pool):
            scans |= {c for record, _ in _records(digits_data, split) for c in record["scans"] if c is not None}
        pools[pool] = scans
    assert pools["train"] and pools["val"] and pools["test"]
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]


def _check_answers(root: Path, grid: int) -> set[str]:
    """Every vqa_val image shows exactly the record's occupied cells and every answer is right; returns the kinds."""
    cells = {"the top left": 0, "the top right": 1, "the bottom left": 2, "the bottom right": 3}
    size, kinds = 32 // grid, set()
    for record, image in _records(root, "vqa_val"):
        assert image.shape == (32, 32, 3)
        digits = record["digits"]
        assert len(digits) == grid * grid
        for pos, digit in enumerate(digits):  # empty cells are blank, occupied ones are not
            row, col = divmod(pos, grid)
            assert (image[size * row:size * (row + 1), size * col:size * (col + 1)].max() > 0) == (digit is not None)
        (human, gpt) = record["conversations"]
        question, answer = human["value"].removeprefix("<image>\n"), gpt["value"]
        present = [d for d in digits if d is not None]
        if question.startswith("What is the digit in "):
            kinds.add("cell")
            name = question.removeprefix("What is the digit in ")[:-1]
            numbered = re.fullmatch(r"row (\d) column (\d)", name)
            pos = (int(numbered[1]) - 1) * grid + int(numbered[2]) - 1 if numbered else cells[name]
            assert answer == str(digits[pos])
        else:
            expected = {"How many digits are there?": len(present), "What is their sum?": sum(present),
                        "How many digits are odd?": sum(d % 2 for d in present)}[question]
            kinds.add(question)
            assert answer == str(expected)
    return kinds


def test_digits_answers_match_the_image(digits_data: Path) -> None:
    assert len(_check_answers(digits_data, grid=2)) == 4


def test_digits_grid4_answers_match_the_image(tmp_path: Path) -> None:
    """`--grid 4`: 16 cells of 8x8 digits named by row and column, 3-8 digits per image, no sum question."""
    assert megavictor_main(["prep", "digits", "--grid", "4", "--out", str(tmp_path), "--vision-steps", "0"]) == 0
    assert load_manifest(tmp_path).source["grid"] == 4
    assert _check_answers(tmp_path, grid=4) == {"cell", "How many digits are there?", "How many digits are odd?"}
    counts = [sum(d is not None for d in r["digits"]) for r, _ in _records(tmp_path, "vqa_val")]
    assert min(counts) >= 3 and max(counts) <= 8


def test_digits_prep_is_byte_identical_on_rerun(digits_data: Path, tmp_path: Path) -> None:
    from tests.conftest import DIGITS_MAXCOUNT
    from tests.conftest import TEST_SAMPLES as FIXTURE_TEST_SAMPLES

    assert megavictor_main(["prep", "digits", "--out", str(tmp_path), "--maxcount", str(DIGITS_MAXCOUNT),
                            "--vision-steps", "0", "--test-samples", str(FIXTURE_TEST_SAMPLES)]) == 0
    assert checksums(tmp_path) == checksums(digits_data)
    for f in (digits_data / "tokenizer").iterdir():
        assert (tmp_path / "tokenizer" / f.name).read_bytes() == f.read_bytes()
    assert not (tmp_path / "vision_encoder.safetensors").exists()  # --vision-steps 0 skips the pretraining


def test_digits_prep_pretrains_the_demo_vision_tower(digits_data: Path) -> None:
    """OUT/vision_encoder.safetensors holds exactly the demo config's ViT (what `vision.init_from` reads), and
    the short pretraining already beats guessing the most common patch class by a wide margin."""
    from data_prep.cli import DEMO_STAGE1
    from megavictor.checkpoint.initial_weights import vision_tower_state
    from megavictor.config import load_config
    from megavictor.config import ConfigError
    from megavictor.model.reference import full_shapes

    cfg = load_config(DEMO_STAGE1)
    wanted = {n: tuple(s) for n, s in full_shapes(cfg).items() if n.startswith("vision.")}
    assert len(vision_tower_state(digits_data / "vision_encoder.safetensors", wanted)) == len(wanted) > 10
    record = json.loads((digits_data / "vision_encoder.json").read_text())
    assert record["vision"] == cfg.to_dict()["vision"] and record["steps"] > 0
    assert record["val_digit_token_accuracy"] > 0.3  # 200 steps give ~0.47; an untrained tower ~0.1
    wrong = dict(wanted, **{next(iter(wanted)): (1, 2, 3)})
    with pytest.raises(ConfigError, match="vision.init_from=.*shape"):
        vision_tower_state(digits_data / "vision_encoder.safetensors", wrong)


def test_digits_hires_canvases_cells_answers_and_index(hires_digits_data: Path) -> None:
    """`--hires`: every image is one of the canvases, each exactly a pinpoint of configs/hires_stage*.yaml (anyres
    cuts it into native tiles, nothing resized), and the index holds its size; an occupied cell holds its scan at
    its native 8x8, centred in 16 px, an empty one is black; every VQA question asks for one cell's digit, with that
    digit as the answer; 2 to half the cells are occupied; every canvas occurs in every split."""
    from sklearn.datasets import load_digits

    from data_prep.cli import HIRES_STAGE1
    from data_prep.digits import HIRES_CANVASES, HIRES_CELL
    from megavictor.config import load_config
    from megavictor.data.index import load_index
    from megavictor.hf_model.anyres import select_best_resolution

    pins = tuple(tuple(p) for p in load_config(HIRES_STAGE1).vision.image_grid_pinpoints)
    assert pins == tuple(tuple(p) for p in load_config(HIRES_STAGE1.with_name("hires_stage2.yaml"))
                         .vision.image_grid_pinpoints) == HIRES_CANVASES
    assert load_manifest(hires_digits_data).source["hires"] is True
    assert check_manifest_matches_tars(hires_digits_data) == fixture_sizes()
    native = (load_digits().images * (255 / 16)).round().astype(np.uint8)
    index = load_index(hires_digits_data, None, "v1", "", need_sizes=True)
    for split in ("caption_val", "vqa_val", "vqa_test"):
        records, split_index, canvases = _records(hires_digits_data, split), index.split(split), set()
        assert [r["id"] for r, _ in records] == split_index.ids.tolist()
        for i, (record, image) in enumerate(records):
            height, width = image.shape[:2]
            canvases.add((height, width))
            assert split_index.image_sizes(i) == [(height, width)]
            assert select_best_resolution(height, width, pins) == (height, width)  # the grid hit: its own size
            rows, cols = record["grid"]
            assert (rows * HIRES_CELL, cols * HIRES_CELL) == (height, width)
            assert 2 <= sum(d is not None for d in record["digits"]) <= rows * cols // 2
            for pos, (scan, digit) in enumerate(zip(record["scans"], record["digits"])):
                top, left = HIRES_CELL * (pos // cols), HIRES_CELL * (pos % cols)
                cell = image[top:top + HIRES_CELL, left:left + HIRES_CELL, 0]
                if scan is None:
                    assert digit is None and cell.max() == 0
                else:
                    expected = np.zeros((HIRES_CELL, HIRES_CELL), dtype=np.uint8)
                    expected[4:12, 4:12] = native[scan]
                    assert np.array_equal(cell, expected)
            if split.startswith("vqa"):
                human, gpt = record["conversations"]
                numbered = re.fullmatch(r"<image>\nWhat is the digit in row (\d) column (\d)\?", human["value"])
                assert numbered, human["value"]
                assert gpt["value"] == str(record["digits"][(int(numbered[1]) - 1) * cols + int(numbered[2]) - 1])
        assert canvases == set(HIRES_CANVASES)


def test_digits_hires_vision_tiles_are_the_native_cells(hires_digits_data: Path) -> None:
    """The hires ViT pretrains on each canvas's 32-px tiles (row-major, 2x2 cells each), labelled by their cells."""
    import torch

    from data_prep.digits import HIRES_CELL
    from data_prep.vision_encoder import EMPTY, hires_tiles
    from megavictor.data.images import load_anyres
    from megavictor.hf_model.anyres import AnyresSpec

    shard = load_manifest(hires_digits_data).split_shards("caption_val")[0]
    for sample in list(tar_samples(hires_digits_data / shard.name).values())[:20]:
        record = json.loads(sample["json"])
        cells = [EMPTY if d is None else d for d in record["digits"]]
        tiles = hires_tiles(sample["png"], record["grid"], cells, 32)
        rows, cols = record["grid"]
        assert len(tiles) == rows * cols // 4
        views, _ = load_anyres(sample["png"], AnyresSpec(((rows * HIRES_CELL, cols * HIRES_CELL),), 32, 8))
        for (tile, labels), view in zip(tiles, views[1:], strict=True):  # the anyres tiles after the base view
            assert torch.equal(tile, view)
            for q, label in enumerate(labels):  # an empty cell of the tile is black (CLIP-normalised zero)
                cell = tile[:, 16 * (q // 2):16 * (q // 2) + 16, 16 * (q % 2):16 * (q % 2) + 16]
                assert (label == EMPTY) == bool(torch.allclose(cell, cell.flatten(1)[:, :1, None]))


def test_digits_hires_refuses_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert megavictor_main(["prep", "digits", "--hires", "--grid", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grid 4 does not apply to --hires" in err[0]


# ----------------------------------------------------------------------------------------------- LLaVA

BAD_TEXT = "@@NOT-UTF8@@"
EXPECTED_SKIPS = {"missing_image": ["missing-img"], "unreadable_image": ["broken-img"],
                  "no_conversations": ["no-conv"], "image_count_mismatch": ["count-mismatch"],
                  "duplicate_id": ["good-jpg"], "non_utf8_text": ["bad-utf8"],
                  "image_outside_root": ["outside-rel", "outside-abs", "outside-link"],
                  "image_in_answer": ["image-in-answer"], "empty_answer": ["empty-answer"],
                  "image_too_small": ["tiny-img"]}
GOOD_IDS = ["good-jpg", "good-two", "text-only", "good-png", "extra-0", "extra-1", "extra-2", "extra-3"]


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def llava_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A LLaVA JSON + image folder: good records (jpg, png, gif, two images, text only) and planted bad ones."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / "sub" / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8)).save(images / "b.png")
    Image.fromarray(rng.integers(0, 255, (16, 24), dtype=np.uint8)).convert("P").save(images / "c.gif")
    (images / "broken.jpg").write_bytes((images / "sub" / "a.jpg").read_bytes()[:200])
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "outside.png")
    (images / "link.png").symlink_to(root / "outside.png")  # a symlink inside the root to a file outside it
    Image.new("RGB", (1, 1)).save(images / "tiny.png")
    one = _turns("<image>\nWhat is shown?", "noise")
    records = [
        {"id": "good-jpg", "image": "sub/a.jpg", "conversations": one},
        {"id": "good-two", "image": ["b.png", "c.gif"],
         "conversations": _turns("<image> and <image>: same?", "no", "Sure?", "yes")},
        {"id": "text-only", "conversations": _turns("Say hi", "hi")},
        {"id": "missing-img", "image": "nope.jpg", "conversations": one},
        {"id": "broken-img", "image": "broken.jpg", "conversations": one},
        {"id": "no-conv", "image": "sub/a.jpg"},
        {"id": "count-mismatch", "image": "sub/a.jpg", "conversations": _turns("no marker here", "A")},
        {"id": "good-jpg", "image": "b.png", "conversations": one},
        {"id": "bad-utf8", "image": "sub/a.jpg", "conversations": _turns("<image>\n" + BAD_TEXT, "A")},
        {"id": "good-png", "image": "b.png", "conversations": one},
    ] + [{"id": f"extra-{i}", "image": "sub/a.jpg", "conversations": one} for i in range(4)] + [
        {"id": "outside-rel", "image": "../outside.png", "conversations": one},
        {"id": "outside-abs", "image": str(root / "outside.png"), "conversations": one},
        {"id": "outside-link", "image": "link.png", "conversations": one},
        {"id": "image-in-answer", "image": "b.png", "conversations": _turns("What is shown?", "<image> noise")},
        {"id": "empty-answer", "image": "b.png", "conversations": _turns("<image>\nWhat is shown?", "  ")},
        {"id": "tiny-img", "image": "tiny.png", "conversations": one},
    ]
    path = root / "llava.json"
    path.write_bytes(json.dumps(records, indent=1).encode().replace(BAD_TEXT.encode(), b"caf\xe9 \xff"))
    return path, images


def _prep_llava(source: tuple[Path, Path], out: Path, *extra: str) -> int:
    json_path, images = source
    return megavictor_main(["prep", "llava", "--json", str(json_path), "--images", str(images), "--out", str(out),
                            "--maxcount", "3", *extra])


def test_llava_prep_skips_bad_records_by_id(llava_source: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    assert _prep_llava(llava_source, tmp_path, "--workers", "2") == 0
    err = capsys.readouterr().err
    manifest = load_manifest(tmp_path)
    assert manifest.skipped_ids == EXPECTED_SKIPS
    assert manifest.skipped == {reason: len(ids) for reason, ids in EXPECTED_SKIPS.items()}
    for ids in EXPECTED_SKIPS.values():
        assert f"record {ids[0]!r}" in err
    assert check_manifest_matches_tars(tmp_path) == {"train": len(GOOD_IDS)}
    samples = {}
    for shard in manifest.shards:
        for sample in tar_samples(tmp_path / shard.name).values():
            samples[json.loads(sample["json"])["id"]] = sample
    assert sorted(samples) == sorted(GOOD_IDS)
    _, images = llava_source
    assert samples["good-jpg"]["jpg"] == (images / "sub" / "a.jpg").read_bytes()  # original bytes kept
    two = samples["good-two"]
    assert json.loads(two["json"])["images"] == ["0.png", "1.png"] and {"0.png", "1.png"} < set(two)
    assert Image.open(io.BytesIO(two["1.png"])).size == (24, 16)  # the gif, re-encoded as PNG
    assert set(samples["text-only"]) == {"json"}
    outside = (llava_source[0].parent / "outside.png").read_bytes()
    assert not any(outside in shard.read_bytes() for shard in tmp_path.glob("*.tar"))  # never written to a shard


def test_llava_prep_skips_overlong_and_oversized_records_by_the_limits(llava_source: tuple[Path, Path],
                                                                       digits_data: Path, tmp_path: Path) -> None:
    # a.jpg is 40x30 = 1200 pixels; the two-turn record needs 2 x 24 image slots + its text.
    assert _prep_llava(llava_source, tmp_path, "--tokenizer", str(digits_data / "tokenizer"), "--max-image-pixels",
                       "1000", "--max-slots", "40", "--image-slots", "24", "--workers", "1") == 0
    skipped = load_manifest(tmp_path).skipped_ids
    assert skipped["image_too_large"] == ["good-jpg", "extra-0", "extra-1", "extra-2", "extra-3"]
    assert skipped["too_long"] == ["good-two"]
    assert "bad-utf8" not in skipped.get("image_too_large", [])  # skipped earlier, for its text, counted once


def test_llava_strict_fails_on_first_bad_record(llava_source: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert _prep_llava(llava_source, tmp_path, "--strict", "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "'missing-img'" in err and "nope.jpg" in err and "not found" in err
    assert not list(tmp_path.iterdir())  # nothing left that could pass for a data set


def test_llava_prep_is_byte_identical_on_rerun(llava_source: tuple[Path, Path], tmp_path: Path) -> None:
    assert _prep_llava(llava_source, tmp_path / "a", "--workers", "2") == 0
    assert _prep_llava(llava_source, tmp_path / "b", "--workers", "1") == 0
    assert _prep_llava(llava_source, tmp_path / "b", "--workers", "2") == 0  # over a finished run
    assert checksums(tmp_path / "a") == checksums(tmp_path / "b")
    assert len(checksums(tmp_path / "a")) == 3


def test_llava_interrupted_run_resumes_to_identical_shards(llava_source: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert _prep_llava(llava_source, tmp_path / "clean", "--workers", "1") == 0
    check = data_prep.llava.check_record

    def interrupted(job, images_dir, **kw):  # Ctrl-C while record #12 is being read
        if job[0] == 12:
            raise KeyboardInterrupt
        return check(job, images_dir, **kw)

    monkeypatch.setattr(data_prep.llava, "check_record", interrupted)
    out = tmp_path / "run"
    assert _prep_llava(llava_source, out, "--workers", "1") == 130
    assert not (out / "manifest.json").exists()
    progress = json.loads((out / ".prep-progress.json").read_text())
    done = [e["name"] for e in progress["splits"]["train"]["shards"]]
    assert done and sorted(p.name for p in out.glob("*.tar")) == done  # the shard being written is still *.tmp
    monkeypatch.setattr(data_prep.llava, "check_record", check)

    other = tmp_path / "other.json"
    other.write_text("[]")
    assert megavictor_main(["prep", "llava", "--json", str(other), "--images", str(llava_source[1]),
                            "--out", str(out), "--maxcount", "3"]) == 2
    assert "--restart" in capsys.readouterr().err

    assert _prep_llava(llava_source, out, "--workers", "1") == 0
    assert f"{len(done)} shards already complete" in capsys.readouterr().err
    assert checksums(out) == checksums(tmp_path / "clean")
    assert load_manifest(out).skipped_ids == EXPECTED_SKIPS
    check_manifest_matches_tars(out)


def test_python_dash_m_data_prep() -> None:
    result = subprocess.run([sys.executable, "-m", "data_prep", "llava", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--strict" in result.stdout and "--maxsize" in result.stdout


def test_llava_shards_load_into_packed_batches(llava_source: tuple[Path, Path], digits_data: Path,
                                               tmp_path: Path) -> None:
    from megavictor.config import load_config
    from megavictor.data.training_data import validation_batches
    from megavictor.distributed import ParallelDims

    tokenizer = digits_data / "tokenizer"
    assert _prep_llava(llava_source, tmp_path, "--workers", "1", "--tokenizer", str(tokenizer)) == 0
    assert (tmp_path / "index.npz").is_file()
    cfg = load_config(None, [f"data.path={tmp_path}", f"data.tokenizer={tokenizer}", "data.val_split=train",
                             "data.system_prompt=''", "data.seq_length=128", "data.micro_batch_size=2",
                             "train.eval_batches=8"])
    batches, _ = validation_batches(cfg, ParallelDims(1, 0, 1, 1, 1, 0, 0, 0))
    for batch in batches:
        batch.validate(16, 8)
    assert sum(int((b.position_ids == 0).logical_and(b.kinds != 3).sum()) for b in batches) == len(GOOD_IDS)
    assert sum(b.images.shape[0] for b in batches) == 8  # 1 + 2 + 0 (text only) + 1 + 4
