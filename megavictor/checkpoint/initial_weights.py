"""Where a training run's initial weights come from, decided once, before any model or optimizer exists.

In order of precedence:
1. RESUME: the run directory has checkpoints; the engine loads everything from the one `latest` names (weights,
   optimizer state including fp32 main params, lr schedule, data position, RNG) after building its optimizer. When
   that one fails verification (or, in the training loop, loading), the newest one that verifies is used instead,
   saying so; when none does, the run stops with one line rather than silently starting over.
2. INIT_FROM: `train.init_from` names a checkpoint of either engine; its weights only.
3. FRESH: the layout-independent initial values (`model.weight_init`), with the ViT from `vision.init_from` when
   given.

Both engines apply the weights of 2 and 3 to the model BEFORE building the optimizer: megatron's mixed-precision
optimizers clone fp32 main parameters when constructed, so weights copied in afterwards would be overwritten by
the random init at the first step (what Megatron-LM's `checkpointing.py` guards against with
`optimizer.reload_model_params()`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import torch

from megavictor.checkpoint import CheckpointError, engine_of, load_full_state, resolve
from megavictor.checkpoint.commit import checkpoint_problem, resume_candidates
from megavictor.checkpoint.megatron import read_shapes
from megavictor.config import Config, ConfigError, Engine
from megavictor.errors import notice
from megavictor.model.reference import full_shapes, shape_problems
from megavictor.model.weight_init import initial_value


class WeightOrigin(enum.StrEnum):
    RESUME = "resume"
    INIT_FROM = "init_from"
    FRESH = "fresh"


@dataclass(frozen=True)
class InitialWeights:
    origin: WeightOrigin
    checkpoint: Path | None = None  # RESUME: the run's latest checkpoint; INIT_FROM: the resolved checkpoint
    vision_tower: Path | None = None  # FRESH: `vision.init_from`, if given
    rejected: tuple[Path, ...] = ()  # RESUME: newer checkpoints that failed verification or loading


def checkpoints_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def choose_initial_weights(cfg: Config, exclude: tuple[Path, ...] = ()) -> InitialWeights:
    """Decide the source (checking that what it names exists and fits this run); raises a one-line user error.

    `exclude`: checkpoints of this run already found unloadable (the loop asks again without them)."""
    root = checkpoints_dir(cfg)
    candidates = [path for path in resume_candidates(root) if path not in exclude]
    if candidates or exclude:
        return _resume(cfg, root, candidates, list(exclude))
    if cfg.train.init_from:
        try:
            path = resolve(cfg.train.init_from)
        except CheckpointError as exc:
            raise CheckpointError(f"train.init_from: {exc}") from None
        if engine_of(path) == Engine.MEGATRON:  # its metadata holds every shape: check now, before any model
            _check_fits(cfg, path, read_shapes(path))
        return InitialWeights(WeightOrigin.INIT_FROM, checkpoint=path)
    tower = cfg.vision.init_from
    if tower and not Path(tower).is_file():
        raise ConfigError(f"vision.init_from={tower} does not exist; for the demo, `megavictor prep digits` writes "
                          "vision_encoder.safetensors into the data folder")
    return InitialWeights(WeightOrigin.FRESH, vision_tower=Path(tower) if tower else None)


def _resume(cfg: Config, root: Path, candidates: list[Path], excluded: list[Path]) -> InitialWeights:
    """The first of `candidates` that verifies (every file's size and sha256 against its manifest)."""
    failed: list[tuple[Path, str]] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in failed:
                notice(f"cannot resume from {bad.name}: {why}")
            if failed or excluded:
                notice(f"resuming from {path} instead, the newest checkpoint that verifies")
            return _resumable(cfg, path, tuple(excluded + [bad for bad, _ in failed]))
        failed.append((path, problem))
    named = f" ({failed[0][1]})" if failed else ""
    raise CheckpointError(f"no checkpoint in {root} verifies and loads{named}; restore one, or move {root} away to "
                          "start the run over")


def _resumable(cfg: Config, path: Path, rejected: tuple[Path, ...]) -> InitialWeights:
    if engine_of(path) != cfg.train.engine:
        raise CheckpointError(f"train.run_dir={cfg.train.run_dir} holds checkpoints of train.engine="
                              f"{engine_of(path)}; resume it with that engine, or start a new run with "
                              f"train.init_from={path}")
    if engine_of(path) == Engine.MEGATRON:
        _check_fits(cfg, path, read_shapes(path), key="train.run_dir")
    return InitialWeights(WeightOrigin.RESUME, checkpoint=path, rejected=rejected)


def _check_fits(cfg: Config, path: Path, shapes: dict[str, tuple[int, ...]], key: str = "train.init_from") -> None:
    """The checkpoint at `path` (named by config key `key`) holds exactly this config's model."""
    problems = shape_problems(shapes, full_shapes(cfg))
    if problems:
        raise CheckpointError(f"{key}: {path} does not fit this config's model: {'; '.join(problems[:3])} "
                              "(check model.*, vision.* and victor.*)")


def init_from_state(cfg: Config, path: Path) -> dict[str, torch.Tensor]:
    """`train.init_from`'s full weights, which must be exactly this run's model's parameters and shapes."""
    _, full = load_full_state(path)
    _check_fits(cfg, path, {n: tuple(t.shape) for n, t in full.items()})
    return full


def vision_tower_state(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Pretrained ViT weights (`vision.init_from`): a safetensors file holding exactly the tower's full names
    (`vision.*`) with the shapes `expected` gives."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"vision.init_from={path}: cannot read a safetensors file ({exc}); for the demo, "
                          "`megavictor prep digits` writes vision_encoder.safetensors into the data folder") from exc
    problems = shape_problems({n: tuple(t.shape) for n, t in tensors.items()}, expected)
    if problems:
        raise ConfigError(f"vision.init_from={path} does not fit this config's vision tower: "
                          f"{'; '.join(problems[:3])} (check the vision.* sizes)")
    return tensors


def fresh_state(cfg: Config, weights: InitialWeights) -> dict[str, torch.Tensor]:
    """The full initial weights of a run that does not resume (DeepSpeed engine: built whole on every rank)."""
    if weights.origin == WeightOrigin.INIT_FROM:
        return init_from_state(cfg, weights.checkpoint)
    m, shapes = cfg.model, full_shapes(cfg)
    state = {name: initial_value(name, tuple(shape), m.init_method_std, m.num_layers, cfg.train.seed)
             for name, shape in shapes.items()}
    if weights.vision_tower is not None:
        state.update(vision_tower_state(weights.vision_tower,
                                        {n: tuple(s) for n, s in shapes.items() if n.startswith("vision.")}))
    return state
