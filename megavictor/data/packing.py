"""Streaming first-fit-decreasing packing of variable-length samples into rows of `capacity` slots.

The packer holds up to `buffer_size` candidates. Once full, it builds one row: candidates sorted by decreasing
size, each placed if it still fits. A candidate passed over in `max_wait` rows goes first, so small samples are
delayed by a bounded number of rows instead of drifting to the end of an epoch. Everything is deterministic
(ties by arrival order), and the buffer is describable by (key, age) pairs for resumable loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        """Remove and return one row (items in arrival order); the rest age by one row."""
        order = sorted(range(len(self.items)),
                       key=lambda i: (self.items[i].age < self.max_wait, -self.items[i].size, i))
        free, chosen = self.capacity, set()
        for i in order:
            if self.items[i].size <= free:
                chosen.add(i)
                free -= self.items[i].size
                if free == 0:
                    break
        row = [item for i, item in enumerate(self.items) if i in chosen]
        self.items = [item for i, item in enumerate(self.items) if i not in chosen]
        for item in self.items:
            item.age += 1
        return row

    def state(self) -> list[list[int]]:
        """[key, age] per buffered item, in buffer order; with the payloads this rebuilds the packer exactly."""
        return [[item.key, item.age] for item in self.items]
