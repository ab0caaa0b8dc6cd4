"""`CheckpointManager`: every checkpoint a training run loads or saves goes through it.

The training loop calls it once to load (`load`) and once per step to save (`save`, which decides whether the
step is due); engines hand it their state (`checkpoint.state.TrainingState`) and never touch the checkpoint
directory. It owns:
- resuming: the checkpoint `choose_initial_weights` verified, loaded on every rank, after checking that the run
  changes none of its guarded settings (`GUARDED_*`, unless `train.allow_config_change`); one that fails to load
  on any rank is reported in one line and the next verified one tried; having fallen back, rank 0 sets the newer
  damaged checkpoints aside (`.bad`), points `latest` at the one used and protects it from rotation;
- saving: every `train.save_interval` steps and at the last step, atomically (`commit.commit_atomically`: temporary
  directory, manifest, rename, `latest`), keeping `train.keep_last`, with the run's tokenizer and HF source
  recorded inside; never while the loss or gradients are not finite (a streak of skipped steps);
- guarding against divergence: at the first non-finite step, the newest checkpoint saved before it is marked
  `pre_anomaly`, which rotation never deletes.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megavictor.checkpoint.commit import (CheckpointError, adopt_fallback, commit_atomically, describe_failure,
                                          engine_of, first_failure, latest_checkpoint, protect, reraise_interrupts,
                                          step_dir_name, step_of)
from megavictor.checkpoint.hf_source import training_source
from megavictor.checkpoint.initial_weights import (InitialWeights, WeightOrigin, checkpoints_dir,
                                                   choose_initial_weights)
from megavictor.checkpoint.state import Restored, TrainingState
from megavictor.config import Config, Engine
from megavictor.errors import notice


def checkpoint_bytes(cfg: Config) -> int:
    """A lower bound on one checkpoint of this run: every weight in fp32 (4 bytes) and, for the parameters that
    train, Adam's two moments (8 bytes); metadata, RNG states and the loop's state come on top."""
    from megavictor.model.recipe import is_trainable
    from megavictor.model.reference import full_shapes

    sizes = {name: math.prod(shape) for name, shape in full_shapes(cfg).items()}
    return sum(4 * n + (8 * n if is_trainable(name, cfg) else 0) for name, n in sizes.items())


def check_checkpoints_writable(cfg: Config) -> None:
    """Before step 1: the checkpoints folder can be created and written, and its filesystem has room for one
    checkpoint of this model (else a run would train until its first save and lose those steps). One line naming
    the folder and what to do."""
    root = checkpoints_dir(cfg)
    probe = root / f".write-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0")
    except OSError as exc:
        raise CheckpointError(f"{root} is not writable ({exc.strerror or exc}): checkpoints could not be saved; "
                              "fix its permissions or choose another train.run_dir") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    needed, free = checkpoint_bytes(cfg), shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(f"{root}: {free / 2**20:.1f} MiB free, a checkpoint of this model needs at least "
                              f"{needed / 2**20:.1f} MiB; free space or choose another train.run_dir")


# What a resumed run may not change silently: the model and its drop, the data and the lr schedule. (Layouts,
# precision, intervals and train.max_steps may change; the loader refuses a changed data order by itself.)
GUARDED_SECTIONS = ("model", "vision", "victor", "peer")
GUARDED_KEYS = ("data.path", "data.train_split", "data.tokenizer", "data.prompt_format", "data.system_prompt",
                "data.seq_length", "train.llava_stage", "train.lr", "train.min_lr", "train.warmup_steps",
                "train.weight_decay")
SCHEDULE_KEYS = ("train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay")
NOT_GUARDED = ("vision.init_from",)  # the tower a fresh run started from: irrelevant once the run has weights
PATH_KEYS = ("data.path", "data.tokenizer")  # compared as resolved paths (relative by hand, absolute under launch)


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every guarded setting that differs."""
    keys = [f"{section}.{key}" for section in GUARDED_SECTIONS for key in now.get(section, {})]
    changes = []
    for dotted in keys + list(GUARDED_KEYS):
        if dotted in NOT_GUARDED:
            continue
        section, key = dotted.split(".")
        before, after = saved.get(section, {}).get(key), now[section][key]
        if dotted in PATH_KEYS and before is not None and after is not None:
            same = Path(before).resolve() == Path(after).resolve()  # relative now, absolute under launch
        else:
            same = before == after
        if not same:
            changes.append((dotted, before, after))
    return changes


