"""Checkpoint directories without a model: atomic commit, `latest`, `keep_last` rotation, offline reading."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavictor.checkpoint.commit import (LATEST, MARKERS, CheckpointError, commit_atomically, latest_checkpoint,
                                          resolve)
from megavictor.config import Engine


def save_step(root: Path, step: int, keep_last: int) -> Path:
    """A real commit of a checkpoint whose writer leaves one payload file and the megatron-format marker."""

    def write(tmp: Path) -> None:
        (tmp / "payload").write_text(str(step))
        (tmp / MARKERS[Engine.MEGATRON]).write_text("{}")

    return commit_atomically(root, step, write, keep_last)


def steps_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != LATEST)


def test_keep_last_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_step(tmp_path, step, keep_last=2)
    assert steps_on_disk(tmp_path) == ["step_000004", "step_000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000005"


def test_rotation_never_deletes_the_checkpoint_latest_names(tmp_path: Path) -> None:
    """`latest` may name an older step than directories on disk (a run restarted from a fallback): rotation by step
    number alone would delete it; it must survive, and incomplete directories never count."""
    for step in (10, 20, 30):
        save_step(tmp_path, step, keep_last=0)
    (tmp_path / LATEST).write_text("step_000010\n")
    (tmp_path / "step_000040.tmp").mkdir()  # a save that died: not complete, not counted, not deleted here
    save_step(tmp_path, 11, keep_last=1)  # the restarted run's next save
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000011"
    assert "step_000011" in steps_on_disk(tmp_path) and "step_000010" not in steps_on_disk(tmp_path)
    (tmp_path / LATEST).write_text("step_000011\n")
    save_step(tmp_path, 12, keep_last=1)
    save_step(tmp_path, 12, keep_last=1)  # a re-save of the same step keeps exactly one copy
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000012"
    assert (tmp_path / "step_000012" / "payload").read_text() == "12"


def test_resolve_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve(tmp_path)
    save_step(tmp_path / "run" / "checkpoints", 3, keep_last=0)
    assert resolve(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step_000003"
