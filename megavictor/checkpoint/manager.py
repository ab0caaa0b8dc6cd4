"""`CheckpointManager`: every checkpoint a training run loads or saves goes through it.

The training loop calls it once to load (`load`) and once per step to save (`save`, which decides whether the
step is due); engines hand it their state (`checkpoint.state.TrainingState`) and never touch the checkpoint
directory. It owns:
- resuming: the checkpoint `choose_initial_weights` verified, loaded on every rank; one that fails to load on any
  rank is reported in one line and the next verified one tried; having fallen back, rank 0 sets the newer damaged
  checkpoints aside (`.bad`), points `latest` at the one used and protects it from rotation;
- saving: every `train.save_interval` steps and at the last step, atomically (`commit.commit_atomically`: temporary
  directory, manifest, rename, `latest`), keeping `train.keep_last`, with the run's tokenizer and HF source
  recorded inside; never while the loss or gradients are not finite (a streak of skipped steps);
- guarding against divergence: at the first non-finite step, the newest checkpoint saved before it is marked
  `pre_anomaly`, which rotation never deletes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from megavictor.checkpoint.commit import (adopt_fallback, commit_atomically, describe_failure, first_failure,
                                          latest_checkpoint, protect, reraise_interrupts, step_dir_name)
from megavictor.checkpoint.hf_source import training_source
from megavictor.checkpoint.initial_weights import InitialWeights, WeightOrigin, checkpoints_dir, choose_initial_weights
from megavictor.checkpoint.state import Restored, TrainingState
from megavictor.config import Config
from megavictor.errors import notice


class CheckpointManager:
    def __init__(self, cfg: Config, weights: InitialWeights) -> None:
        self.cfg, self.weights = cfg, weights
        self.root = checkpoints_dir(cfg)
        self.source = training_source(cfg, weights.checkpoint)
        self.saved: Path | None = None  # the newest checkpoint of this run, loaded or saved

    def load(self, state: TrainingState) -> Restored:
        """Restore `state` from the checkpoint the run resumes from (step 0 and no loop state for a run that does
        not resume), falling back to older verified checkpoints when one fails to load on any rank."""
        weights = self.weights
        if weights.origin != WeightOrigin.RESUME:
            return Restored(step=0)
        while True:
            try:
                restored, error = state.read(weights.checkpoint), None
            except BaseException as exc:  # any failure to read it: named below, then the next checkpoint
                reraise_interrupts(exc)
                restored, error = None, describe_failure(exc)
            error = first_failure(error)
            if error is None:
                break
            notice(f"cannot resume from {weights.checkpoint}: it does not load ({error})")
            weights = choose_initial_weights(self.cfg, exclude=(*weights.rejected, weights.checkpoint))
        if weights.rejected and dist.get_rank() == 0:
            adopt_fallback(self.root, weights.checkpoint, weights.rejected)
        dist.barrier()
        self.saved = weights.checkpoint
        return restored

    def save(self, step: int, state: TrainingState, extra: dict[str, Any], last_step: bool = False,
             anomaly: bool = False) -> Path | None:
        """Save `state` and the loop's `extra` as `step` when it is due (every `train.save_interval` steps, and the
        last step unless it was just saved), not while `anomaly` (the loss or gradients of the step were not
        finite) except at the last step; the checkpoint written, else None."""
        t = self.cfg.train
        due = last_step or (t.save_interval > 0 and step % t.save_interval == 0 and not anomaly)
        if not due or (self.saved is not None and self.saved.name == step_dir_name(step)):
            return None
        self.saved = commit_atomically(self.root, step, lambda tmp: state.write(tmp, step, extra), t.keep_last,
                                       attach=self.source.write)
        return self.saved

    def guard_newest(self) -> None:
        """At the first step of a non-finite streak: rank 0 protects the newest checkpoint from rotation."""
        if dist.get_rank() == 0:
            good = latest_checkpoint(self.root)
            if good is not None:
                protect(self.root, good)

    def newest(self) -> Path | None:
        return latest_checkpoint(self.root)

