"""Data loading: WebDataset shards -> tokenised, packed, resumable `VictorBatch` streams."""

from megavictor.data.loader import VictorLoader

__all__ = ["VictorLoader"]
