"""Which samples a data-parallel rank's loader worker reads in an epoch, and in what order.

Samples are numbered globally in manifest order (shard by shard). Each epoch, the shard order is shuffled from
(seed, epoch) -- identically on every rank -- and the concatenated stream of samples is cut into
`dp_size * num_workers` contiguous ranges, one per (rank, worker) consumer. The ranges partition the epoch, so every
sample is read exactly once across ranks and workers whatever the shard count, and each consumer reads only the
shards that overlap its range. Within a range, a windowed shuffle (webdataset's buffer shuffle, computed on
indices) gives the output order, so a reader holding at most `shuffle_buffer` samples can follow it.
"""

from __future__ import annotations

import numpy as np


def consumer_range(num_samples: int, consumer: int, num_consumers: int) -> tuple[int, int]:
    """[start, end) of the epoch stream that `consumer` reads; sizes differ by at most one."""
    return consumer * num_samples // num_consumers, (consumer + 1) * num_samples // num_consumers


def window_shuffle(items: list[int], window: int, rng: np.random.Generator) -> list[int]:
    """Streaming buffer shuffle: each output is drawn from the next `window` not-yet-output inputs."""
    if window <= 1:
        return list(items)
    picks = rng.integers(0, window, len(items)).tolist()
    buffer: list[int] = []
    out: list[int] = []
    for item, pick in zip(items, picks):
        buffer.append(item)
        if len(buffer) == window:
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            out.append(buffer.pop())
    out += [buffer[i] for i in rng.permutation(len(buffer)).tolist()]
    return out


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, consumer: int, num_consumers: int,
                shuffle: bool, shuffle_buffer: int) -> tuple[list[int], list[int]]:
    """(read order, output order) of global sample indices for one consumer in one epoch."""
    starts = np.cumsum([0] + shard_sizes)
    shards = np.random.default_rng([seed, epoch, 0]).permutation(len(shard_sizes)) if shuffle \
        else np.arange(len(shard_sizes))
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards]) if len(shards) else np.zeros(0)
    lo, hi = consumer_range(int(starts[-1]), consumer, num_consumers)
    read = stream[lo:hi].astype(np.int64).tolist()
    if not shuffle:
        return read, read
    return read, window_shuffle(read, shuffle_buffer, np.random.default_rng([seed, epoch, 1, consumer]))
