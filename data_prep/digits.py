"""The embedded default data set: grids of real handwritten digits (scikit-learn's 1797 8x8 scans).

Every image is 32x32 RGB, empty cells black, so answers need the image. `--grid 2` (default): 1-4 of 4 cells
hold a digit (8x8 upscaled to 16x16); VQA asks for the digit in a cell ("the top left"), the count, the count of
odd digits or the sum. `--grid 4`: 3-8 of 16 cells hold a digit at its own 8x8 resolution; VQA asks for the
digit in a cell ("row 2 column 3", an address of two words to compose), the count or the count of odd digits
(sums of up to eight digits have too many answers for the demo's budget). Captions (stage 1) list the digits in
reading order ("two, seven"); answers are one word so exact match is meaningful. The source scans are split
70/15/15 into train/val/test pools and each split draws only from its pool, so no scan leaks across splits.
Training VQA records have 1-3 turns (LLaVA v1 multi-turn); val/test have one, so each record is one exact-match
question.

`--hires` (issue #31, LLaVA-NeXT anyres): a task where resolution matters. Each image is one of `HIRES_CANVASES`
(32x64, 64x32, 64x64, 96x32, 32x96 pixels, height x width), a grid of 16-px cells holding scans at their native 8x8,
centred; 2 to half the cells hold a digit. Every VQA question asks for the digit in a cell ("row 5 column 2"), and
captions list the digits in reading order. One 32-px view of such an image (LLaVA-1.5's pad-and-resize) shrinks a
digit to 4 px (2.7 px for 96x32); the anyres grids of `configs/hires_stage*.yaml`, whose pinpoints are exactly these
canvases, cut it into native 32-px tiles of 2x2 cells. Records carry `grid: [rows, cols]`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from tqdm import tqdm

from data_prep.shards import PrepError, ShardSetWriter
from megavictor.data.word_tokenizer import SPECIAL_TOKENS, build_word_tokenizer
from megavictor.data.index import build_index
from megavictor.data.tokenizer import IMAGE_TOKEN, PROMPT_FORMATS, render

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32
GRIDS = (2, 4)  # cells per side that `prep digits --grid` offers
HIRES_CELL = 16  # pixels per cell side of `--hires` images; a native 8x8 scan sits in the middle
HIRES_CANVASES = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))  # (height, width): hires_stage*.yaml's grids
CORNERS = ["the top left", "the top right", "the bottom left", "the bottom right"]
TOKENIZER_DIR = "tokenizer"
VOCAB_LIMIT = 512  # ModelConfig.vocab_size's default


@dataclass(frozen=True)
class SplitSpec:
    name: str
    pool: str  # train | val | test: which source scans it may use
    size: int
    kind: str  # caption | vqa
    max_turns: int


SPLITS = [
    SplitSpec("caption_train", "train", 4000, "caption", 1),
    SplitSpec("caption_val", "val", 500, "caption", 1),
    SplitSpec("vqa_train", "train", 4000, "vqa", 3),
    SplitSpec("vqa_val", "val", 500, "vqa", 1),
    SplitSpec("vqa_test", "test", 2500, "vqa", 1),  # TEST_SAMPLES
]
# The test split's default size: the fidelity protocol (`bench accuracy`) needs one run's exact-match noise at most
# about 1 point, sqrt(p (1 - p) / n) <= 0.01 at the worst case p = 0.5, so n >= 2500. The first 500 records are the
# 500 that the split held before (each split draws from its own generator, record by record).
TEST_SAMPLES = 2500
TEST_SPLIT = "vqa_test"


def source_pools(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Disjoint scan indices per pool (70/15/15), fixed by `seed`."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    a, b = int(0.7 * len(perm)), int(0.85 * len(perm))
    return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def grid_of(digits: list[int | None]) -> int:
    """Cells per side of a record's grid (its `digits` list one entry per cell, reading order)."""
    grid = int(round(len(digits) ** 0.5))
    if grid not in GRIDS or grid * grid != len(digits):
        raise ValueError(f"a digits record has {len(digits)} cells; expected one of {[g * g for g in GRIDS]}")
    return grid


