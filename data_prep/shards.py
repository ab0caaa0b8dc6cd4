"""Deterministic, resumable writing of WebDataset tar shards plus the manifest.

Shards are written by `webdataset.ShardWriter` with fixed tar metadata (mtime 0, fixed owner, mode 0444), so the
same records in the same order give byte-identical shards. Each shard is written as `NAME.tar.tmp` and renamed
when complete; after every completed shard, `.prep-progress.json` records the finished shards and the record index
to restart at. A shard starts with an empty writer state, so a resumed run writes exactly the shards the
uninterrupted run would have. `manifest.json` is written last; without it the directory is not a data set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from megavictor.data.manifest import MANIFEST_NAME, DataError, Manifest, ShardEntry, load_manifest, sha256_file

PROGRESS_NAME = ".prep-progress.json"
TAR_METADATA: dict[str, Any] = {"user": "megavictor", "group": "megavictor", "mtime": 0, "mode": 0o444}


class PrepError(RuntimeError):
    """Prep cannot go on; the message names the record or file and what to do."""


@dataclass
class Skip:
    """A record left out of the shards, and why (reason is a short manifest key, message is for humans)."""

    index: int
    record_id: str
    reason: str
    message: str


@dataclass
class _SplitProgress:
    next_index: int = 0  # first record index not yet inside a completed shard
    done: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[list[Any]] = field(default_factory=list)  # [index, record_id, reason], index < next_index


class ShardSetWriter:
    """One output directory of shards, written split by split; resumes an unfinished run of the same input."""

    def __init__(self, out: Path, fingerprint: str, maxcount: int, maxsize: int, restart: bool = False) -> None:
        if maxcount < 1 or maxsize < 1:
            raise PrepError(f"--maxcount ({maxcount}) and --maxsize ({maxsize}) must be >= 1")
        self.out, self.fingerprint, self.maxcount, self.maxsize = out, fingerprint, maxcount, maxsize
        out.mkdir(parents=True, exist_ok=True)
        self.splits: dict[str, _SplitProgress] = {}
        progress = self._read_progress()
        if progress is not None and not (out / MANIFEST_NAME).exists() and not restart:
            if progress["fingerprint"] != fingerprint:
                raise PrepError(f"{out} holds an unfinished prep run of different input or options "
                                f"({PROGRESS_NAME}); pass --restart to discard it, or use another --out")
            self.splits = {name: _SplitProgress(s["next_index"], s["done"], [ShardEntry(**e) for e in s["shards"]],
                                                s["skipped"]) for name, s in progress["splits"].items()}
            self._verify_completed()
        else:
            self._remove_previous(progress)
        self._remove_partial()

    @property
    def resumed_shards(self) -> int:
        return sum(len(s.shards) for s in self.splits.values())

    def start_index(self, split: str) -> int | None:
        """Record index to (re)start `split` at, or None when an earlier run already finished it."""
        progress = self.splits.setdefault(split, _SplitProgress())
        return None if progress.done else progress.next_index

    def write_split(self, split: str, items: Iterable[tuple[int, dict[str, Any] | Skip]]) -> None:
        """Write `(record index, sample)` pairs from `start_index(split)` on, in index order; Skips are counted."""
        progress = self.splits[split]
        pending_skips: list[Skip] = []
        last_written = -1

        def shard_done(tmp_name: str) -> None:
            final = Path(tmp_name[: -len(".tmp")])
            os.replace(tmp_name, final)
            entry = ShardEntry(name=final.name, split=split, samples=writer.count, bytes=final.stat().st_size,
                               sha256=sha256_file(final))
            progress.shards.append(entry)
            progress.next_index = last_written + 1
            progress.skipped += [[s.index, s.record_id, s.reason] for s in pending_skips
                                 if s.index < progress.next_index]
            pending_skips[:] = [s for s in pending_skips if s.index >= progress.next_index]
            self._write_progress()

        writer: wds.ShardWriter | None = None
        try:
            for index, item in items:
                if isinstance(item, Skip):
                    pending_skips.append(item)
                    continue
                if writer is None:
                    writer = wds.ShardWriter(str(self.out / f"{split}-%06d.tar.tmp"), maxcount=self.maxcount,
                                             maxsize=self.maxsize, post=shard_done,
                                             start_shard=len(progress.shards), verbose=0, **TAR_METADATA)
                writer.write(item)
                last_written = index
        except BaseException:  # interrupted or failed: the shard in progress stays *.tmp, never renamed or listed
            if writer is not None:
                writer.post = None
                writer.close()
            raise
        if writer is not None:
            writer.close()
        progress.skipped += [[s.index, s.record_id, s.reason] for s in pending_skips]
        progress.done = True
        self._write_progress()

    def discard(self) -> None:
        """Remove what this run (and an unfinished run it resumed) wrote, e.g. after a --strict failure."""
        self._remove_previous(self._read_progress())
        self._remove_partial()

    def finish(self, source: dict[str, Any], tokenizer: str | None = None) -> Manifest:
        """Write the manifest (last, atomically) and drop the progress file."""
        skipped: dict[str, int] = {}
        skipped_ids: dict[str, list[str]] = {}
        for progress in self.splits.values():
            for _, record_id, reason in progress.skipped:
                skipped[reason] = skipped.get(reason, 0) + 1
                skipped_ids.setdefault(reason, []).append(record_id)
        manifest = Manifest(shards=[e for p in self.splits.values() for e in p.shards], source=source,
                            skipped=dict(sorted(skipped.items())), skipped_ids=dict(sorted(skipped_ids.items())),
                            tokenizer=tokenizer)
        manifest.save(self.out)
        (self.out / PROGRESS_NAME).unlink(missing_ok=True)
        return manifest

    # ------------------------------------------------------------------ progress file

    def _read_progress(self) -> dict[str, Any] | None:
        path = self.out / PROGRESS_NAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def _write_progress(self) -> None:
        data = {"fingerprint": self.fingerprint,
                "splits": {name: asdict(p) for name, p in self.splits.items()}}
        tmp = self.out / (PROGRESS_NAME + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.out / PROGRESS_NAME)

    def _verify_completed(self) -> None:
        for progress in self.splits.values():
            for entry in progress.shards:
                path = self.out / entry.name
                if not path.is_file() or sha256_file(path) != entry.sha256:
                    raise PrepError(f"{path} changed since the interrupted prep run recorded it complete; "
                                    "pass --restart to write everything again")

    def _remove_previous(self, progress: dict[str, Any] | None) -> None:
        """Start over: drop the manifest first (so the directory stops looking complete), then the old shards."""
        names: list[str] = []
        manifest_path = self.out / MANIFEST_NAME
        if manifest_path.is_file():
            try:
                names += [entry.name for entry in load_manifest(self.out).shards]
            except DataError as exc:  # someone else's manifest.json: nothing of theirs is deleted
                raise PrepError(f"--out {self.out} holds a manifest.json that is not a megavictor data set ({exc}); "
                                "choose another --out") from None
            manifest_path.unlink()
        if progress is not None:
            names += [e["name"] for s in progress["splits"].values() for e in s["shards"]]
        for name in names:
            if Path(name).name == name:  # only our own shard files, directly in --out
                (self.out / name).unlink(missing_ok=True)
        (self.out / PROGRESS_NAME).unlink(missing_ok=True)

    def _remove_partial(self) -> None:
        """Shards that were being written when a run stopped (never renamed, so never counted)."""
        for stale in self.out.glob("*.tar.tmp"):
            stale.unlink()
