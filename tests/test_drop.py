"""The Victor drop itself: what survives layer k, positions, fillers, and that it really cuts information."""

from __future__ import annotations

import pytest
import torch

from megavictor.data.collate import collate_rows, expand_sample
from megavictor.hf_model.victor_drop import keep_index
from megavictor.model.batch import IGNORE_INDEX, KIND_VISUAL
from megavictor.model.drop_plan import build_drop_plan
from megavictor.model.reference import ReferenceVLM
from tests.fixtures import packed_batches, samples, tiny_config


@pytest.fixture(scope="module")
def megatron_model():
    """A single-process megatron VictorVLM (world size 1, gloo) with the reference's weights."""
    from megavictor.distributed import init_from_config
    from megavictor.model.sharding import shard_into
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
    plan = build_drop_plan(batch, cfg)
    kept = batch.kinds[0] != KIND_VISUAL
    assert torch.equal(plan.short.position_ids[0], batch.position_ids[0][kept])
    assert torch.equal(plan.short.labels[0], batch.labels[0][kept])
    assert int(plan.loss_mask().sum()) == batch.num_loss_tokens()
    # Positions are not renumbered: the first text slot after an image keeps its position V+R+... .
    assert int(plan.short.position_ids.max()) == int(batch.position_ids.max())


def test_rows_with_different_image_counts_are_isolated() -> None:
    """Two rows whose drops keep different lengths: the shorter row is filled with filler slots, which must
    change nothing: per-row losses equal the rows run alone."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = ReferenceVLM(cfg)
    s = samples()
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    rows = [[expand_sample(s["two_images"], v, r)], [expand_sample(s["text_only"], v, r),
                                                     expand_sample(s["one_image"], v, r)]]
    together = model(collate_rows(rows, cfg.data.seq_length))
    plan = build_drop_plan(collate_rows(rows, cfg.data.seq_length), cfg)
    assert plan.short.seq_length == cfg.data.seq_length - v  # row 2 lost one image, row 1 two
    for i, row in enumerate(rows):
        alone = model(collate_rows([row], cfg.data.seq_length))
        assert torch.allclose(together[i].sum(), alone.sum(), rtol=1e-5)


def test_fp8_alignment_fills_with_inert_slots() -> None:
    """FP8 GEMMs need the short length to be a multiple of 16: the plan adds fillers, which change no loss."""
    cfg = tiny_config(["vision.patch_size=16"])  # 4 visual tokens per image: short lengths are not multiples of 16
    fp8 = tiny_config(["vision.patch_size=16", "train.fp8=hybrid", "train.attention_backend=te"])
    torch.manual_seed(0)
    model = ReferenceVLM(cfg)
    batch = packed_batches(cfg)[0]
    plain, aligned = build_drop_plan(batch, cfg), build_drop_plan(batch, fp8)
    assert aligned.short.seq_length % 16 == 0 and aligned.short.seq_length > plain.short.seq_length
    fillers = aligned.short.labels[0, :aligned.short.seq_length - plain.short.seq_length]
    assert bool((fillers == IGNORE_INDEX).all())
    assert torch.allclose(model(batch, plain).sum(), model(batch, aligned).sum(), rtol=1e-6)


def test_one_gather_convention_for_megatron_and_hf() -> None:
    """The pinned convention (`victor_drop.keep_index`): survivors keep their order, right-aligned; a row with
    fewer survivors is filled on the left with its own last dropped visual slots. The megatron/reference plan and
    the exported HF model both keep exactly these slots."""
    from megavictor.hf.convert import victor_hf_config
    from megavictor.hf_model.modeling_victor_llava import VictorLlavaForConditionalGeneration
    from megavictor.model.batch import KIND_REGISTER

    visual = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    index, filler = keep_index(visual)
    assert index.tolist() == [[3, 0, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]
    assert filler.tolist() == [[True] + [False] * 5, [False] * 6]

    cfg = tiny_config()
    batch = collate_rows([[expand_sample(s, cfg.vision.num_visual_tokens, cfg.victor.registers_per_image)]
                          for s in (samples()["two_images"], samples()["one_image"])], cfg.data.seq_length)
    plan = build_drop_plan(batch, cfg)
    expected, _ = keep_index(batch.kinds == KIND_VISUAL)
    assert torch.equal(plan.keep_index, expected)
    config = victor_hf_config(cfg)
    torch.manual_seed(0)
    model = VictorLlavaForConditionalGeneration(config).eval()
    ids = batch.tokens.masked_fill(batch.kinds == KIND_VISUAL, config.image_token_id)
    ids = ids.masked_fill(batch.kinds == KIND_REGISTER, config.register_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=batch.images, use_cache=False)
    assert torch.equal(out.kept_index, expected)


def test_baseline_keeps_everything() -> None:
    cfg = tiny_config(["victor.enabled=false"])
    batch = packed_batches(cfg)[0]
    plan = build_drop_plan(batch, cfg)
    assert plan.drop_layer is None and plan.short is plan.long
    assert int((batch.kinds == 2).sum()) == 0  # no register slots reserved for the baseline
