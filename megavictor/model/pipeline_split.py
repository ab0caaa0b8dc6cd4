"""Pipeline stage split and its cost model (`megavictor split` prints both splits side by side).

With Victor, layers < k process visual + register + text slots and layers >= k only register + text slots, so
with k=3 of 32 layers and 576 visual tokens an even split leaves the first stage several times slower than the
others. `balanced` picks contiguous per-stage layer counts that minimise the slowest stage under this model:
- a decoder layer costs the forward FLOPs of its GEMMs plus full-square attention over its sequence length,
  times 3 for forward + backward;
- the first stage also runs the ViT (forward only when frozen) and the projector, the last the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megavictor.config import Config, PipelineSplit
from megavictor.model.flops import TRAIN_FACTOR, transformer_layer_flops

@dataclass(frozen=True)
class SampleShape:
    """The slots samples occupy before (`long`) and after (`short`) the drop, as means over a data set, with the means
    of their squares (a layer costs a*s + b*s^2 on s slots, so these give its mean cost exactly), and the ViT views
    per sample. The breakdown into visual, register and text slots (means) is what `split` prints."""

    visual: float
    registers: float
    text: float
    views: float
    long_sq: float
    short_sq: float

    @property
    def long(self) -> float:
        return self.visual + self.registers + self.text

    @property
    def short(self) -> float:
        return self.registers + self.text

    @classmethod
    def typical(cls, visual: int, registers: int, text: int, views: int) -> "SampleShape":
        """One sample's shape (every moment of a single value)."""
        return cls(visual, registers, text, views, float(visual + registers + text) ** 2, float(registers + text) ** 2)

    @classmethod
    def of_samples(cls, visual: Sequence[int], registers: Sequence[int], text: Sequence[int],
                   views: Sequence[int]) -> "SampleShape":
        """The moments over samples with these per-sample slot counts (e.g. a training split's length index)."""
        n = max(len(visual), 1)
        mean = lambda values: sum(values) / n  # noqa: E731
        long = [v + r + t for v, r, t in zip(visual, registers, text)]
        short = [r + t for r, t in zip(registers, text)]
        return cls(mean(visual), mean(registers), mean(text), mean(views), mean([x * x for x in long]),
                   mean([x * x for x in short]))


def sample_shape(cfg: Config) -> SampleShape:
    """A typical sample without data: one image and `data.text_length` text tokens; under anyres the image takes
    its largest grid (the most visual tokens: the first stage's worst case), since the grids depend on the images.
    Training (and `split --data`) use the data set's own moments instead."""
    spec = cfg.vision.anyres()
    views = 1 if spec is None else max(spec.layout(h, w).tiles for h, w in spec.pinpoints)
    return SampleShape.typical(cfg.vision.max_visual_tokens, cfg.victor.registers_per_image, cfg.data.text_length,
                               views)


def _mean_layer_flops(cfg: Config, seq: float, seq_sq: float) -> float:
    """The mean training cost of one decoder layer over samples of mean length `seq` and mean squared length
    `seq_sq`: the GEMMs scale with the length, attention with its square."""
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    return TRAIN_FACTOR * transformer_layer_flops(seq, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                                  groups, gated=True, context=seq_sq / seq if seq else 0.0)


def decoder_layer_costs(cfg: Config, shape: SampleShape | None = None) -> list[float]:
    """Training cost of each decoder layer for a mean sample."""
    shape = shape or sample_shape(cfg)
    long = _mean_layer_flops(cfg, shape.long, shape.long_sq)
    short = _mean_layer_flops(cfg, shape.short, shape.short_sq)
    return [short if cfg.victor.enabled and i >= cfg.victor.drop_layer else long for i in range(cfg.model.num_layers)]


def first_stage_extra_cost(cfg: Config, shape: SampleShape | None = None) -> float:
    """ViT (+ class token) and projector on the first stage, once per view (an image, or an anyres tile)."""
    v, m = cfg.vision, cfg.model
    shape = shape or sample_shape(cfg)
    vit = v.num_layers * transformer_layer_flops(v.num_visual_tokens + 1, v.hidden_size, v.ffn_hidden_size,
                                                 v.num_attention_heads, v.num_attention_heads, gated=False)
    projector = 2 * v.num_visual_tokens * (v.hidden_size * m.hidden_size + m.hidden_size * m.hidden_size)
    return shape.views * ((1.0 if v.freeze else TRAIN_FACTOR) * vit + TRAIN_FACTOR * projector)


def last_stage_extra_cost(cfg: Config, shape: SampleShape | None = None) -> float:
    shape = shape or sample_shape(cfg)
    seq = shape.short if cfg.victor.enabled else shape.long
    return TRAIN_FACTOR * 2.0 * seq * cfg.model.hidden_size * cfg.model.vocab_size


def stage_costs(cfg: Config, layers: list[int], shape: SampleShape | None = None) -> list[float]:
    per_layer = decoder_layer_costs(cfg, shape)
    costs, start = [], 0
    for n in layers:
        costs.append(sum(per_layer[start:start + n]))
        start += n
    costs[0] += first_stage_extra_cost(cfg, shape)
    costs[-1] += last_stage_extra_cost(cfg, shape)
    return costs


def even_split(num_layers: int, pp: int) -> list[int]:
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def balanced_split(cfg: Config, pp: int, shape: SampleShape | None = None) -> list[int]:
    """Contiguous split minimising the slowest stage (exact dynamic programme over layer boundaries)."""
    per_layer = decoder_layer_costs(cfg, shape)
    n = len(per_layer)
    first, last = first_stage_extra_cost(cfg, shape), last_stage_extra_cost(cfg, shape)
    prefix = [0.0]
    for c in per_layer:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (first if stage == 0 else 0.0) + (last if stage == pp - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    # best[s][i]: minimal max-stage cost placing layers [0, i) on stages [0, s).
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, n - (pp - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    layers, i = [], n
    for s in range(pp, 0, -1):
        j = cut[s][i]
        layers.append(i - j)
        i = j
    return layers[::-1]


def layers_per_stage(cfg: Config, shape: SampleShape | None = None) -> list[int]:
    """Resolve `parallel.pp_split` (even | balanced | explicit list) to per-stage decoder layer counts; `balanced`
    under `shape` (the training data's moments; default `sample_shape`)."""
    split, pp = cfg.parallel.pp_split, cfg.parallel.pp
    if isinstance(split, list):
        return list(split)
    if split == PipelineSplit.BALANCED:
        return balanced_split(cfg, pp, shape)
    return even_split(cfg.model.num_layers, pp)


def split_report(cfg: Config, shape: SampleShape | None = None) -> dict:
    pp = cfg.parallel.pp
    splits = {"even": even_split(cfg.model.num_layers, pp), "balanced": balanced_split(cfg, pp, shape)}
    mean = sum(stage_costs(cfg, splits["even"], shape)) / pp
    report: dict = {}
    for name, layers in splits.items():
        report[name] = {"layers": layers,
                        "stage_cost": [round(c / mean, 4) for c in stage_costs(cfg, layers, shape)]}
    report["speedup"] = round(max(report["even"]["stage_cost"]) / max(report["balanced"]["stage_cost"]), 4)
    return report
