"""Checkpoint directories: atomic commit, the `latest` pointer, rotation, and finding a checkpoint by path.

Layout under `RUN_DIR/checkpoints/` (the same for both engines' formats):
    step_000012/      a complete checkpoint
    step_000014.tmp/  one being written; never read
    latest            the name of the newest complete checkpoint, replaced atomically after the rename

A checkpoint is complete once its format's marker file exists: megatron's `dist_checkpointing` writes
`metadata.json` last; the DeepSpeed engine writes `megavictor_deepspeed.json` after DeepSpeed's files. This module
needs no process group for reading; `commit_atomically` synchronises the ranks that write.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from megavictor.config import Engine
from megavictor.errors import UserError

LATEST = "latest"
MARKERS = {Engine.MEGATRON: "metadata.json", Engine.DEEPSPEED: "megavictor_deepspeed.json"}


class CheckpointError(UserError):
    """A checkpoint the user named (or a run directory's `latest`) is missing, incomplete or incompatible."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    """The step of a `step_XXXXXX` directory."""
    return int(path.name.removeprefix("step_"))


def is_complete(path: Path) -> bool:
    """A finished checkpoint of either engine."""
    return any((path / marker).is_file() for marker in MARKERS.values())


def engine_of(path: str | Path) -> Engine:
    """Which training engine wrote the (complete) checkpoint at `path`."""
    return next(engine for engine, marker in MARKERS.items() if (Path(path) / marker).is_file())


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete checkpoint named by `latest`, or None when there is no `latest`."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(checkpoints_dir) / pointer.read_text().strip()
    if not is_complete(path):
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint; point it at a "
                              "complete step_* directory, or remove it to start over")
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint given as a step directory, a `checkpoints/` directory or a run directory."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path} is not a checkpoint, nor a run or checkpoints directory with a 'latest' file")


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete `step_*` directories, oldest step first."""
    done = [p for p in checkpoints_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
            and is_complete(p)]
    return sorted(done, key=step_of)


def prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (by step) and always the one `latest` names."""
    if keep_last <= 0:
        return
    keep = {p.name for p in complete_checkpoints(checkpoints_dir)[-keep_last:]}
    pointer = checkpoints_dir / LATEST
    if pointer.is_file():
        keep.add(pointer.read_text().strip())
    for old in complete_checkpoints(checkpoints_dir):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def commit_atomically(checkpoints_dir: str | Path, step: int, write: Callable[[Path], None],
                      keep_last: int = 0) -> Path:
    """Every rank calls `write(tmp_dir)`; then `step_XXXXXX.tmp` is renamed to `step_XXXXXX` and `latest` replaced
    (both atomic), keeping the newest `keep_last` checkpoints. A save that dies midway leaves only the .tmp dir."""
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    write(tmp)
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        prune(root, keep_last)
    _barrier()
    return final