def row_column(pos: int, cols: int) -> str:
    """A cell's name by its 1-based row and column, `pos` counted in reading order over `cols` columns."""
    row, col = divmod(pos, cols)
    return f"row {row + 1} column {col + 1}"


def cell_name(pos: int, grid: int) -> str:
    return CORNERS[pos] if grid == 2 else row_column(pos, grid)


def draw_grid(scans: np.ndarray, cells: list[int | None], cols: int, cell: int, digit_side: int) -> bytes:
    """PNG bytes of an RGB grid of `cols` columns of `cell`-px cells (as many rows as `cells` fills); `cells[i]`
    (reading order) is a scan index or None for an empty (black) cell. A scan is resized to `digit_side` px unless
    that is its native 8 and centred in its cell."""
    rows = len(cells) // cols
    canvas = np.zeros((rows * cell, cols * cell), dtype=np.uint8)
    offset = (cell - digit_side) // 2
    for pos, scan in enumerate(cells):
        if scan is None:
            continue
        digit = Image.fromarray((scans[scan] * (255 / 16)).round().astype(np.uint8))
        if digit.size != (digit_side, digit_side):
            digit = digit.resize((digit_side, digit_side), Image.Resampling.BILINEAR)
        top, left = cell * (pos // cols) + offset, cell * (pos % cols) + offset
        canvas[top:top + digit_side, left:left + digit_side] = np.asarray(digit)
    out = io.BytesIO()
    Image.fromarray(np.stack([canvas] * 3, axis=-1)).save(out, format="PNG")
    return out.getvalue()


def record_image(scans: np.ndarray, record: dict[str, Any]) -> bytes:
    """PNG bytes of a record's grid: a `--hires` canvas (native scans in 16-px cells), else a 32x32 square whose
    cells the scans fill."""
    if "grid" in record:
        return draw_grid(scans, record["scans"], record["grid"][1], HIRES_CELL, 8)
    grid = grid_of(record["scans"])
    return draw_grid(scans, record["scans"], grid, IMAGE_SIZE // grid, IMAGE_SIZE // grid)


def questions(digits: list[int | None]) -> list[tuple[str, str]]:
    """Every question this grid can answer, with its one-word answer."""
    grid = grid_of(digits)
    present = [d for d in digits if d is not None]
    qa = [(f"What is the digit in {cell_name(i, grid)}?", str(d)) for i, d in enumerate(digits) if d is not None]
    qa += [("How many digits are there?", str(len(present))),
           ("How many digits are odd?", str(sum(d % 2 for d in present)))]
    if grid == 2:
        qa.append(("What is their sum?", str(sum(present))))
    return qa


def hires_questions(digits: list[int | None], cols: int) -> list[tuple[str, str]]:
    """A `--hires` grid's questions: only the digit of each occupied cell, the one thing a resized view loses (a
    count survives the resize, so it would dilute what the task measures)."""
    return [(f"What is the digit in {row_column(i, cols)}?", str(d)) for i, d in enumerate(digits) if d is not None]


def split_records(spec: SplitSpec, labels: np.ndarray, pool: np.ndarray, seed: int,
                  grid: int = 2, hires: bool = False, size: int | None = None) -> list[dict[str, Any]]:
    """The split's records (grid cells as scan indices + conversation); deterministic in (split, seed, grid, hires).
    `size` (default the spec's) only cuts or extends the same sequence: record i is the same for every size."""
    rng = np.random.default_rng([seed, SPLITS.index(spec)])
    records = []
    for i in range(spec.size if size is None else size):
        if hires:
            height, width = HIRES_CANVASES[int(rng.integers(len(HIRES_CANVASES)))]
            rows, cols = height // HIRES_CELL, width // HIRES_CELL
            low, high = 2, rows * cols // 2  # digits per image
        else:
            rows = cols = grid
            low, high = (1, 4) if grid == 2 else (3, 8)
        cells: list[int | None] = [None] * (rows * cols)
        for pos in rng.choice(rows * cols, size=int(rng.integers(low, high + 1)), replace=False):
            cells[int(pos)] = int(pool[rng.integers(len(pool))])
        digits = [None if c is None else int(labels[c]) for c in cells]
        if spec.kind == "caption":
            conversations = [{"from": "human", "value": "<image>\nWhich digits are shown?"},
                             {"from": "gpt", "value": ", ".join(NAMES[d] for d in digits if d is not None)}]
        else:
            qa = hires_questions(digits, cols) if hires else questions(digits)
            picks = rng.choice(len(qa), size=min(len(qa), int(rng.integers(1, spec.max_turns + 1))), replace=False)
            conversations = []
            for turn, k in enumerate(picks):
                question, answer = qa[int(k)]
                conversations += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + question},
                                  {"from": "gpt", "value": answer}]
        record = {"id": f"{spec.name}-{i:05d}", "conversations": conversations, "images": ["png"],
                  "digits": digits, "scans": cells}
        records.append(dict(record, grid=[rows, cols]) if hires else record)
    return records


