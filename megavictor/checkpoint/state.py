"""What a training engine hands the checkpoint manager: its state, as an object that writes itself into a directory
and reads itself back, in the engine's format (`checkpoint.megatron`, `checkpoint.deepspeed`). The manager owns the
directories (temporary name, manifest, atomic rename, `latest`, rotation); the state only fills one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Restored:
    """What a state read back hands the training loop: the step reached and the loop's own saved state."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingState(Protocol):
    scheduler: Any  # megatron's OptimizerParamScheduler (both engines use it)

    def write(self, directory: Path, step: int, extra: dict[str, Any]) -> None:
        """Write model, optimizer, lr schedule, RNG and `extra` (the loop's state) as `step` into `directory`
        (collective: every rank calls it with the same directory)."""

    def read(self, directory: Path) -> Restored:
        """Restore everything `write` wrote, into the engine as built (any layout the format allows). A step-0
        checkpoint (`train.max_steps=0`: the initial weights, for a reshard or an export) restores its weights,
        RNG and loop state only: its optimizer never stepped, and its lr schedule decays over that run's 0 steps;
        the engine keeps the optimizer and schedule it built from this run's config, as a fresh run from those
        weights has them."""
