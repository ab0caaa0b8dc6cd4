"""`megavictor train`: the training job's entry point (CLI, signal handling, checks before anything is built); the
loop is `megavictor.training.loop`, imported only once the config and the data set have passed their checks, so
that a user error costs seconds, not megatron's import.

One process per rank: torchrun, SLURM via `megavictor launch` (whose default entry is
`megavictor.training.job:run`, with this module's `request_stop`), or a plain single process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import threading
from typing import TYPE_CHECKING

from megavictor.config import Config, ConfigError, load_config
from megavictor.data.preflight import check_data_set
from megavictor.process_lifetime import tie_forked_helpers
from megavictor.training.cuda_expected import require_cuda_if_expected, resolve_attention_backend
from megavictor.training.run_lock import acquire
from megavictor.training.stop_request import clear_stop_request, interrupt, request_stop

if TYPE_CHECKING:
    from megavictor.training.loop import Summary

__all__ = ["main", "request_stop", "run"]


def run(cfg: Config, install_signal_handlers: bool = True) -> Summary:
    """Train `cfg` in this process (one rank); SIGTERM, SIGUSR2 and a first SIGINT (Ctrl-C) save a checkpoint at the
    next step boundary, a second SIGINT stops at once.
    Rank 0 holds the run directory's lock (`megavictor.training.run_lock`) throughout; helper processes die with
    this one."""
    if cfg.peer.prune is not None:  # nothing to learn: the selections are for a checkpoint trained without them
        raise ConfigError(f"peer.prune={cfg.peer.prune} is an evaluation-time switch (training-free): train without "
                          f"it, then `megavictor eval --checkpoint RUN ... peer.prune={cfg.peer.prune} "
                          f"peer.prune_to={cfg.peer.prune_to}`")
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, request_stop)
        signal.signal(signal.SIGINT, interrupt)
    tie_forked_helpers()
    lock = acquire(cfg.train.run_dir) if os.environ.get("RANK", "0") == "0" else None  # before anything slow
    try:
        require_cuda_if_expected(cfg)  # before gloo and the CPU compatibility layer could stand in for NCCL
        resolve_attention_backend(cfg)
        check_data_set(cfg)
        if lock is not None:
            from megavictor.checkpoint.manager import check_checkpoints_writable

            check_checkpoints_writable(cfg)  # before step 1, not at the first save
        from megavictor.training.loop import train

        return train(cfg)
    finally:
        clear_stop_request()  # after, not before: a signal that arrives while the job starts up must still count
        if lock is not None:
            lock.release()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor train", description="train a Victor VLM")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 parallel.tp=2")
    args = parser.parse_args(argv)
    summary = run(load_config(args.config, args.overrides))  # a second Ctrl-C ends the process (stop_request)
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage() and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_tensor_model_parallel_rank() == 0:
        print(json.dumps(dataclasses.asdict(summary)))  # the rank that holds the loss
    return 0
