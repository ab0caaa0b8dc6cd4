"""Typed run configuration: dataclasses, loaded from YAML, with dotted command-line overrides.

Every section mirrors one YAML mapping (`model:`, `victor:`, ...). Unknown keys and inconsistent values raise
`ConfigError` with a one-line message that names the offending key, before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megavictor.errors import UserError, notice
from megavictor.hf_model.anyres import AnyresSpec


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the key."""


# --------------------------------------------------------------------------- enumerated values
# Every enumerated config value is one of these; YAML and overrides give the plain string, which `_check_type`
# turns into the member (a `StrEnum` member also compares equal to its string).


class VisionActivation(enum.StrEnum):
    QUICK_GELU = "quick_gelu"  # CLIP
    GELU = "gelu"


class RopeScaling(enum.StrEnum):
    LLAMA3 = "llama3"  # Llama 3.1's frequency-dependent scaling of the RoPE frequencies (long context)


class VictorMask(enum.StrEnum):
    CAUSAL = "causal"
    TEXT_BLIND = "text_blind"  # text may not attend visual tokens in layers < k (VoCo-LLaMA-style ablation)


class PruneMethod(enum.StrEnum):
    """The training-free pre-LLM selections of `peer.prune` (`megavictor.model.visual_select`)."""

    RANDOM = "random"  # B of each image's visual tokens, uniformly at random
    DIVPRUNE = "divprune"  # DivPrune: greedy max-min cosine diversity over the projected tokens
    VISIONZIP = "visionzip"  # VisionZip: the ViT [CLS]'s most attended tokens plus merged contextual ones


class PipelineSplit(enum.StrEnum):
    EVEN = "even"
    BALANCED = "balanced"  # per-stage layer counts from the cost model (megavictor.model.pipeline_split)


class PromptFormat(enum.StrEnum):
    PLAIN = "plain"  # LLaVA stage 1: image(s), caption, eos
    V1 = "v1"  # LLaVA stage 2: Vicuna v1 conversations


class ImageAspectRatio(enum.StrEnum):
    PAD = "pad"  # LLaVA-1.5: pad to square with the mean colour, then resize
    CROP = "crop"  # CLIP: shortest side to image_size, centre crop
    ANYRES = "anyres"  # LLaVA-NeXT: a base view plus the tiles of the best-fitting vision.image_grid_pinpoints grid


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"


class Fp8Format(enum.StrEnum):
    HYBRID = "hybrid"  # e4m3 forward, e5m2 gradients
    E4M3 = "e4m3"


class Fp8Recipe(enum.StrEnum):
    DELAYED = "delayed"  # scales from an amax history
    TENSORWISE = "tensorwise"  # current scaling


class Fp8AmaxAlgo(enum.StrEnum):
    MAX = "max"  # the largest amax of the history (Megatron-LM's H100 FP8 recipe)
    MOST_RECENT = "most_recent"


class AttentionBackend(enum.StrEnum):
    LOCAL = "local"  # megatron's local layers (megatron engine) / SDPA (deepspeed engine); CPU and GPU
    TE = "te"  # Transformer Engine layers (megatron engine, CUDA)
    FLASH = "flash"  # flash-attn varlen (deepspeed engine, CUDA)


class Recompute(enum.StrEnum):
    SELECTIVE = "selective"  # megatron's selective activation recompute (core attention)
    FULL = "full"  # whole layers (train.recompute_method, train.recompute_num_layers)


class RecomputeMethod(enum.StrEnum):
    UNIFORM = "uniform"  # checkpoint the input of every group of recompute_num_layers layers
    BLOCK = "block"  # checkpoint only the first recompute_num_layers layers of each pipeline stage


class Engine(enum.StrEnum):
    MEGATRON = "megatron"  # tp x pp x dp on megatron-core
    DEEPSPEED = "deepspeed"  # ZeRO data parallel on the HF-format model


# LLaVA-1.5's system prompt (conv_vicuna_v1), which it trains stage 2 with.
LLAVA_V1_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class ModelConfig:
    """The LLaMA-style language decoder (RMSNorm, SwiGLU, RoPE, untied output layer)."""

    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups; None means one per head (MHA)
    vocab_size: int = 512
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; llama3: with the four rope_* values below
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192