def _saved_config(path: Path) -> dict[str, Any]:
    """The config dict a checkpoint of this run was written with (old key spellings translated), without reading
    its tensors."""
    from megavictor.checkpoint import deepspeed, megatron
    from megavictor.config import config_from_dict

    if engine_of(path) == Engine.DEEPSPEED:
        data = deepspeed.read_marker(path)["config"]
    else:
        data = megatron.read_common(path).get("config") or {}
    return config_from_dict(data).to_dict()


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
            try:  # the checkpoint's config, then its state: a failure to read either means the next checkpoint
                saved, error = _saved_config(weights.checkpoint), None
            except BaseException as exc:
                reraise_interrupts(exc)
                saved, error = None, describe_failure(exc)
            error = first_failure(error)
            if error is None:
                self._check_unchanged(weights.checkpoint, saved, state)  # a user error: stops, no fallback
                self._schedule_length(weights.checkpoint, saved, state)
                try:
                    restored = state.read(weights.checkpoint)
                except BaseException as exc:  # any failure to read it: named below, then the next checkpoint
                    reraise_interrupts(exc)
                    error = describe_failure(exc)
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

    def _check_unchanged(self, checkpoint: Path, saved: dict[str, Any], state: TrainingState) -> None:
        """A resume that changes the model, the drop, the data or the lr schedule stops with one line naming the
        changes, unless `train.allow_config_change`; then the config's lr schedule replaces the checkpoint's."""
        changes = config_changes(saved, self.cfg.to_dict())
        if not changes:
            return
        listed = ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changes)
        if not self.cfg.train.allow_config_change:
            raise CheckpointError(f"resuming from {checkpoint} with changed settings: {listed}; resume with the saved "
                                  "values, start a new train.run_dir (train.init_from= the checkpoint for its "
                                  "weights), or pass train.allow_config_change=true to go on with the new ones")
        notice(f"resuming from {checkpoint} with changed settings (train.allow_config_change=true): {listed}")
        if any(key in SCHEDULE_KEYS for key, _, _ in changes):
            # megatron's scheduler keeps the checkpoint's values unless told to override them (Megatron-LM's
            # --override-opt_param-scheduler): the config's lr schedule applies from this step on.
            state.scheduler.override_opt_param_scheduler = True
            notice("the lr schedule now follows the config (train.lr, train.min_lr, train.warmup_steps, "
                   "train.weight_decay), not the checkpoint's")

    def _schedule_length(self, checkpoint: Path, saved: dict[str, Any], state: TrainingState) -> None:
        """`train.max_steps` may change on resume (a run extended), but megatron's scheduler keeps the checkpoint's
        cosine length (Megatron-LM's --use-checkpoint-opt_param-scheduler): the steps past it run at train.min_lr.
        Said once, rather than left silent; `train.allow_config_change=true` makes the config's length apply. (A
        step-0 checkpoint keeps no schedule: `TrainingState.read`.)"""
        before, after = saved["train"]["max_steps"], self.cfg.train.max_steps
        if before == after or step_of(checkpoint) == 0:
            return
        if self.cfg.train.allow_config_change:
            state.scheduler.override_opt_param_scheduler = True
            notice(f"train.max_steps {before} -> {after} (train.allow_config_change=true): the lr schedule decays "
                   f"over {after} steps from here, the config's length")
        else:
            length = max(before, saved["train"]["warmup_steps"] + 1)
            notice(f"train.max_steps {before} -> {after}: the lr schedule keeps the checkpoint's cosine decay over "
                   f"{length} steps (train.min_lr after step {length}); train.allow_config_change=true decays over "
                   f"{after} steps instead")

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