def shard_sample(index: int, record: dict[str, Any], scans: np.ndarray) -> dict[str, Any]:
    """The tar sample of a record: {__key__, png, json} (the layout `megavictor prep llava` writes too)."""
    return {"__key__": f"{index:06d}", "png": record_image(scans, record),
            "json": json.dumps(record, sort_keys=True).encode("utf-8")}


def prep_digits(out: Path, maxcount: int = 1000, seed: int = 0, restart: bool = False, grid: int | None = None,
                hires: bool = False, test_samples: int = TEST_SAMPLES) -> None:
    """Write the shards, tokenizer and index of the digits data: `grid` cells per side (default 2), or the `hires`
    canvases (which have their own cells: no `grid` with them); `test_samples` questions in `vqa_test`."""
    data = load_digits()
    scans, labels = data.images, data.target
    pools = source_pools(labels, seed)
    if hires and grid is not None:
        raise PrepError(f"--grid {grid} does not apply to --hires (its images have {HIRES_CELL}-px cells, as many "
                        "as each canvas holds)")
    if test_samples < 1:
        raise PrepError(f"--test-samples {test_samples} must be >= 1")
    grid = 2 if grid is None else grid
    if grid not in GRIDS:
        raise PrepError(f"--grid {grid}: the digits grids have {' or '.join(map(str, GRIDS))} cells per side")
    # grid 2 keeps the fingerprint of data written before --grid; --hires has its own canvases, not --grid's
    grid_key = "hires/" if hires else "" if grid == 2 else f"grid={grid}/"
    # the test split's size is in the fingerprint (a resume never mixes sizes); the default's is the v2 data set
    size_key = "" if test_samples == TEST_SAMPLES else f"test={test_samples}/"
    writer = ShardSetWriter(out, fingerprint=f"digits/v2/{grid_key}{size_key}seed={seed}/maxcount={maxcount}",
                            maxcount=maxcount, maxsize=1 << 40, restart=restart)
    corpus: list[str] = []
    for spec in SPLITS:
        records = split_records(spec, labels, pools[spec.pool], seed, grid, hires,
                                test_samples if spec.name == TEST_SPLIT else None)
        corpus += [render(r["conversations"], fmt, SPECIAL_TOKENS["eos_token"])[0].replace(IMAGE_TOKEN, " ")
                   for r in records for fmt in PROMPT_FORMATS]
        start = writer.start_index(spec.name)
        if start is not None:
            indices = tqdm(range(start, len(records)), desc=spec.name, unit=" samples")
            writer.write_split(spec.name, ((i, shard_sample(i, records[i], scans)) for i in indices))
    build_word_tokenizer(corpus, out / TOKENIZER_DIR, VOCAB_LIMIT)
    shape = {"grid": None, "hires": True} if hires else {"grid": grid}
    manifest = writer.finish(source={"kind": "digits", "dataset": "sklearn.datasets.load_digits", "seed": seed,
                                     **shape, "pools": {k: len(v) for k, v in pools.items()}}, tokenizer=TOKENIZER_DIR)
    build_index(out)
    counts = {s.name: sum(e.samples for e in manifest.shards if e.split == s.name) for s in SPLITS}
    print(f"wrote {len(manifest.shards)} shards to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
