"""The training job's life cycle, in the order a job lives it.

- `job`: `megavictor train` and the entry `megavictor launch` runs on every task: the run directory's lock
  (`run_lock`), what the job expects of CUDA and the attention backend it picks (`cuda_expected`), the data set's
  checks, signal handling (`stop_request`), then the loop.
- `loop`: the training loop, read top to bottom in `loop.train`: data, engine, checkpoint manager, steps, metrics
  (`metrics`), validation loss, saves.
"""
