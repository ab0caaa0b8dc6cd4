"""LLaVA-format JSON (+ an image folder) to tar shards, checking every record and image on the way.

Shard sample members (one sample per record, `__key__` = the record's 9-digit position in the JSON list):
  `json`  UTF-8 JSON {"id", "conversations", "images": [member names in <image> order], "source_images"}
  one image member per image, its original bytes: `jpg` or `png` for a single image, `0.jpg`, `1.png`, ... for
  several; other formats (gif, webp, bmp, ...) are re-encoded to PNG. Text-only records have no image member.
Bad records are skipped and counted per reason in the manifest (with their ids), or stop the run with --strict.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_prep.shards import PrepError, ShardSetWriter, Skip
from megavictor.config import DataConfig, PromptFormat
from megavictor.data.index import build_index, index_command
from megavictor.data.tokenizer import (IMAGE_TOKEN, ChatTokenizer, conversation_problem, count_image_tokens,
                                       load_tokenizer)

_SHOWN_SKIPS = 20  # skip messages printed; the manifest lists them all


def load_records(path: Path) -> list[Any]:
    """The JSON list; invalid UTF-8 bytes survive as lone surrogates so the records holding them can be named."""
    if not path.is_file():
        raise PrepError(f"--json {path} does not exist")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise PrepError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise PrepError(f"{path}: expected a JSON list of LLaVA records, got a {type(data).__name__}")
    return data


def _non_utf8_field(value: Any, where: str) -> str | None:
    """The first field holding text that is not valid UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        return next((f for k, v in value.items() if (f := _non_utf8_field(v, f"{where}.{k}"))), None)
    elif isinstance(value, list):
        return next((f for i, v in enumerate(value) if (f := _non_utf8_field(v, f"{where}[{i}]"))), None)
    return None


def record_id(index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool):
        return str(rid).encode("utf-8", errors="backslashreplace").decode("utf-8")
    return f"#{index}"


def duplicate_ids(records: list[Any]) -> dict[int, int]:
    """Record index -> index of the earlier record with the same id (the first occurrence is kept)."""
    first: dict[str, int] = {}
    dupes: dict[int, int] = {}
    for index, record in enumerate(records):
        rid = record_id(index, record)
        if not rid.startswith("#"):
            dupes.update({index: first[rid]} if rid in first else {})
            first.setdefault(rid, index)
    return dupes


def _image_member(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) to store; raises if the image does not decode completely."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format in ("JPEG", "PNG"):
            return ("jpg" if image.format == "JPEG" else "png"), data
        out = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, format="PNG")
        return "png", out.getvalue()


@dataclass(frozen=True)
class RecordLimits:
    """What a record must satisfy beyond being well formed (`megavictor prep llava` flags)."""

    min_image_side: int = DataConfig.min_image_side
    max_image_pixels: int = DataConfig.max_image_pixels
    max_slots: int | None = None  # skip records whose v1 rendering needs more slots (needs `tokenizer`)
    image_slots: int = 584  # slots per image for `max_slots`: LLaVA-1.5's 576 visual + 8 registers
    tokenizer: str | None = None
    system: str = ""


@functools.lru_cache(maxsize=2)
def _chat(tokenizer: str, system: str) -> ChatTokenizer:
    """One chat tokenizer per worker process (loaded on first use)."""
    return ChatTokenizer(load_tokenizer(tokenizer), PromptFormat.V1, system)


