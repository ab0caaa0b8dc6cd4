"""Checkpoint directories: a verified manifest, atomic commit, the `latest` pointer, rotation, fallback candidates.

Layout under `RUN_DIR/checkpoints/` (the same for both engines' formats):
    step_000012/        a complete checkpoint: its `manifest.json` lists every file with size and sha256
    step_000014.tmp/    one being written; never read, removed when its save fails or the next save starts
    step_000012.old/    the previous copy of a step being saved again, removed once the new copy is `latest`
    step_000010.bad/    a checkpoint a restart found damaged, set aside (never read, never counted)
    latest              the name of the newest complete checkpoint, replaced atomically after the rename
    pre_anomaly         the newest checkpoint known good before a run's anomalies (non-finite steps, a damaged
                        checkpoint): `keep_last` never deletes it

A checkpoint is complete when its `manifest.json` (written last, inside the temporary directory, before the rename)
lists files that are all present with their sizes (`is_complete`, cheap: listing and rotation); it is verified when
their sha256 sums match too (`verify`, which reads everything: a restart, `init_from`, `eval`, `convert`). A
directory left by a save killed midway has no manifest, so it never counts, whatever its engine's marker says.
This module needs no process group for reading; `commit_atomically` synchronises the ranks that write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from megavictor.config import Engine
from megavictor.errors import UserError, notice

LATEST = "latest"
PRE_ANOMALY = "pre_anomaly"
MANIFEST = "manifest.json"
MARKERS = {Engine.MEGATRON: "metadata.json", Engine.DEEPSPEED: "megavictor_deepspeed.json"}
ASIDE, BAD, TMP = ".old", ".bad", ".tmp"
_STEP_NAME = re.compile(r"step_\d{6,}(\.[a-z]+)?")  # a step_* directory (also .old, .tmp, .bad)
_IGNORED_POINTERS: set[Path] = set()
_HASH_CHUNK = 1 << 22


class CheckpointError(UserError):
    """A checkpoint the user named (or a run directory's `latest`) is missing, incomplete or incompatible."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    """The step of a `step_XXXXXX` directory (or of its `.old` copy)."""
    return int(path.name.removeprefix("step_").removesuffix(ASIDE))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(root: Path, names: list[str]) -> list[str]:
    """sha256 of each file; threads, since hashlib releases the GIL on large buffers (multi-GB shards)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda name: _sha256(root / name), names))


def write_manifest(path: Path) -> None:
    """List every file under `path` with its size and sha256 in `path/manifest.json` (the last file written)."""
    names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = {name: {"size": (path / name).stat().st_size, "sha256": digest}
             for name, digest in zip(names, _checksums(path, names))}
    with (path / MANIFEST).open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path: Path, checksums: bool = True) -> str | None:
    """Why `path` is not a complete (with `checksums`: verified) checkpoint, naming the file; None if it is."""
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"{manifest} is missing (a save that did not finish)" if path.is_dir() else f"{path} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest} cannot be read ({exc})"
    for name, entry in files.items():
        try:
            size = (path / name).stat().st_size
        except OSError:
            return f"{path / name} is missing"
        if size != entry["size"]:
            return f"{path / name} has {size} bytes, the manifest says {entry['size']}"
    if checksums:
        names = list(files)
        for name, digest in zip(names, _checksums(path, names)):
            if digest != files[name]["sha256"]:
                return f"{path / name} does not match its sha256 in the manifest (its bytes changed)"
    return None


def is_complete(path: Path) -> bool:
    """A finished checkpoint of either engine: manifest present, every file it lists there with its size."""
    return checkpoint_problem(path, checksums=False) is None


def verify(path: Path) -> None:
    """Raise a one-line `CheckpointError` naming the first file of `path` that is missing or damaged."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)


def engine_of(path: str | Path) -> Engine:
    """Which training engine wrote the (complete) checkpoint at `path`."""
    return next(engine for engine, marker in MARKERS.items() if (Path(path) / marker).is_file())


def _pointer(checkpoints_dir: Path, name: str) -> str | None:
    """The checkpoint the pointer file `name` names, or None without one. A pointer that names no `step_*`
    directory (empty, `.`, a path, garbage) is ignored, saying so once: it must never turn the checkpoints
    directory itself, or anything outside it, into a candidate that could be set aside or deleted."""
    pointer = checkpoints_dir / name
    if not pointer.is_file():
        return None
    target = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if not _STEP_NAME.fullmatch(target):
        if pointer not in _IGNORED_POINTERS:
            _IGNORED_POINTERS.add(pointer)
            notice(f"{pointer} holds {target[:60]!r}, not the name of a step_* checkpoint: ignored (the newest "
                   "complete checkpoint is used instead)")
        return None
    return target


def _point(checkpoints_dir: Path, name: str, target: str) -> None:
    """Replace the pointer file `name` atomically."""
    tmp = checkpoints_dir / (name + TMP)
    tmp.write_text(target + "\n")
    os.replace(tmp, checkpoints_dir / name)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete checkpoint named by `latest`, or None when there is no `latest`."""
    root = Path(checkpoints_dir)
    name = _pointer(root, LATEST)
    if name is None:
        return None
    path = root / name
    problem = checkpoint_problem(path, checksums=False)
    if problem is not None:
        raise CheckpointError(f"{root / LATEST} names {name}, which is not a complete checkpoint ({problem}); "
                              "point it at a complete step_* directory, or remove it to start over")
    return path


def resolve(path: str | Path) -> Path:
    """A verified checkpoint given as a step directory, a `checkpoints/` directory or a run directory."""
    path = Path(path)
    if not any((path / name).is_file() for name in (MANIFEST, *MARKERS.values())):
        for root in (path, path / "checkpoints"):
            found = latest_checkpoint(root)
            if found is not None:
                path = found
                break
        else:
            raise CheckpointError(f"{path} is not a checkpoint, nor a run or checkpoints directory with a 'latest' "
                                  "file")
    verify(path)
    return path


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete `step_*` directories, oldest step first (copies set aside for a re-save included)."""
    done = [p for p in checkpoints_dir.glob("step_*") if p.is_dir() and not p.name.endswith((TMP, BAD))
            and is_complete(p)]
    return sorted(done, key=lambda p: (step_of(p), not p.name.endswith(ASIDE)))


def resume_candidates(checkpoints_dir: Path) -> list[Path]:
    """Where a restart may resume from, in order: the directory `latest` names, then every other complete one,
    newest step first. Empty when the run directory holds no checkpoint at all."""
    others = complete_checkpoints(checkpoints_dir)[::-1]
    name = _pointer(checkpoints_dir, LATEST)
    first = [checkpoints_dir / name] if name is not None else []
    return first + [p for p in others if p.name != name]


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `step_XXXXXX.bad` (kept for inspection, never read or counted again)."""
    if not _STEP_NAME.fullmatch(path.name):
        raise CheckpointError(f"refusing to set aside {path}: not a step_* checkpoint directory")
    bad = path.with_name(path.name.removesuffix(ASIDE) + BAD)
    shutil.rmtree(bad, ignore_errors=True)
    os.replace(path, bad)
    return bad


def point_latest(checkpoints_dir: Path, path: Path) -> None:
    _point(checkpoints_dir, LATEST, path.name)


def protect(checkpoints_dir: Path, path: Path) -> None:
    """Keep `path` through rotation: the newest good checkpoint before an anomaly (named by `pre_anomaly`)."""
    _point(checkpoints_dir, PRE_ANOMALY, path.name)


def adopt_fallback(checkpoints_dir: Path, chosen: Path, rejected: tuple[Path, ...]) -> None:
    """After resuming from `chosen` instead of newer, damaged checkpoints: set those aside (`.bad`), point `latest`
    at `chosen` and protect it from rotation (the newest good checkpoint before the anomaly). Rank 0 only."""
    for path in rejected:
        if path.is_dir() and not path.name.endswith(BAD):
            set_aside(path)
    point_latest(checkpoints_dir, chosen)
    protect(checkpoints_dir, chosen)


def prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (by step) and always the ones `latest` and `pre_anomaly`
    name."""
    if keep_last <= 0:
        return
    keep = {p.name for p in complete_checkpoints(checkpoints_dir)[-keep_last:]}
    keep |= {_pointer(checkpoints_dir, LATEST), _pointer(checkpoints_dir, PRE_ANOMALY)}
    for old in complete_checkpoints(checkpoints_dir):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def first_failure(message: str | None) -> str | None:
    """The first rank's failure message, or None when no rank failed (every rank calls this)."""
    if not dist.is_initialized():
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def describe_failure(exc: BaseException) -> str:
    """One line for an exception whose text may be a whole remote traceback (DCP's `CheckpointException`): its
    type and its last line, which holds the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def reraise_interrupts(exc: BaseException) -> None:
    """DCP's `CheckpointException` is a BaseException: catch broadly, but never swallow an interrupt or exit."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _amount(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def save_failure(root: Path, tmp: Path, step: int, cause: str) -> CheckpointError:
    """The one-line error of a failed save: the path, the cause, the free space left and what a checkpoint of this
    run takes (the size of the newest complete one, else what the failed save had written)."""
    written = _size(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    done = complete_checkpoints(root)
    needed = _size(done[-1]) if done else written
    free = shutil.disk_usage(root).free
    kept = _pointer(root, LATEST)
    return CheckpointError(
        f"saving step {step} into {tmp} failed ({cause}); "
        f"{_amount(free)} left on that filesystem, a checkpoint of this run needs about {_amount(needed)}; the "
        f"partial directory was removed and {'latest still names ' + kept if kept else 'no checkpoint was written'}")


def commit_atomically(checkpoints_dir: str | Path, step: int, write: Callable[[Path], None],
                      keep_last: int = 0, attach: Callable[[Path], None] | None = None) -> Path:
    """Every rank calls `write(tmp_dir)`; rank 0 then `attach(tmp_dir)` (files beside the format's own, such as the
    recorded tokenizer, `hf_source`), writes the manifest (covering them), renames `step_XXXXXX.tmp` to
    `step_XXXXXX` and replaces `latest` (both atomic), keeping the newest `keep_last` checkpoints.

    A save killed midway leaves only the .tmp dir (no manifest: never counted). A save that fails (a full disk)
    removes it and raises a one-line `CheckpointError`, `latest` untouched. Saving a step that already exists
    (a finished run restarted) never leaves `latest` naming a partial directory: the old copy is renamed to
    `.old` and `latest` pointed at it, the new copy renamed in and `latest` pointed back, then `.old` removed.
    """
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + TMP)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"step_*{TMP}"):  # saves killed midway (the run lock makes them ours)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    error: str | None = None
    try:
        write(tmp)
    except BaseException as exc:  # a full disk, a quota, an I/O error: reported below in one line
        reraise_interrupts(exc)
        error = describe_failure(exc)
    error = first_failure(error)
    if error is None and rank0:
        try:
            if attach is not None:
                attach(tmp)
            write_manifest(tmp)
        except OSError as exc:
            error = describe_failure(exc)
    error = first_failure(error)
    if error is not None:
        failure = save_failure(root, tmp, step, error) if rank0 else None
        _barrier()
        raise failure or CheckpointError(f"saving step {step} into {tmp} failed ({error})")
    if rank0:
        aside = None
        if final.exists():
            aside = final.with_name(final.name + ASIDE)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            if _pointer(root, LATEST) == final.name:
                point_latest(root, aside)
        os.replace(tmp, final)
        point_latest(root, final)
        if aside is not None:
            shutil.rmtree(aside)
        prune(root, keep_last)
    _barrier()
    return final
