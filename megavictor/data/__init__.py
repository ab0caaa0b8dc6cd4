"""Data: WebDataset shards + manifest, the per-sample length index, the global row order and the per-rank
training data (`training_data.TrainData`). Importing the package imports nothing heavy, so `megavictor prep` and
the manifest reader stay light."""
