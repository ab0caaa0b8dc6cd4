"""The Victor drop itself: what survives layer k, positions, ghost padding, and that it really cuts information."""

from __future__ import annotations

import pytest
import torch

from megavictor.model.batch import IGNORE_INDEX, KIND_VISUAL, collate_rows, layout_sample
from megavictor.model.reference import ReferenceVLM
from megavictor.model.victor import build_drop_plan
from tests.fixtures import packed_batches, samples, tiny_config


@pytest.fixture(scope="module")
def megatron_model():
    """A single-process megatron VictorVLM (world size 1, gloo) with the reference's weights."""
    from megavictor.distributed import init_from_config
    from megavictor.model.layout import shard_into
    from megavictor.model.vlm import VictorVLM

    cfg = tiny_config()
    init_from_config(cfg)
    torch.manual_seed(0)
    reference = ReferenceVLM(cfg)
    model = VictorVLM(cfg, [cfg.model.num_layers])
    shard_into(model, dict(reference.named_parameters()), 0, 1, 0)
    return cfg, model


def _perturb_visual_input_of(layer: torch.nn.Module, kinds: torch.Tensor):
    """Add noise to the visual slots of the hidden states entering `layer` ([S, B, H], before its drop)."""
    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        noise = torch.randn_like(hidden) * (kinds.t() == KIND_VISUAL).unsqueeze(-1)
        return args, {**kwargs, "hidden_states": hidden + 10 * noise}
    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_visual_states_do_not_reach_outputs_after_layer_k(megatron_model) -> None:
    cfg, model = megatron_model
    k = cfg.victor.drop_layer
    batch = packed_batches(cfg)[0]
    with torch.no_grad():
        clean = model(batch, return_logits=True)
        handle = _perturb_visual_input_of(model.decoder.layers[k], batch.kinds)
        after_k = model(batch, return_logits=True)
        handle.remove()
        handle = _perturb_visual_input_of(model.decoder.layers[k - 1], batch.kinds)
        before_k = model(batch, return_logits=True)
        handle.remove()
    assert torch.equal(clean, after_k), "visual hidden states at layer k changed the logits"
    assert (clean - before_k).abs().max() > 1e-3, "control: visual states before layer k must matter"
    assert clean.shape[1] == batch.shape[1] - int((batch.kinds == KIND_VISUAL).sum())


def test_short_view_keeps_original_positions_and_labels() -> None:
    cfg = tiny_config()
    batch = packed_batches(cfg)[0]
    plan = build_drop_plan(batch, enabled=True, drop_layer=3)
    kept = batch.kinds[0] != KIND_VISUAL
    assert torch.equal(plan.short.position_ids[0], batch.position_ids[0][kept])
    assert torch.equal(plan.short.labels[0], batch.labels[0][kept])
    assert int(plan.loss_mask().sum()) == batch.num_loss_tokens()
    # Positions are not renumbered: the first text slot after an image keeps its position V+R+... .
    assert int(plan.short.position_ids.max()) == int(batch.position_ids.max())


def test_rows_with_different_image_counts_are_isolated() -> None:
    """Two rows whose drops keep different lengths: the shorter row is padded with ghost slots, which must
    change nothing: per-row losses equal the rows run alone."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = ReferenceVLM(cfg)
    s = samples()
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    rows = [[layout_sample(s["two_images"], v, r)], [layout_sample(s["text_only"], v, r),
                                                     layout_sample(s["one_image"], v, r)]]
    together = model(collate_rows(rows, cfg.data.seq_length))
    plan = model.plan(collate_rows(rows, cfg.data.seq_length))
    assert plan.short.seq_length == cfg.data.seq_length - v  # row 2 lost one image, row 1 two
    for i, row in enumerate(rows):
        alone = model(collate_rows([row], cfg.data.seq_length))
        assert torch.allclose(together[i].sum(), alone.sum(), rtol=1e-5)


def test_alignment_pads_with_inert_ghost_slots() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = ReferenceVLM(cfg)
    batch = packed_batches(cfg)[0]
    plain, aligned = build_drop_plan(batch, True, 3), build_drop_plan(batch, True, 3, align=32)
    assert aligned.short.seq_length % 32 == 0 and aligned.short.seq_length > plain.short.seq_length
    ghosts = aligned.short.labels[0, plain.short.seq_length:]
    assert bool((ghosts == IGNORE_INDEX).all())
    assert torch.allclose(model(batch, plain).sum(), model(batch, aligned).sum(), rtol=1e-6)


def test_baseline_keeps_everything() -> None:
    cfg = tiny_config(["victor.enabled=false"])
    batch = packed_batches(cfg)[0]
    plan = build_drop_plan(batch, enabled=False, drop_layer=3)
    assert plan.drop_layer is None and plan.short is plan.long
    assert int((batch.kinds == 2).sum()) == 0  # no register slots reserved for the baseline