def check_record(job: tuple[int, Any, int | None], images_dir: Path,
                 limits: RecordLimits = RecordLimits()) -> dict[str, Any] | Skip:
    """A shard sample for the record, or why it is skipped. Runs in the worker pool (reads the images).

    An image path must resolve (symlinks followed) inside `images_dir`; nothing outside it is ever opened."""
    index, record, duplicate_of = job
    rid = record_id(index, record)

    def skip(reason: str, message: str) -> Skip:
        return Skip(index, rid, reason, message)

    if not isinstance(record, dict):
        return skip("bad_record", f"is a JSON {type(record).__name__}, not an object")
    if rid.startswith("#"):
        return skip("missing_id", "has no string or integer 'id'")
    if duplicate_of is not None:
        return skip("duplicate_id", f"reuses the id of record #{duplicate_of}")
    if (field := _non_utf8_field(record, "record")) is not None:
        return skip("non_utf8_text", f"{field} is not valid UTF-8 text")
    conversations = record.get("conversations")
    if (problem := conversation_problem(conversations)) is not None:
        return skip("no_conversations" if not conversations else "bad_conversations", problem)
    answers = conversations[1::2]
    if any(IMAGE_TOKEN in turn["value"] for turn in answers):
        return skip("image_in_answer", "has <image> in an assistant turn (images belong to human turns)")
    if any(not turn["value"].strip() for turn in answers):
        return skip("empty_answer", "has an empty assistant turn (nothing to train on but eos)")
    image_field = record.get("image")
    names = [] if image_field is None else [image_field] if isinstance(image_field, str) else image_field
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return skip("bad_image_field", f"'image' is {image_field!r}, not a path or a list of paths")
    if (markers := count_image_tokens(conversations)) != len(names):
        return skip("image_count_mismatch", f"has {markers} <image> markers in its text but {len(names)} images")
    root = images_dir.resolve()
    members: dict[str, bytes] = {}
    for i, name in enumerate(names):
        path = (images_dir / name).resolve()
        if not path.is_relative_to(root):
            return skip("image_outside_root", f"image {name!r} resolves outside --images {images_dir} (not read)")
        if not path.is_file():
            return skip("missing_image", f"image {name!r} not found under {images_dir}")
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size  # from the header: an oversized image is refused before it is decoded
            if min(w, h) < limits.min_image_side:
                return skip("image_too_small", f"image {name!r} is {w}x{h}, a side below --min-image-side "
                                               f"{limits.min_image_side}")
            if w * h > limits.max_image_pixels:
                return skip("image_too_large", f"image {name!r} is {w}x{h}, more than --max-image-pixels "
                                               f"{limits.max_image_pixels}")
            ext, data = _image_member(data)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return skip("unreadable_image", f"image {str(path)!r} cannot be decoded ({exc})")
        members[ext if len(names) == 1 else f"{i}.{ext}"] = data
    if limits.max_slots is not None and limits.tokenizer is not None:
        tokens, _ = _chat(limits.tokenizer, limits.system).encode(conversations)
        needed = len(tokens) + len(names) * (limits.image_slots - 1)
        if needed > limits.max_slots:
            return skip("too_long", f"needs {needed} slots, more than --max-slots {limits.max_slots}")
    meta = {"id": record["id"], "conversations": conversations, "images": list(members), "source_images": names}
    return {"__key__": f"{index:09d}", **members, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def prep_llava(json_path: Path, images_dir: Path, out: Path, split: str = "train", maxcount: int = 10000,
               maxsize: int = 1_000_000_000, workers: int = 1, strict: bool = False, restart: bool = False,
               limits: RecordLimits = RecordLimits()) -> None:
    """Check and shard the records; with `limits.tokenizer`, also write the length index (else say how to)."""
    if limits.max_slots is not None and limits.tokenizer is None:
        raise PrepError("--max-slots needs --tokenizer (slots are counted in your LLM's tokens)")
    if limits.tokenizer is not None:
        load_tokenizer(limits.tokenizer)  # a folder that is no tokenizer stops here, before any shard is written
    records = load_records(json_path)
    if not images_dir.is_dir():
        raise PrepError(f"--images {images_dir} is not a directory")
    digest = hashlib.sha256(json_path.read_bytes()).hexdigest()
    writer = ShardSetWriter(out, fingerprint=f"llava/{digest}/{images_dir.resolve()}/{split}/{maxcount}/{maxsize}"
                                             f"/{limits}",
                            maxcount=maxcount, maxsize=maxsize, restart=restart)
    start = writer.start_index(split)
    if writer.resumed_shards:
        print(f"resuming an interrupted run: {writer.resumed_shards} shards already complete", file=sys.stderr)
    if start is not None:
        dupes = duplicate_ids(records)
        jobs = [(i, records[i], dupes.get(i)) for i in range(start, len(records))]
        check = functools.partial(check_record, images_dir=images_dir, limits=limits)
        # spawn, not fork: a fork of a process with threads (torch's, a test runner's) can deadlock in the child
        pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(check, jobs, chunksize=32) if pool else map(check, jobs)
            bar = tqdm(results, total=len(jobs), desc=f"prep {split}", unit=" records")
            try:
                writer.write_split(split, _reported(enumerate(bar, start), strict, out))
            except PrepError:
                writer.discard()  # --strict: leave nothing that could pass for (part of) a data set
                raise
        finally:
            if pool:
                pool.terminate()
    manifest = writer.finish(source={"kind": "llava", "json": str(json_path), "json_sha256": digest,
                                     "images": str(images_dir), "records": len(records)})
    if limits.tokenizer is not None:
        build_index(out, limits.tokenizer, limits.system)
    else:
        print(f"no --tokenizer given: before training, index the data with your LLM's tokenizer: "
              f"`{index_command(out, '<tokenizer dir>', limits.system)}`", file=sys.stderr)
    written = sum(s.samples for s in manifest.shards)
    skipped = sum(manifest.skipped.values())
    print(f"wrote {written} samples in {len(manifest.shards)} shards to {out}; skipped {skipped}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in manifest.skipped.items())}; ids in {out}/manifest.json)"
             if skipped else ""))


def _reported(items: Iterator[tuple[int, dict[str, Any] | Skip]], strict: bool, out: Path
              ) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """Pass results through, naming each bad record on stderr (or failing on the first with --strict)."""
    shown = 0
    for index, item in items:
        if isinstance(item, Skip):
            message = f"record {item.record_id!r} (#{item.index}): {item.message}"
            if strict:
                raise PrepError(f"{message} [{item.reason}]; fix the record or run without --strict to skip "
                                "and count bad records")
            shown += 1
            if shown <= _SHOWN_SKIPS:
                tqdm.write(f"skipping {message} [{item.reason}]", file=sys.stderr)
            elif shown == _SHOWN_SKIPS + 1:
                tqdm.write(f"... more records skipped; {out}/manifest.json lists them all", file=sys.stderr)
        yield index, item
