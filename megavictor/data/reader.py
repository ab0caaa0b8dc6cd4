"""Reading samples out of the tar shards (webdataset's tar iterators), addressed by global sample index."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_expander

from megavictor.data.manifest import DataError, ShardEntry


class ShardReader:
    """Streams raw samples ({"__key__", "json", image members}) of one split's shards by global index."""

    def __init__(self, root: str | Path, shards: list[ShardEntry]) -> None:
        self.paths = [Path(root) / s.name for s in shards]
        self.sizes = [s.samples for s in shards]
        self.starts = [0]
        for size in self.sizes:
            self.starts.append(self.starts[-1] + size)

    def __len__(self) -> int:
        return self.starts[-1]

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

    def read_in_order(self, stream: list[int], order: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield the samples of `order` (a permutation of part of `stream`) reading the shards in `stream` order;
        holds only the samples read ahead of their turn (bounded by the shuffle window)."""
        wanted = set(order)
        source = self.read([i for i in stream if i in wanted])
        held: dict[int, dict[str, Any]] = {}
        for index in order:
            while index not in held:
                got, sample = next(source)
                held[got] = sample
            yield index, held.pop(index)
