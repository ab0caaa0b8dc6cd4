"""Greedy decoding with the KV cache gives the tokens of decoding without it (the whole prefix re-run per token).

Prompts of different lengths and image counts share a batch (row padding, the drop's fillers); Victor, the
baseline and every peer variant (`megavictor.model.peers`), and Victor and the baseline on LLaVA-NeXT anyres images
(each prompt's images of their own grids and visual counts). The cached path runs the plain-PyTorch twin; the
uncached one the megatron model with the same weights, so the check also covers the cache against an independent
implementation of the forward. A larger init std than training's sharpens the random
model's logits, so that greedy choices are not decided by rounding.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megavictor.config import Config
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample
from megavictor.kv_cache import greedy_generate_cached
from megavictor.model.reference import ReferenceVLM
from megavictor.vqa import greedy_generate
from tests.fixtures import ANYRES, anyres_samples, tiny_config

NEW_TOKENS = 6
NO_EOS = -1  # never generated: every prompt runs NEW_TOKENS steps
VARIANTS = {
    "victor": [],
    "baseline": ["victor.enabled=false"],
    "text_blind": ["victor.mask=text_blind", "victor.drop_layer=1"],
    "fastv": ["victor.enabled=false", "peer.fastv_layer=2"],
    "pyramid": ["victor.enabled=false", "peer.pyramid_layers=[1,2,3]", "peer.pyramid_keep=[8,4,2]"],  # 3 drops
    "avg_pool": ["victor.num_registers=4", "victor.drop_layer=0", "peer.avg_pool_to=4"],
    **{method: ["victor.num_registers=4", "victor.drop_layer=0", f"peer.prune={method}", "peer.prune_to=4"]
       for method in ("random", "divprune", "visionzip")},
    "anyres_victor": ANYRES,  # LLaVA-NeXT images of three grids: each prompt's own visual count and sizes
    "anyres_baseline": ["victor.enabled=false", *ANYRES],
}


def prompts(seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    image = lambda: torch.randn(3, 32, 32, generator=g)  # noqa: E731
    token_lists = [[IMAGE_PLACEHOLDER] + text(5), text(2) + [IMAGE_PLACEHOLDER] + text(9),
                   [IMAGE_PLACEHOLDER] + text(1) + [IMAGE_PLACEHOLDER] + text(3), text(7)]
    return [Sample(t, [False] * len(t), [image() for x in t if x == IMAGE_PLACEHOLDER]) for t in token_lists]


def anyres_prompts(cfg: Config) -> list[Sample]:
    """`anyres_samples` as prompts (nothing trainable): images of different grids, one prompt without an image."""
    return [replace(s, trainable=[False] * len(s.tokens)) for s in anyres_samples(cfg).values()]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_output_equals_recompute(variant: str) -> None:
    from megavictor.distributed import init_distributed
    from megavictor.model.sharding import shard_into
    from megavictor.model.vlm import VictorVLM

    cfg = tiny_config(["model.init_method_std=0.3", *VARIANTS[variant]])
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    reference = ReferenceVLM(cfg).eval()
    megatron = VictorVLM(cfg, [cfg.model.num_layers]).eval()
    shard_into(megatron, dict(reference.named_parameters()), 0, 1, 0)
    batch_prompts = anyres_prompts(cfg) if cfg.vision.anyres() else prompts()

    cached = greedy_generate_cached(reference, cfg, batch_prompts, NEW_TOKENS, NO_EOS, 0)
    recomputed = greedy_generate(lambda b, p: megatron(b, p, return_logits=True), cfg, batch_prompts, NEW_TOKENS,
                                 NO_EOS, 0)
    assert cached == recomputed
    assert all(len(ids) == NEW_TOKENS for ids in cached)
    assert len({tuple(ids) for ids in cached}) > 1, "control: different prompts should give different answers"
    # One prompt alone (no padding, no fillers) decodes as it does in the batch.
    assert greedy_generate_cached(reference, cfg, batch_prompts[1:2], NEW_TOKENS, NO_EOS, 0) == cached[1:2]


def test_eos_stops_a_row_and_the_others_go_on() -> None:
    cfg = tiny_config(["model.init_method_std=0.3"])
    reference = ReferenceVLM(cfg).eval()
    batch_prompts = prompts()
    free = greedy_generate_cached(reference, cfg, batch_prompts, NEW_TOKENS, NO_EOS, 0)
    eos = free[0][2]  # the first prompt's third token becomes eos: its answer stops before it
    stopped = greedy_generate_cached(reference, cfg, batch_prompts, NEW_TOKENS, eos, 0)
    assert stopped[0] == free[0][:free[0].index(eos)]
    for ids, full in zip(stopped[1:], free[1:]):
        assert ids == full[:full.index(eos)] if eos in full else ids == full

