"""A small LLaVA-mix-shaped data set built in seconds: `megavictor prep mix --out DIR`.

It has the shape of LLaVA's instruction mix, at toy scale: text-only conversations (~20% by default,
`text_only_fraction`), samples with one image (~55%) and with two or three (~25%, `multi_image_fraction`), images of
aspect ratios spread over 1:3 .. 3:1 (both extremes in every split) with sides of 16-160 px, PNG and JPEG, and
1-4 turns per conversation with human turns of 3-40 words and answers of 1-60 words; text-only samples are long chats
(2-4 turns, answers of 15-70 words), as ShareGPT's are in LLaVA-665k. The `<image>` markers (one per
image) sit either at the start of the first human turn or inside its text. Every image is coloured shapes or
stripes on a background, and most answers name its colour, shape, count or orientation, so there is something to
learn. All text is drawn from a fixed word list: with the prompt templates and the tokenizer's specials the
vocabulary stays under 120 tokens, so the demo configs (`model.vocab_size: 128`) train on it unchanged.

The set goes through the path users take: the generator writes LLaVA JSON + an image folder per split
(`OUT/llava/SPLIT.json`, `OUT/llava/images/`), then `data_prep.llava.prep_llava` checks and shards each split with
the word-level tokenizer built from the generated text (stored in `OUT/tokenizer`, named by the manifest, so
`data.tokenizer` stays null). `prep_llava` writes one split per output folder (a new run in a folder replaces
what is there), so each split is prepared in its own staging folder and the shards are then gathered into OUT
under one manifest (shard names are `SPLIT-NNNNNN.tar`, unique across splits) and indexed once (`index.npz`).

Layout of OUT: `manifest.json`, `index.npz`, `train-000000.tar`, `val-000000.tar`, `test-000000.tar`,
`tokenizer/`, `llava/{train,val,test}.json`, `llava/images/SPLIT/*.png|jpg`. Deterministic in its arguments:
the same arguments give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_prep.llava import RecordLimits, prep_llava
from data_prep.shards import PrepError
from megavictor.data.word_tokenizer import SPECIAL_TOKENS, build_word_tokenizer
from megavictor.data.index import INDEX_NAME, build_index
from megavictor.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from megavictor.data.tokenizer import IMAGE_TOKEN, PROMPT_FORMATS, load_tokenizer, render

SOURCE_KIND = "llava_mix"
SPLITS = ("train", "val", "test")
TOKENIZER_DIR = "tokenizer"
LLAVA_DIR = "llava"
VOCAB_LIMIT = 119  # under 120 with the specials: the demo configs' model.vocab_size is 128
MIN_SIDE, MAX_SIDE = 16, 160
MAX_ASPECT = 3.0  # width / height in [1 / MAX_ASPECT, MAX_ASPECT]
COMMON_ASPECTS = (1 / 3, 1 / 2, 3 / 4, 1.0, 4 / 3, 2.0, 3.0)  # drawn exactly 30% of the time, as in photo mixes

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
           "white": (245, 245, 245), "black": (15, 15, 15), "orange": (240, 140, 30), "purple": (140, 50, 170)}
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "stripe": "stripes"}
COUNTS = ["zero", "one", "two", "three", "four"]
ORDINALS = ["first", "second", "third"]
# Words of the filler text (preambles, stories, long answers), besides the ones above.
NOUNS = ["picture", "image", "shape", "colour", "background", "line", "story", "answer", "question", "side"]
FILLER = ["the", "a", "is", "it", "and", "with", "on", "in", "of", "this", "that", "very", "small", "large",
          "wide", "tall", "so", "then", "also", "here", "there", "we", "you", "i", "see", "think", "like", "look",
          "at", "more", "some", "each", "same", "other", "next", "to", "again", "now"]


@dataclass(frozen=True)
class MixSpec:
    """The shape of the mix (defaults: LLaVA-665k's proportions, roughly)."""

    text_only_fraction: float = 0.2
    multi_image_fraction: float = 0.25  # of all samples (at most what text-only leaves): 2-3 images
    max_turns: int = 4
    human_words: tuple[int, int] = (3, 40)
    answer_words: tuple[int, int] = (1, 60)
    # Text-only samples are long multi-turn chats (ShareGPT's in LLaVA-665k): 2-4 turns of 15-70-word answers, a
    # few hundred tokens each, so that packing makes whole rows, and micro-batches, without an image.
    text_only_answer_words: tuple[int, int] = (15, 70)
    jpeg_fraction: float = 0.3

    def check(self) -> None:
        if not 0.0 <= self.text_only_fraction <= 1.0 or not 0.0 <= self.multi_image_fraction <= 1.0:
            raise PrepError(f"the text-only fraction ({self.text_only_fraction}) and the multi-image fraction "
                            f"({self.multi_image_fraction}) must lie in [0, 1]")


@dataclass(frozen=True)
class Picture:
    """What an image shows (what its answers are about)."""

    width: int
    height: int
    colour: str
    background: str
    shape: str
    count: int

    @property
    def orientation(self) -> str:
        return "wide" if self.width > self.height * 1.15 else "tall" if self.height > self.width * 1.15 else "square"


# ------------------------------------------------------------------------------------------------ images


def image_size(rng: np.random.Generator, aspect: float | None = None) -> tuple[int, int]:
    """(width, height): sides in [MIN_SIDE, MAX_SIDE], width / height within [1/3, 3] (exactly `aspect` if given,
    else one of COMMON_ASPECTS 30% of the time and log-uniform otherwise)."""
    if aspect is None:
        aspect = (COMMON_ASPECTS[int(rng.integers(len(COMMON_ASPECTS)))] if rng.random() < 0.3
                  else math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
    ratio = max(aspect, 1 / aspect)
    long = int(rng.integers(math.ceil(MIN_SIDE * ratio), MAX_SIDE + 1))
    if ratio == MAX_ASPECT:
        long -= long % 3  # 1:3 and 3:1 exactly
    short = max(MIN_SIDE, min(long, math.ceil(long / ratio - 1e-9)))  # long / short never above `ratio`
    return (long, short) if aspect >= 1 else (short, long)


def draw_picture(picture: Picture, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (picture.width, picture.height), COLOURS[picture.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[picture.colour]
    w, h = picture.width, picture.height
    if picture.shape == "stripe":  # `count` stripes across the long side
        for k in range(picture.count):
            if w >= h:
                x = int((k + 0.25) * w / picture.count)
                draw.rectangle([x, 0, x + max(2, w // (3 * picture.count)), h - 1], fill=fill)
            else:
                y = int((k + 0.25) * h / picture.count)
                draw.rectangle([0, y, w - 1, y + max(2, h // (3 * picture.count))], fill=fill)
        return image
    cell = (w / picture.count, h) if w >= h else (w, h / picture.count)  # one shape per cell along the long side
    for k in range(picture.count):
        x0, y0 = (k * cell[0], 0.0) if w >= h else (0.0, k * cell[1])
        size = min(cell) * float(rng.uniform(0.5, 0.85))
        cx = x0 + cell[0] / 2 + float(rng.uniform(-0.5, 0.5)) * (cell[0] - size) / 2
        cy = y0 + cell[1] / 2 + float(rng.uniform(-0.5, 0.5)) * (cell[1] - size) / 2
        box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
        if picture.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif picture.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def new_picture(rng: np.random.Generator, aspect: float | None) -> Picture:
    width, height = image_size(rng, aspect)
    colour, background = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    return Picture(width, height, colour, background, str(rng.choice(list(SHAPES))), int(rng.integers(1, 4)))


# ------------------------------------------------------------------------------------------------ text


def words(rng: np.random.Generator, n: int) -> list[str]:
    """`n` words of filler text: short clauses ending in a full stop, from the fixed word list."""
    pool = FILLER + NOUNS + list(COLOURS) + list(SHAPES)
    out: list[str] = []
    while len(out) < n:
        clause = [str(w) for w in rng.choice(pool, size=min(n - len(out), int(rng.integers(3, 9))))]
        out += clause if len(out) + len(clause) + 1 >= n else clause + ["."]  # never ends in a full stop
    return out


def sentence(tokens: list[str]) -> str:
    """Words joined with spaces, punctuation attached ("a red circle ." -> "a red circle.")."""
    text = " ".join(tokens)
    for mark in (" .", " ?", " ,"):
        text = text.replace(mark, mark[1:])
    return text


def counted(n: int, shape: str) -> str:
    return f"{COUNTS[n]} {shape if n == 1 else SHAPES[shape]}"


def describe(p: Picture) -> list[str]:
    return f"the picture is {p.orientation} . it shows {counted(p.count, p.shape)} , {p.colour} on " \
           f"{p.background} .".split()


def image_questions(pictures: list[Picture]) -> list[tuple[list[str], list[str]]]:
    """(question words, answer words) this sample's images can answer."""
    def which(k: int) -> str:
        return "the image" if len(pictures) == 1 else f"the {ORDINALS[k]} image"

    qa = []
    for k, p in enumerate(pictures):
        qa += [(f"what colour are the shapes in {which(k)} ?".split(), [p.colour]),
               (f"what is the background colour of {which(k)} ?".split(), [p.background]),
               (f"what shape do you see in {which(k)} ?".split(), [p.shape]),
               (f"how many {SHAPES[p.shape]} are in {which(k)} ?".split(), [COUNTS[p.count]]),
               (f"is {which(k)} wide or tall ?".split(), [p.orientation]),
               (f"describe {which(k)} .".split(), describe(p))]
    if len(pictures) > 1:
        same = pictures[0].colour == pictures[1].colour
        qa += [("how many images are there ?".split(), [COUNTS[len(pictures)]]),
               ("do the first and second image have the same colour ?".split(),
                ["yes" if same else "no", ".", "the", "first", "is", pictures[0].colour, "and", "the", "second",
                 "is", pictures[1].colour, "."])]
    return qa


def text_questions(rng: np.random.Generator) -> list[tuple[list[str], list[str]]]:
    n = int(rng.integers(0, 4))
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(SHAPES)))
    return [(f"what comes next after {COUNTS[n]} ?".split(), [COUNTS[n + 1]]),
            (f"tell me a story about a {colour} {shape} .".split(), ["a", colour, shape, "."]),
            (f"what colour is a {colour} {shape} ?".split(), [colour]),
            (f"how many sides does a {shape} have ?".split(), [{"circle": "zero", "square": "four",
                                                                 "triangle": "three", "stripe": "four"}[shape]]),
            (f"say {colour} {COUNTS[n]} times .".split(), [colour] * n or ["no"])]


def answer_length(rng: np.random.Generator, low: int, high: int) -> int:
    """Answer words wanted: short (half), medium or long (a fifth run to `high`)."""
    u = rng.random()
    return int(rng.integers(low, min(high, 3) + 1)) if u < 0.5 else \
        int(rng.integers(4, min(high, 20) + 1)) if u < 0.8 else int(rng.integers(20, high + 1))


def conversation(rng: np.random.Generator, pictures: list[Picture], spec: MixSpec) -> list[dict[str, str]]:
    pool = image_questions(pictures) if pictures else text_questions(rng)
    turns = int(rng.integers(1 if pictures else 2, spec.max_turns + 1))
    picks = [int(k) for k in rng.choice(len(pool), size=min(turns, len(pool)), replace=False)]
    lo, hi = spec.answer_words if pictures else spec.text_only_answer_words
    h_lo, h_hi = spec.human_words
    conversations = []
    for turn, k in enumerate(picks):
        question, answer = pool[k]
        # Human turn: an optional preamble of filler, then the question; 3-40 words in all.
        want = int(rng.integers(max(h_lo, len(question)), h_hi + 1)) if rng.random() < 0.4 else len(question)
        human = words(rng, want - len(question)) + ([","] if want > len(question) else []) + question
        human = human[-h_hi:] if len(human) > h_hi else human
        # Answer: the true answer, extended with filler sentences up to the wanted length (1-60 words).
        want = max(len(answer), answer_length(rng, lo, hi) if pictures else int(rng.integers(lo, hi + 1)))
        extra = words(rng, want - len(answer))
        gpt = (answer + (["."] if extra and answer[-1] != "." else []) + extra)[:hi]
        human_text = sentence(human)
        if turn == 0 and pictures:
            if rng.random() < 0.5:  # markers first, one line each (LLaVA's usual placement)
                human_text = "\n".join([IMAGE_TOKEN] * len(pictures) + [human_text])
            else:  # markers inside the text, between its words
                cut = sorted(int(c) for c in rng.integers(0, len(human) + 1, size=len(pictures)))
                pieces, prev = [], 0
                for c in cut:
                    pieces += [sentence(human[prev:c]), IMAGE_TOKEN]
                    prev = c
                human_text = " ".join(p for p in pieces + [sentence(human[prev:])] if p)
        conversations += [{"from": "human", "value": human_text}, {"from": "gpt", "value": sentence(gpt)}]
    return conversations


# ------------------------------------------------------------------------------------------------ records


def image_counts(rng: np.random.Generator, size: int, spec: MixSpec) -> list[int]:
    """Images per sample: the mix's fractions exactly (rounded), in a random order."""
    text = round(size * spec.text_only_fraction)
    multi = min(size - text, round(size * spec.multi_image_fraction))
    counts = [0] * text + [int(n) for n in rng.integers(2, 4, size=multi)] + [1] * (size - text - multi)
    return [counts[int(i)] for i in rng.permutation(size)]


def write_split(root: Path, split: str, size: int, seed: int, spec: MixSpec) -> list[dict[str, Any]]:
    """Draw the split's records and write their images under root/images/SPLIT; the LLaVA JSON records."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    records = []
    drawn = 0  # images of the split so far: the first two are 3:1 and 1:3, so every split has both extremes
    for i, n_images in enumerate(image_counts(rng, size, spec)):
        pictures, names = [], []
        for k in range(n_images):
            aspect = MAX_ASPECT if drawn == 0 else 1 / MAX_ASPECT if drawn == 1 else None
            picture = new_picture(rng, aspect)
            ext = "jpg" if rng.random() < spec.jpeg_fraction else "png"
            name = f"{split}/{split}-{i:05d}-{k}.{ext}"
            draw_picture(picture, rng).save(root / "images" / name, **(
                {"format": "JPEG", "quality": 85} if ext == "jpg" else {"format": "PNG", "optimize": True}))
            pictures.append(picture)
            names.append(name)
            drawn += 1
        record: dict[str, Any] = {"id": f"mix-{split}-{i:05d}"}
        if names:
            record["image"] = names[0] if len(names) == 1 else names
        record["conversations"] = conversation(rng, pictures, spec)
        records.append(record)
    return records


def mix_stats(records: list[dict[str, Any]], images_dir: Path | None = None) -> dict[str, Any]:
    """Counts of the mix's shape (text-only / one / several images, turns, words; with `images_dir`, aspects)."""
    def names(r: dict[str, Any]) -> list[str]:
        image = r.get("image")
        return [] if image is None else [image] if isinstance(image, str) else image

    per = [len(names(r)) for r in records]
    turns = [len(r["conversations"]) // 2 for r in records]
    answers = [len(t["value"].split()) for r in records for t in r["conversations"][1::2]]
    humans = [len(t["value"].replace(IMAGE_TOKEN, " ").split()) for r in records for t in r["conversations"][::2]]
    stats: dict[str, Any] = {
        "samples": len(records), "text_only": per.count(0), "one_image": per.count(1),
        "multi_image": sum(n >= 2 for n in per), "images": sum(per),
        "turns": {str(t): turns.count(t) for t in sorted(set(turns))},
        "human_words": [min(humans), max(humans)], "answer_words": [min(answers), max(answers)]}
    if images_dir is not None and sum(per):
        aspects = []
        for r in records:
            for name in names(r):
                with Image.open(images_dir / name) as image:
                    aspects.append(image.width / image.height)
        stats["aspect"] = [round(min(aspects), 4), round(max(aspects), 4)]
    return stats


# ------------------------------------------------------------------------------------------------ prep


def _clear(out: Path) -> None:
    """Remove what an earlier (or interrupted) `prep mix` wrote into `out`; refuse a folder holding anything else."""
    ours = {MANIFEST_NAME, INDEX_NAME, INDEX_NAME + ".tmp.npz", MANIFEST_NAME + ".tmp", TOKENIZER_DIR, LLAVA_DIR}
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = load_manifest(out)
        if manifest.source.get("kind") != SOURCE_KIND:
            raise PrepError(f"{out} holds another data set ({manifest.source.get('kind')}); use another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".staging-")
                    and not p.name.endswith(".tar"))
    if others:
        raise PrepError(f"{out} holds files `prep mix` does not write ({', '.join(others[:3])}); use an empty or "
                        "new --out")
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def prep_mix(out: Path, samples: int = 400, seed: int = 0, text_only_fraction: float = 0.2,
             eval_samples: int = 64, multi_image_fraction: float = 0.25, maxcount: int = 10000,
             log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Write the mix to `out` (splits `train` of `samples`, `val` and `test` of `eval_samples` each; eval_samples
    0: train only) through `prep_llava`; returns each split's `mix_stats`."""
    spec = MixSpec(text_only_fraction=text_only_fraction, multi_image_fraction=multi_image_fraction)
    spec.check()
    if samples < 1 or eval_samples < 0:
        raise PrepError(f"--samples ({samples}) must be >= 1 and --eval-samples ({eval_samples}) >= 0")
    sizes = {split: size for split, size in zip(SPLITS, (samples, eval_samples, eval_samples)) if size}
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    llava = out / LLAVA_DIR
    records = {split: write_split(llava, split, size, seed, spec) for split, size in sizes.items()}
    corpus = [render(r["conversations"], fmt, SPECIAL_TOKENS["eos_token"])[0].replace(IMAGE_TOKEN, " ")
              for split in records.values() for r in split for fmt in PROMPT_FORMATS]
    try:
        build_word_tokenizer(corpus, out / TOKENIZER_DIR, VOCAB_LIMIT)
    except ValueError as exc:
        raise PrepError(str(exc)) from exc
    tokenizer = str(out / TOKENIZER_DIR)
    shards, sources = [], {}
    for split, split_records in records.items():
        json_path = llava / f"{split}.json"
        json_path.write_text(json.dumps(split_records, indent=1) + "\n", encoding="utf-8")
        staging = out / f".staging-{split}"
        with contextlib.redirect_stdout(io.StringIO()):  # its summary names the staging folder; ours follows
            prep_llava(json_path, llava / "images", staging, split=split, maxcount=maxcount, strict=True,
                       restart=True, limits=RecordLimits(tokenizer=tokenizer))
        manifest = load_manifest(staging)
        for shard in manifest.shards:
            (staging / shard.name).replace(out / shard.name)
        shards += manifest.shards
        sources[split] = manifest.source
        shutil.rmtree(staging)
    stats = {split: mix_stats(rs, llava / "images") for split, rs in records.items()}
    source = {"kind": SOURCE_KIND, "seed": seed, "spec": {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in asdict(spec).items()},
              "splits": sources, "stats": stats}
    Manifest(shards=shards, source=source, tokenizer=TOKENIZER_DIR).save(out)  # strict: nothing skipped
    build_index(out)
    for split, s in stats.items():
        log(f"{split}: {s['samples']} samples ({s['text_only']} text-only, {s['one_image']} one image, "
            f"{s['multi_image']} several), {s['images']} images, aspect {s.get('aspect')}, turns {s['turns']}")
    log(f"wrote {sum(s.samples for s in shards)} samples in {len(shards)} shards to {out} (tokenizer: "
        f"{len(load_tokenizer(tokenizer))} tokens)")
    return stats