@dataclass
class VisionConfig:
    """A CLIP-style ViT on RGB images (pre-LayerNorm, class token, learned positions) + the LLaVA-1.5 projector.

    The visual tokens handed to the LLM are the last ViT layer's patch outputs (class token dropped). To mirror
    LLaVA's `vision_feature_layer=-2`, build the ViT with one layer fewer than the checkpoint has.
    """

    image_size: int = 32
    patch_size: int = 8
    num_layers: int = 2
    hidden_size: int = 48
    ffn_hidden_size: int = 192
    num_attention_heads: int = 4
    activation: VisionActivation = VisionActivation.QUICK_GELU
    norm_epsilon: float = 1e-5
    freeze: bool = True
    # Pretrained tower weights (safetensors, names `vision.*` as in the full model), loaded when a run starts
    # fresh; a run that resumes or starts from `train.init_from` takes the tower from that checkpoint instead.
    init_from: str | None = None
    # LLaVA-NeXT's "anyres" (with data.image_aspect_ratio: anyres): the candidate tile grids, [height, width] in
    # pixels, multiples of image_size (llava-v1.6: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]).
    # Each image then takes a base view plus its grid's tiles through the ViT, and a learned `image_newline` ends
    # each row of its visual tokens; null: one image_size view per image (LLaVA-1.5).
    image_grid_pinpoints: list[list[int]] | None = None

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens of one ViT view (an image at fixed resolution, one tile under anyres)."""
        return (self.image_size // self.patch_size) ** 2

    def anyres(self) -> AnyresSpec | None:
        """The anyres settings, or None at fixed resolution."""
        if self.image_grid_pinpoints is None:
            return None
        return AnyresSpec(tuple((h, w) for h, w in self.image_grid_pinpoints), self.image_size, self.patch_size)

    @property
    def max_visual_tokens(self) -> int:
        """The most visual tokens one image can take (under anyres, its largest grid kept whole)."""
        spec = self.anyres()
        return self.num_visual_tokens if spec is None else spec.max_tokens


@dataclass
class VictorConfig:
    """Visual Compact Token Registers: R learnable registers after each image, visual tokens dropped at layer k."""

    enabled: bool = True
    num_registers: int = 8
    drop_layer: int = 3
    mask: VictorMask = VictorMask.CAUSAL

    @property
    def registers_per_image(self) -> int:
        """Register slots the data pipeline reserves after each image (0 for the plain LLaVA baseline)."""
        return self.num_registers if self.enabled else 0


@dataclass
class PeerConfig:
    """The token-reduction methods the Victor paper compares with, as switches on the same model and recipe
    (`megavictor.model.peers`). Megatron engine only; no HF export."""

    # FastV: layers >= K see only the top `fastv_keep` share of each image's visual tokens, ranked by the attention
    # (head mean, layer K-1) they receive from the slot that predicts the first answer token. Needs
    # victor.enabled=false; set at inference only (`megavictor eval ... peer.fastv_layer=K`) it is training-free.
    fastv_layer: int | None = None
    fastv_keep: float = 0.5
    # PyramidDrop (Xing et al., CVPR 2025): FastV's ranking at several layers. From `pyramid_layers[i]` on each image
    # keeps its `pyramid_keep[i]` visual tokens (of those the previous stage kept) that the last instruction tokens
    # attend most in the layer before; the count shrinks stage by stage. Needs victor.enabled=false.
    pyramid_layers: list[int] | None = None
    pyramid_keep: list[int] | None = None
    # A fixed compressor: each image's visual tokens average-pooled (over the patch grid) to this many tokens, which
    # fill the register slots; with victor.drop_layer=0 the LLM never sees the visual tokens themselves.
    avg_pool_to: int | None = None
    # Training-free selections (set at evaluation, on a checkpoint trained without them): each image's visual tokens
    # reduced to `prune_to` tokens (random, DivPrune or VisionZip), which fill the register slots like the average
    # pool's (victor.enabled=true victor.num_registers=prune_to victor.drop_layer=0).
    prune: PruneMethod | None = None
    prune_to: int | None = None

    @property
    def reads_attention(self) -> bool:
        """Whether a peer ranks visual tokens by attention probabilities (FastV, PyramidDrop), which only megatron's
        local attention exposes."""
        return self.fastv_layer is not None or self.pyramid_layers is not None


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallel is whatever is left of the world size."""

    tp: int = 1
    pp: int = 1
    pp_split: PipelineSplit | list[int] = PipelineSplit.EVEN  # or explicit per-stage layer counts
    sequence_parallel: bool = False  # needs tp > 1; data.seq_length a multiple of tp
    # Data-parallel gradient reduce(-scatter) and parameter all-gather overlapped with compute, in buckets
    # (megatron DDP); null: on when CUDA is present (the all-gather also needs the distributed optimizer).
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None
    ddp_bucket_size: int | None = None  # parameters per bucket; null: megatron's max(40M, 1M x dp size)
    # Static short lengths (after the Victor drop) for pipeline sends (pp > 1): each step's short length is rounded
    # up to the smallest bucket that fits (else data.seq_length), so p2p needs no per-send shape exchange. null:
    # exact lengths, exchanged before each send.
    pipeline_length_buckets: list[int] | None = None


