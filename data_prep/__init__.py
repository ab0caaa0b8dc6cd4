"""Data preparation: LLaVA-format data and the embedded digits demo to WebDataset tar shards + manifest."""
