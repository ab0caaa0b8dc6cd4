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
        specs.decoder_layer_spec("te", packed=True)


@needs_te
@pytest.mark.gpu
@pytest.mark.parametrize("fp8,mask", [(None, "causal"), ("hybrid", "causal"), (None, "text_blind")])
def test_te_model_matches_local_model(fp8: str | None, mask: str) -> None:
    """The TE spec (optionally FP8) against the local spec on the same weights: same loss (bf16/fp8 tolerance).

    With the causal Victor mask the TE model attends through THD packed sequences (no [S, S] mask; rows flattened,
    fillers and padding outside every sequence), with text_blind through the explicit mask; the local model always
    through the mask. Batches of one and of two rows (the second with fillers)."""
    from megavictor.model.batch import collate_rows, expand_sample
    from tests.fixtures import samples

    from megavictor.distributed import init_from_config
    from megavictor.model.sharding import shard_into
    from megavictor.model.reference import ReferenceVLM
    from megavictor.model.vlm import VictorVLM

    overrides = ["model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=256"]
    local_cfg = tiny_config(overrides + [f"victor.mask={mask}"])
    te_cfg = tiny_config(overrides + [f"victor.mask={mask}", "train.attention_backend=te"]
                         + ([f"train.fp8={fp8}"] if fp8 else []))
    init_from_config(local_cfg)
    torch.manual_seed(0)
    full = dict(ReferenceVLM(local_cfg).named_parameters())
    s, v, r = samples(), local_cfg.vision.num_visual_tokens, local_cfg.victor.registers_per_image
    two_rows = collate_rows([[expand_sample(s["two_images"], v, r)],
                             [expand_sample(s["text_only"], v, r), expand_sample(s["one_image"], v, r)]],
                            local_cfg.data.seq_length)
    losses = []
    for cfg in (local_cfg, te_cfg):
        model = VictorVLM(cfg, [cfg.model.num_layers]).cuda()
        shard_into(model, full, 0, 1, 0)
        assert model.packed == (cfg is te_cfg and mask == "causal")
        losses.append([float(model(batch.to("cuda")).sum()) for batch in (packed_batches(cfg)[0], two_rows)])
    for te, local in zip(losses[1], losses[0]):
        assert te == pytest.approx(local, rel=0.05 if fp8 else 1e-3)