@dataclass
class DataConfig:
    """Where the WebDataset shards are and how samples are packed into sequences."""

    path: str = "data/digits"
    train_split: str = "vqa_train"
    val_split: str = "vqa_val"
    test_split: str = "vqa_test"
    tokenizer: str | None = None  # HF tokenizer dir; None: the one stored beside the shards
    prompt_format: PromptFormat = PromptFormat.V1
    system_prompt: str = LLAVA_V1_SYSTEM_PROMPT  # v1 only; the text before the first USER turn
    seq_length: int = 256
    text_length: int = 64  # typical text tokens per image sample; used by the pipeline cost model
    micro_batch_size: int = 1
    # Decoding processes per rank, each `prefetch` micro-batches ahead of the training step (0: decode in the training
    # process). null: 4 on CUDA (batches pinned for asynchronous copies), 0 on the CPU.
    num_workers: int | None = None
    prefetch: int = 2  # micro-batches each worker decodes ahead
    shuffle_buffer: int | None = None  # deprecated: the row order shuffles the whole split every epoch
    pack_buffer: int = 64
    seed: int = 1234
    image_aspect_ratio: ImageAspectRatio = ImageAspectRatio.PAD
    min_image_side: int = 8  # samples with a smaller image are skipped (counted)
    max_image_pixels: int = 40_000_000  # samples with a larger image are skipped (counted)
    verify_sha256: bool = False  # check every shard's sha256 against the manifest at start-up (sizes always)


@dataclass
class TrainConfig:
    """Optimisation and run-directory settings."""

    run_dir: str = "runs/default"
    max_steps: int = 10
    global_batch_size: int = 4  # packed sequences per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    llava_stage: int = 2  # LLaVA's training stage: 1 trains projector + registers, 2 also the LLM (was `train.stage`)
    init_from: str | None = None
    save_interval: int = 0
    keep_last: int = 2
    # Consecutive steps with a non-finite loss or gradient norm (each skipped, not applied) before the run stops.
    max_nonfinite_steps: int = 3
    # Resuming with a changed model, drop, data or lr schedule (`checkpoint.manager.GUARDED_KEYS`) stops with
    # one line naming the changes; true goes on with the new values (the lr schedule then follows the config).
    allow_config_change: bool = False
    eval_interval: int = 0  # steps between validation-loss evaluations (0: only at the end)
    eval_batches: int = 4  # micro-batches of the val split per evaluation
    precision: Precision = Precision.FP32
    grad_reduce_dtype: Precision = Precision.FP32  # data-parallel gradient reduction (megatron engine); bf16 halves it
    distributed_optimizer: bool = False  # megatron engine: optimizer state and fp32 main params sharded over dp
    fp8: Fp8Format | None = None  # Transformer Engine, GPU only
    fp8_recipe: Fp8Recipe = Fp8Recipe.DELAYED
    # Delayed scaling, with Megatron-LM's H100 FP8 recipe as defaults (examples/llama/train_llama3_8b_h100_fp8.sh).
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Fp8AmaxAlgo = Fp8AmaxAlgo.MAX
    fp8_margin: int = 0
    # null: chosen at start-up (`megavictor.training.cuda_expected.resolve_attention_backend`): te (THD, fused
    # attention) on CUDA with Transformer Engine installed, else local.
    attention_backend: AttentionBackend | None = None
    recompute: Recompute | None = None  # megatron engine
    recompute_method: RecomputeMethod = RecomputeMethod.UNIFORM  # with recompute=full
    recompute_num_layers: int = 1  # with recompute=full: layers per checkpointed group (uniform) / per stage (block)
    engine: Engine = Engine.MEGATRON
    zero_stage: int = 2  # deepspeed engine: 1 optimizer states, 2 + gradients, 3 + parameters sharded
    gradient_checkpointing: bool = False  # deepspeed engine: recompute each decoder and ViT layer in backward


