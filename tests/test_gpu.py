"""GPU-only paths: Transformer Engine layers and FP8. Skipped (with the reason) on machines without CUDA/TE."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.fixtures import packed_batches, tiny_config

HAS_CUDA = torch.cuda.is_available()
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
needs_te = pytest.mark.skipif(not (HAS_CUDA and HAS_TE), reason="needs a CUDA GPU with Transformer Engine installed")


def test_te_backend_fails_clearly_without_te_or_cuda() -> None:
    if HAS_CUDA and HAS_TE:
        pytest.skip("Transformer Engine is available here")
    from megavictor.model import specs

    with pytest.raises(RuntimeError, match="attention_backend"):
        specs.decoder_layer_spec("te")


@needs_te
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_te_model_matches_local_model(fp8: str | None) -> None:
    """The TE spec (optionally FP8) against the local spec on the same weights: same loss (bf16/fp8 tolerance)."""
    from megavictor.distributed import init_from_config
    from megavictor.model.sharding import shard_into
    from megavictor.model.reference import ReferenceVLM
    from megavictor.model.vlm import VictorVLM

    overrides = ["model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=256"]
    local_cfg = tiny_config(overrides)
    te_cfg = tiny_config(overrides + ["train.attention_backend=te"] + ([f"train.fp8={fp8}"] if fp8 else []))
    init_from_config(local_cfg)
    torch.manual_seed(0)
    full = dict(ReferenceVLM(local_cfg).named_parameters())
    losses = []
    for cfg in (local_cfg, te_cfg):
        model = VictorVLM(cfg, [cfg.model.num_layers]).cuda()
        shard_into(model, full, 0, 1, 0)
        batch = packed_batches(cfg)[0].to("cuda")
        losses.append(float(model(batch).sum()))
    assert losses[1] == pytest.approx(losses[0], rel=0.05 if fp8 else 1e-3)
