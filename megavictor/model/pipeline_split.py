"""Pipeline stage split and its cost model (`megavictor split` prints both splits side by side).

With Victor, layers < k process visual + register + text slots and layers >= k only register + text slots, so
with k=3 of 32 layers and 576 visual tokens an even split leaves the first stage several times slower than the
others. `balanced` picks contiguous per-stage layer counts that minimise the slowest stage under this model:
- a decoder layer costs the forward FLOPs of its GEMMs plus full-square attention over its sequence length,
  times 3 for forward + backward;
- the first stage also runs the ViT (forward only when frozen) and the projector, the last the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from megavictor.config import Config, PipelineSplit
from megavictor.model.flops import TRAIN_FACTOR, transformer_layer_flops

@dataclass
class SampleShape:
    """Slots one typical image sample occupies before and after the drop."""

    visual: int
    registers: int
    text: int

    @property
    def long(self) -> int:
        return self.visual + self.registers + self.text

    @property
    def short(self) -> int:
        return self.registers + self.text


def sample_shape(cfg: Config) -> SampleShape:
    return SampleShape(cfg.vision.num_visual_tokens, cfg.victor.registers_per_image, cfg.data.text_length)


def decoder_layer_costs(cfg: Config) -> list[float]:
    """Training cost of each decoder layer for one typical sample."""
    m, shape = cfg.model, sample_shape(cfg)
    groups = m.num_query_groups or m.num_attention_heads
    costs = []
    for i in range(m.num_layers):
        dropped = cfg.victor.enabled and i >= cfg.victor.drop_layer
        seq = shape.short if dropped else shape.long
        costs.append(TRAIN_FACTOR * transformer_layer_flops(seq, m.hidden_size, m.ffn_hidden_size,
                                                            m.num_attention_heads, groups, gated=True))
    return costs


def first_stage_extra_cost(cfg: Config) -> float:
    """ViT (+ class token) and projector on the first stage."""
    v, m = cfg.vision, cfg.model
    vit = v.num_layers * transformer_layer_flops(v.num_visual_tokens + 1, v.hidden_size, v.ffn_hidden_size,
                                                 v.num_attention_heads, v.num_attention_heads, gated=False)
    projector = 2 * v.num_visual_tokens * (v.hidden_size * m.hidden_size + m.hidden_size * m.hidden_size)
    return (1.0 if v.freeze else TRAIN_FACTOR) * vit + TRAIN_FACTOR * projector


def last_stage_extra_cost(cfg: Config) -> float:
    shape = sample_shape(cfg)
    seq = shape.short if cfg.victor.enabled else shape.long
    return TRAIN_FACTOR * 2.0 * seq * cfg.model.hidden_size * cfg.model.vocab_size


def stage_costs(cfg: Config, layers: list[int]) -> list[float]:
    per_layer = decoder_layer_costs(cfg)
    costs, start = [], 0
    for n in layers:
        costs.append(sum(per_layer[start:start + n]))
        start += n
    costs[0] += first_stage_extra_cost(cfg)
    costs[-1] += last_stage_extra_cost(cfg)
    return costs


def even_split(num_layers: int, pp: int) -> list[int]:
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def balanced_split(cfg: Config, pp: int) -> list[int]:
    """Contiguous split minimising the slowest stage (exact dynamic programme over layer boundaries)."""
    per_layer = decoder_layer_costs(cfg)
    n = len(per_layer)
    first, last = first_stage_extra_cost(cfg), last_stage_extra_cost(cfg)
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


def layers_per_stage(cfg: Config) -> list[int]:
    """Resolve `parallel.pp_split` (even | balanced | explicit list) to per-stage decoder layer counts."""
    split, pp = cfg.parallel.pp_split, cfg.parallel.pp
    if isinstance(split, list):
        return list(split)
    if split == PipelineSplit.BALANCED:
        return balanced_split(cfg, pp)
    return even_split(cfg.model.num_layers, pp)


def split_report(cfg: Config) -> dict:
    pp = cfg.parallel.pp
    splits = {"even": even_split(cfg.model.num_layers, pp), "balanced": balanced_split(cfg, pp)}
    mean = sum(stage_costs(cfg, splits["even"])) / pp
    report: dict = {}
    for name, layers in splits.items():
        report[name] = {"layers": layers, "stage_cost": [round(c / mean, 4) for c in stage_costs(cfg, layers)]}
    report["speedup"] = round(max(report["even"]["stage_cost"]) / max(report["balanced"]["stage_cost"]), 4)
    return report