@dataclass
class LogConfig:
    wandb: bool = True
    project: str = "megavictor"
    log_interval: int = 1  # steps between wandb logs and progress-bar updates; metrics.jsonl records every step


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    victor: VictorConfig = field(default_factory=VictorConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (enum members as their strings)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Coerce `value` to the field's annotated type (int -> float allowed) or raise naming `key`."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in hints:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {_type_name(annotation)})")
    for hint in hints:
        origin = typing.get_origin(hint)
        if isinstance(hint, type) and issubclass(hint, enum.Enum) and isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be {_type_name(annotation)}") from None
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is bool and isinstance(value, bool):
            return value
        if hint is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(hint)
            return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    raise ConfigError(f"{key}={value!r} must be {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    enums = [h for h in hints if isinstance(h, type) and issubclass(h, enum.Enum)]
    if annotation in (int, float, str, bool):
        return f"a{'n' * (annotation is int)} {annotation.__name__}"
    if len(hints) == 2 and type(None) in hints and not any(isinstance(h, type) and issubclass(h, enum.Enum)
                                                            for h in hints):
        return _type_name(next(h for h in hints if h is not type(None))) + " or null"
    if enums:
        others = {type(None): "null", list[int]: "a list of integers"}
        return "one of " + ", ".join([m.value for m in enums[0]] + [others[h] for h in hints if h in others])
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if name not in fields:
            raise ConfigError(f"unknown key {key} (known: {', '.join(sorted(fields))})")
        setattr(section, name, _check_type(key, value, hints[name]))


# Renamed keys, old spelling -> new: the old one still works, with a one-line notice. "stage" alone means a pipeline
# stage everywhere else.
RENAMED_KEYS = {("train", "stage"): ("train", "llava_stage")}


def _renamed(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with renamed keys under their new names (each old one named in a notice; both given: an error)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, old), (_, new) in RENAMED_KEYS.items():
        values = out.get(section)
        if isinstance(values, dict) and old in values:
            if new in values:
                raise ConfigError(f"{section}.{old} is the old name of {section}.{new}: give only {section}.{new}")
            values[new] = values.pop(old)
            notice(f"{section}.{old} is deprecated: it is now {section}.{new}")
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(Config)}
    for name, values in _renamed(data or {}).items():
        if name not in sections:
            raise ConfigError(f"unknown key {name} (known sections: {', '.join(sorted(sections))})")
        _apply(getattr(cfg, name), values, name)
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["victor.num_registers=16", "parallel.tp=2"] into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {dotted!r} must be section.key (e.g. parallel.tp=2)")
        nested.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = config_from_dict(_merge(data, parse_overrides(overrides or [])))
    validate(cfg)
    if cfg.data.shuffle_buffer is not None:
        print(f"megavictor: warning: data.shuffle_buffer={cfg.data.shuffle_buffer} is deprecated and ignored: the "
              "row order shuffles the whole split every epoch (data.seed); remove the key", file=sys.stderr)
    return cfg


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of `cfg` with dotted overrides applied (e.g. inference settings on a checkpoint's config)."""
    out = config_from_dict(_merge(cfg.to_dict(), parse_overrides(overrides)))
    validate(out)
    return out


# --------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_ranges(cfg: Config) -> None:
    """Every numeric value within its meaningful range (NaN and infinities refused), named by its key."""
    m, v, vi, p, d, t, log = cfg.model, cfg.vision, cfg.victor, cfg.parallel, cfg.data, cfg.train, cfg.log
    at_least = {
        1: [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
            ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.num_attention_heads", m.num_attention_heads),
            ("model.num_query_groups", m.num_query_groups or 1), ("model.vocab_size", m.vocab_size),
            ("vision.image_size", v.image_size), ("vision.patch_size", v.patch_size),
            ("vision.num_layers", v.num_layers), ("vision.hidden_size", v.hidden_size),
            ("vision.num_attention_heads", v.num_attention_heads), ("vision.ffn_hidden_size", v.ffn_hidden_size),
            ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("data.seq_length", d.seq_length),
            ("data.text_length", d.text_length), ("data.micro_batch_size", d.micro_batch_size),
            ("data.pack_buffer", d.pack_buffer), ("data.prefetch", d.prefetch),
            ("data.min_image_side", d.min_image_side), ("data.max_image_pixels", d.max_image_pixels),
            ("train.global_batch_size", t.global_batch_size), ("train.eval_batches", t.eval_batches),
            ("train.max_nonfinite_steps", t.max_nonfinite_steps),
            ("train.fp8_amax_history_len", t.fp8_amax_history_len),
            ("log.log_interval", log.log_interval)],
        0: [("victor.num_registers", vi.num_registers), ("data.num_workers", d.num_workers or 0), ("data.seed", d.seed),
            ("train.max_steps", t.max_steps), ("train.warmup_steps", t.warmup_steps), ("train.seed", t.seed),
            ("train.save_interval", t.save_interval), ("train.keep_last", t.keep_last),
            ("train.eval_interval", t.eval_interval), ("train.fp8_margin", t.fp8_margin)],
    }
    for low, items in at_least.items():
        for key, value in items:
            _require(value >= low, f"{key}={value} must be >= {low}")
    positive = [("model.rotary_base", m.rotary_base), ("model.norm_epsilon", m.norm_epsilon),
                ("model.rope_scaling_factor", m.rope_scaling_factor),
                ("model.rope_low_freq_factor", m.rope_low_freq_factor),
                ("model.rope_original_max_position_embeddings", m.rope_original_max_position_embeddings),
                ("model.init_method_std", m.init_method_std), ("vision.norm_epsilon", v.norm_epsilon),
                ("train.lr", t.lr), ("train.adam_eps", t.adam_eps)]
    non_negative = [("train.min_lr", t.min_lr), ("train.weight_decay", t.weight_decay),
                    ("train.clip_grad", t.clip_grad)]
    for key, value in positive + non_negative:
        _require(math.isfinite(value), f"{key}={value} must be a finite number")
    for key, value in positive:
        _require(value > 0, f"{key}={value} must be > 0")
    for key, value in non_negative:
        _require(value >= 0, f"{key}={value} must be >= 0 (0 turns it off)" if key == "train.clip_grad"
                 else f"{key}={value} must be >= 0")
    _require(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check ranges and cross-field consistency; with `world_size`, also that tp x pp divides it."""
    m, v, vi, p, d, t = cfg.model, cfg.vision, cfg.victor, cfg.parallel, cfg.data, cfg.train
    _check_ranges(cfg)
    _require(m.rope_high_freq_factor > m.rope_low_freq_factor,
             f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed model.rope_low_freq_factor="
             f"{m.rope_low_freq_factor}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
    _require(m.num_attention_heads % groups == 0,
             f"model.num_query_groups={groups} does not divide model.num_attention_heads={m.num_attention_heads}")
    _require(v.hidden_size % v.num_attention_heads == 0,
             f"vision.hidden_size={v.hidden_size} is not divisible by vision.num_attention_heads={v.num_attention_heads}")
    _require(v.image_size % v.patch_size == 0,
             f"vision.image_size={v.image_size} is not divisible by vision.patch_size={v.patch_size}")

    # Tensor parallel: every split dimension must divide.
    for key, value in [
        ("model.num_attention_heads", m.num_attention_heads), ("model.num_query_groups", groups),
        ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size),
        ("vision.num_attention_heads", v.num_attention_heads), ("vision.ffn_hidden_size", v.ffn_hidden_size),
    ]:
        _require(value % p.tp == 0, f"{key}={value} is not divisible by parallel.tp={p.tp}")

    # Pipeline parallel.
    _require(p.pp <= m.num_layers, f"parallel.pp={p.pp} is larger than model.num_layers={m.num_layers}")
    if isinstance(p.pp_split, list):
        _require(len(p.pp_split) == p.pp,
                 f"parallel.pp_split has {len(p.pp_split)} entries but parallel.pp={p.pp}")
        _require(all(n >= 1 for n in p.pp_split), f"parallel.pp_split={p.pp_split}: every stage needs >= 1 layer")
        _require(sum(p.pp_split) == m.num_layers,
                 f"parallel.pp_split={p.pp_split} sums to {sum(p.pp_split)}, not model.num_layers={m.num_layers}")
    if world_size is not None:
        _require(world_size % (p.tp * p.pp) == 0,
                 f"parallel.tp={p.tp} x parallel.pp={p.pp} does not divide the world size {world_size}")

    # Victor.
    _require(0 <= vi.drop_layer < m.num_layers,
             f"victor.drop_layer={vi.drop_layer} must be in [0, model.num_layers={m.num_layers})")
    _validate_parallel_features(cfg)

    # Data and training.
    _validate_anyres(cfg)
    image_slots = v.max_visual_tokens + vi.registers_per_image
    _require(d.seq_length > image_slots,
             f"data.seq_length={d.seq_length} must exceed one image's slots "
             f"({v.max_visual_tokens} visual{' at most (anyres)' if v.anyres() else ''} + "
             f"{vi.registers_per_image} registers)")
    _require(t.llava_stage in (1, 2), f"train.llava_stage={t.llava_stage} must be 1 or 2 (the LLaVA training stage)")
    _require(t.fp8 is None or d.seq_length % 16 == 0,
             f"data.seq_length={d.seq_length} must be a multiple of 16 with train.fp8 (FP8 GEMM alignment)")
    _require(t.fp8 is None or t.attention_backend in (None, "te"),
             f"train.fp8={t.fp8} needs train.attention_backend=te (Transformer Engine on a CUDA GPU)")
    _require(t.grad_reduce_dtype == Precision.FP32 or t.precision == Precision.BF16,
             f"train.grad_reduce_dtype={t.grad_reduce_dtype} needs train.precision=bf16 (fp32 training reduces fp32 "
             "gradients)")
    _validate_peer(cfg)
    _validate_engine(cfg)
    per_step = d.micro_batch_size * (world_size // (p.tp * p.pp) if world_size else 1)
    _require(t.global_batch_size % per_step == 0,
             f"train.global_batch_size={t.global_batch_size} is not a multiple of data.micro_batch_size="
             f"{d.micro_batch_size} x data-parallel size")


def _validate_peer(cfg: Config) -> None:
    """FastV and PyramidDrop rank by the attention probabilities of the layer before each drop (megatron's local
    attention, one pipeline stage, no Victor drop); the average pool and the training-free selections
    (`peer.prune`) fill the register slots, so they need exactly that many and the drop at 0."""
    pe, vi, t, p = cfg.peer, cfg.victor, cfg.train, cfg.parallel
    n_layers, visual = cfg.model.num_layers, cfg.vision.num_visual_tokens
    used = [key for key, value in (("peer.fastv_layer", pe.fastv_layer), ("peer.pyramid_layers", pe.pyramid_layers),
                                   ("peer.avg_pool_to", pe.avg_pool_to), ("peer.prune", pe.prune)) if value is not None]
    _require(len(used) <= 1, f"{' and '.join(used)} are alternatives: set one of them")
    _require((pe.prune is None) == (pe.prune_to is None),
             f"peer.prune={pe.prune} and peer.prune_to={pe.prune_to} go together: set both (the method and the tokens "
             "it keeps per image) or neither")
    _require(not used or t.engine == Engine.MEGATRON,
             f"{used[0] if used else ''} needs train.engine=megatron (the peers have no HF implementation)")
    _require(0 < pe.fastv_keep <= 1, f"peer.fastv_keep={pe.fastv_keep} must be in (0, 1]")
    if pe.fastv_layer is not None:
        k = pe.fastv_layer
        _require(1 <= k < n_layers, f"peer.fastv_layer={k} must be in [1, model.num_layers={n_layers})")
    _validate_pyramid(pe, n_layers, visual)
    ranked = next((f"{key}={value}" for key, value in (("peer.fastv_layer", pe.fastv_layer),
                                                       ("peer.pyramid_layers", pe.pyramid_layers))
                   if value is not None), None)
    if ranked is not None:
        _require(not vi.enabled, f"{ranked} replaces the Victor drop: set victor.enabled=false")
        _require(p.pp == 1, f"{ranked} needs parallel.pp=1 (the kept slots are chosen during the "
                            "forward; later pipeline stages could not know them)")
        _require(t.attention_backend in (None, AttentionBackend.LOCAL),
                 f"{ranked} needs train.attention_backend=local (it reads the attention probabilities)")
    for key, r in (("peer.avg_pool_to", pe.avg_pool_to), ("peer.prune_to", pe.prune_to)):
        if r is None:
            continue
        _require(1 <= r <= visual, f"{key}={r} must be in [1, {visual}] (the visual tokens per image)")
        _require(vi.enabled and vi.num_registers == r and vi.drop_layer == 0,
                 f"{key}={r} fills the register slots: set victor.enabled=true victor.num_registers={r} "
                 "victor.drop_layer=0")


def _validate_pyramid(pe: PeerConfig, n_layers: int, visual: int) -> None:
    """PyramidDrop's stages: one kept count per drop layer, the layers ascending inside the decoder (layer 0 has
    no earlier attention to rank by), the counts shrinking from fewer than an image's visual tokens to at least one."""
    layers, keep = pe.pyramid_layers, pe.pyramid_keep
    if layers is None or keep is None:
        _require(layers is None and keep is None,
                 f"peer.pyramid_layers={layers} and peer.pyramid_keep={keep} go together: set both (the drop layers "
                 "and the visual tokens each image keeps from each of them) or neither")
        return
    _require(len(layers) > 0 and len(layers) == len(keep),
             f"peer.pyramid_layers={layers} and peer.pyramid_keep={keep} must be non-empty lists of one length (a "
             "kept count per drop layer)")
    _require(all(1 <= k < n_layers for k in layers) and all(a < b for a, b in zip(layers, layers[1:])),
             f"peer.pyramid_layers={layers} must ascend strictly, each in [1, model.num_layers={n_layers})")
    _require(keep[0] < visual and keep[-1] >= 1 and all(a > b for a, b in zip(keep, keep[1:])),
             f"peer.pyramid_keep={keep} must decrease strictly, from below vision.num_visual_tokens={visual} "
             "(the visual tokens per image) to at least 1")


def _validate_anyres(cfg: Config) -> None:
    """LLaVA-NeXT's anyres: the grids and the data setting go together; the peers that assume one square grid of
    visual tokens per image (FastV's per-image ranking, the average pool, the `peer.prune` selections) and the
    DeepSpeed engine (whose HF model is LLaVA-1.5's) are not built for it yet."""
    v, d, pe, t = cfg.vision, cfg.data, cfg.peer, cfg.train
    pins = v.image_grid_pinpoints
    anyres = d.image_aspect_ratio == ImageAspectRatio.ANYRES
    _require(anyres == (pins is not None),
             "data.image_aspect_ratio=anyres needs vision.image_grid_pinpoints (the candidate tile grids)" if anyres
             else f"vision.image_grid_pinpoints is set: set data.image_aspect_ratio=anyres (now "
                  f"{d.image_aspect_ratio}), or remove the grids")
    if pins is None:
        return
    _require(len(pins) > 0, "vision.image_grid_pinpoints is empty: give at least one [height, width] grid")
    for i, pin in enumerate(pins):
        _require(len(pin) == 2 and all(side > 0 and side % v.image_size == 0 for side in pin),
                 f"vision.image_grid_pinpoints[{i}]={pin} must be [height, width], each a positive multiple of "
                 f"vision.image_size={v.image_size} (a grid of whole tiles)")
    for key, value in (("peer.fastv_layer", pe.fastv_layer), ("peer.pyramid_layers", pe.pyramid_layers),
                       ("peer.avg_pool_to", pe.avg_pool_to), ("peer.prune", pe.prune)):
        _require(value is None, f"{key}={value} is not supported with anyres images (it assumes one square grid of "
                                "visual tokens per image): remove vision.image_grid_pinpoints or the peer")
    _require(t.engine == Engine.MEGATRON, f"train.engine={t.engine} does not train anyres images yet: use "
                                          "train.engine=megatron")


def _validate_parallel_features(cfg: Config) -> None:
    """Sequence parallelism, full recompute, DDP buckets and pipeline length buckets."""
    p, d, t = cfg.parallel, cfg.data, cfg.train
    if p.sequence_parallel:
        _require(p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
        _require(d.seq_length % p.tp == 0, f"data.seq_length={d.seq_length} must be a multiple of parallel.tp={p.tp} "
                                           "with parallel.sequence_parallel=true (each rank holds an equal slice)")
    _require(t.recompute_num_layers >= 1, f"train.recompute_num_layers={t.recompute_num_layers} must be >= 1")
    _require(p.ddp_bucket_size is None or p.ddp_bucket_size >= 1,
             f"parallel.ddp_bucket_size={p.ddp_bucket_size} must be >= 1 (or null)")
    buckets = p.pipeline_length_buckets
    if buckets is not None:
        _require(bool(buckets) and all(0 < b <= d.seq_length for b in buckets),
                 f"parallel.pipeline_length_buckets={buckets} must be lengths in [1, data.seq_length={d.seq_length}]")
        _require(buckets == sorted(set(buckets)), f"parallel.pipeline_length_buckets={buckets} must increase")
        align = math.lcm(16 if t.fp8 else 1, p.tp if p.sequence_parallel else 1)
        _require(all(b % align == 0 for b in buckets),
                 f"parallel.pipeline_length_buckets={buckets} must be multiples of {align} (train.fp8: 16, "
                 "sequence parallelism: parallel.tp)")


def _validate_engine(cfg: Config) -> None:
    """What each engine supports: megatron has tp/pp, TE and FP8; deepspeed trains the HF model data parallel."""
    p, t, vi = cfg.parallel, cfg.train, cfg.victor
    if t.engine == "megatron":
        _require(t.attention_backend != "flash",
                 "train.attention_backend=flash is the deepspeed engine's (flash-attn); megatron takes local or te")
        _require(not t.gradient_checkpointing,
                 "train.gradient_checkpointing is the deepspeed engine's; the megatron engine uses train.recompute")
        return
    _require(t.zero_stage in (1, 2, 3), f"train.zero_stage={t.zero_stage} must be 1, 2 or 3")
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp)):
        _require(value == 1, f"{key}={value}: train.engine=deepspeed is data parallel only ({key} must be 1)")
    _require(not p.sequence_parallel, "parallel.sequence_parallel=true needs train.engine=megatron")
    # null (chosen at start-up) is local (SDPA) on this engine.
    _require(t.attention_backend in (None, "local", "flash"),
             f"train.attention_backend={t.attention_backend!r}: train.engine=deepspeed takes local (SDPA) or flash")
    _require(t.attention_backend != "flash" or t.precision == Precision.BF16,
             f"train.attention_backend=flash with train.precision={t.precision} and train.engine=deepspeed: flash-attn "
             "has no fp32 kernels; set train.precision=bf16, or train.attention_backend=local (SDPA)")
    _require(t.fp8 is None, f"train.fp8={t.fp8} needs train.engine=megatron (Transformer Engine layers)")
    _require(not t.distributed_optimizer, "train.distributed_optimizer=true is the megatron engine's; "
                                          "train.engine=deepspeed shards the optimizer with train.zero_stage")
    _require(t.grad_reduce_dtype == Precision.FP32,
             f"train.grad_reduce_dtype={t.grad_reduce_dtype} is the megatron engine's; DeepSpeed reduces in its own "
             "precision")
    _require(t.recompute is None,
             f"train.recompute={t.recompute} is the megatron engine's; use train.gradient_checkpointing=true")
    _require(vi.enabled, "victor.enabled=false: train.engine=deepspeed trains the HF Victor model; train the plain "
                         "LLaVA baseline with train.engine=megatron")
    _require(vi.mask == "causal", f"victor.mask={vi.mask!r} has no HF implementation; train.engine=deepspeed "
                                  "needs victor.mask=causal")
    _require(vi.drop_layer >= 1, f"victor.drop_layer={vi.drop_layer} must be >= 1 with train.engine=deepspeed "
                                 "(the HF model drops after at least one layer)")
