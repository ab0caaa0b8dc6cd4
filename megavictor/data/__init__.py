"""Data loading: WebDataset shards -> tokenised, packed, resumable `VictorBatch` streams.

`VictorLoader` is imported on first use, so `megavictor prep` and the manifest reader stay light (no torch).
"""

from typing import Any

__all__ = ["VictorLoader"]


def __getattr__(name: str) -> Any:
    if name == "VictorLoader":
        from megavictor.data.loader import VictorLoader

        return VictorLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
