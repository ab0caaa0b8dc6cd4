"""Streaming best-fill packing of variable-length samples into rows of `capacity` slots.

The packer holds up to `buffer_size` candidates. Once full, it builds one row: the subset of candidates that fills
it best. A candidate passed over in `max_wait` rows goes first, so no sample is delayed by more than a bounded
number of rows. Everything is deterministic
(ties by arrival order), and the buffer is describable by (key, age) pairs for resumable loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_WAIT_ROWS = 16


@dataclass
class PackItem:
    key: int
    size: int
    payload: Any
    age: int = 0  # rows built while this item waited in the buffer


class Packer:
    def __init__(self, capacity: int, buffer_size: int, max_wait: int = MAX_WAIT_ROWS) -> None:
        if buffer_size < 1:
            raise ValueError(f"pack buffer size {buffer_size} must be >= 1")
        self.capacity, self.buffer_size, self.max_wait = capacity, buffer_size, max_wait
        self.items: list[PackItem] = []

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.buffer_size

    def add(self, item: PackItem) -> None:
        if not 0 < item.size <= self.capacity:
            raise ValueError(f"item {item.key} has size {item.size}, outside 1..{self.capacity} (truncate it first)")
        self.items.append(item)

    def pop_row(self) -> list[PackItem]:
        """Remove and return one row (items in arrival order); the rest age by one row.

        Items that waited `max_wait` rows go first (oldest first, while they fit); the rest of the row is the subset
        of the buffer that fills it best (exact subset sum over the free slots, a bitset per item), preferring
        earlier arrivals among equally full choices."""
        free, chosen = self.capacity, set()
        for i, item in enumerate(self.items):
            if item.age >= self.max_wait and item.size <= free:
                chosen.add(i)
                free -= item.size
        rest = [i for i in range(len(self.items)) if i not in chosen]
        reach = np.zeros((len(rest) + 1, free + 1), dtype=bool)
        reach[0, 0] = True
        for k, i in enumerate(rest):
            size = self.items[i].size
            reach[k + 1] = reach[k]
            if size <= free:
                reach[k + 1, size:] |= reach[k, :free + 1 - size]
        best = int(np.flatnonzero(reach[-1]).max())
        for k in range(len(rest) - 1, -1, -1):  # take an item only where the sum is unreachable without it
            if not reach[k, best]:
                chosen.add(rest[k])
                best -= self.items[rest[k]].size
        row = [item for i, item in enumerate(self.items) if i in chosen]
        self.items = [item for i, item in enumerate(self.items) if i not in chosen]
        for item in self.items:
            item.age += 1
        return row

    def state(self) -> list[list[int]]:
        """[key, age] per buffered item, in buffer order; with the payloads this rebuilds the packer exactly."""
        return [[item.key, item.age] for item in self.items]
