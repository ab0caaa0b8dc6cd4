"""The one way megavictor reads samples out of a split's tar shards.

A sample is its tar members (`{"__key__", "json", image members}`). Two access patterns, one reader:
- by byte span (`ShardReader.at`): the length index (`megavictor.data.index`) records where each sample's members
  lie in its shard, so training reads exactly the samples of its own rows, in any order, without scanning;
- streamed in shard order (`ShardReader.read`): evaluation and the digits ViT pretraining read a split front to
  back, and the index is built from such a scan (`sample_spans`).
"""

from __future__ import annotations

import bisect
import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from webdataset.tariterators import group_by_keys, tar_file_expander

from megavictor.data.manifest import DataError, ShardEntry


def sample_spans(path: Path) -> Iterator[tuple[str, int, int]]:
    """(key, start, end) per sample of a tar shard, in order: [start, end) is the byte span of its members
    (headers included), read back by `read_span`."""
    with tarfile.open(path, "r:") as tar:
        key, start, end = None, 0, 0
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            member_key = name.split(".", 1)[0]
            if member_key != key:
                if key is not None:
                    yield key, start, end
                key, start = member_key, member.offset
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if key is not None:
            yield key, start, end


def read_span(data: bytes) -> dict[str, Any]:
    """The raw sample ({"__key__", suffix: bytes}) of one sample's tar byte span."""
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, suffix = member.name.rsplit("/", 1)[-1].split(".", 1)
            sample["__key__"] = key
            sample[suffix] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return sample


class ShardReader:
    """Raw samples of one split's shards: by byte span, or streamed by global sample index."""

    def __init__(self, root: str | Path, shards: Iterable[ShardEntry]) -> None:
        shards = list(shards)
        self.paths = [Path(root) / s.name for s in shards]
        self.sizes = [s.samples for s in shards]
        self.starts = [0]
        for size in self.sizes:
            self.starts.append(self.starts[-1] + size)
        self._open: dict[int, BinaryIO] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def at(self, shard: int, start: int, end: int) -> dict[str, Any]:
        """The sample whose members lie in bytes [start, end) of shard number `shard` (the index's spans); each
        shard is opened once and kept open."""
        if shard not in self._open:
            self._open[shard] = open(self.paths[shard], "rb")  # noqa: SIM115  (closed with the reader's process)
        f = self._open[shard]
        f.seek(start)
        return read_span(f.read(end - start))

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def _samples(self, shard: int) -> Iterator[dict[str, Any]]:
        path = self.paths[shard]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing; re-run megavictor prep")
        with open(path, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))

    def read(self, indices: Iterable[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (index, raw sample). Indices moving forward within a shard are read in one pass; any other
        step reopens the shard, so callers should ask in stream order (skipped samples are read, not decoded)."""
        current, position, samples = -1, 0, iter(())
        for index in indices:
            shard, offset = self.locate(index)
            if shard != current or offset < position:
                current, position, samples = shard, 0, self._samples(shard)
            for _ in range(offset - position + 1):
                sample = next(samples, None)
                if sample is None:
                    raise DataError(f"shard {self.paths[shard]} ends before sample {offset}, but the manifest says "
                                    f"it holds {self.sizes[shard]}; re-run megavictor prep")
            position = offset + 1
            yield index, sample
