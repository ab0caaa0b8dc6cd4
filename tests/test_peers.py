"""The peer variants (`megavictor.model.peers`): FastV keeps the most attended visual slots, the average pool fills
the register slots with grid means, the megatron model and its twin agree on both, bad settings are one line."""

from __future__ import annotations

import pytest
import torch

from megavictor.config import ConfigError
from megavictor.model.batch import KIND_REGISTER, KIND_VISUAL
from megavictor.model.drop_plan import build_drop_plan, ranking_queries, scatter_image_slots
from megavictor.model.peers import average_pool, captured_attention, image_slot_fill, pool_grid
from megavictor.model.reference import ReferenceVLM
from tests.fixtures import packed_batches, tiny_config

FASTV = ["victor.enabled=false", "peer.fastv_layer=2"]
AVG_POOL = ["victor.num_registers=4", "victor.drop_layer=0", "peer.avg_pool_to=4"]


def test_fastv_keeps_the_half_of_each_image_its_query_attends_most() -> None:
    """Layers < K are the baseline's, so the baseline's layer K-1 probabilities, ranked by hand, must give the
    visual slots that the FastV plan keeps."""
    cfg = tiny_config(FASTV)
    base_cfg = tiny_config(["victor.enabled=false"])
    model = ReferenceVLM(cfg).eval()
    batch = packed_batches(cfg)[0]
    with torch.no_grad(), captured_attention(model.decoder.layers[1].self_attention.softmax) as probs:
        model.load_state_dict(ReferenceVLM(base_cfg).state_dict())  # same weights either way
        ReferenceVLM.forward(model, batch, build_drop_plan(batch, base_cfg))
    plan = build_drop_plan(batch, cfg)
    with torch.no_grad():
        model(batch, plan)
    queries = ranking_queries(batch.segment_ids(), batch.labels)[0]
    received = probs[0].mean(dim=1)[0]  # [S, S]
    visual = (batch.kinds[0] == KIND_VISUAL).nonzero().flatten()
    v = cfg.vision.num_visual_tokens
    expected = []
    for image in visual.view(-1, v):  # three images in this row
        scores = received[queries[image], image]
        expected += image[scores.argsort(descending=True)[:v // 2]].tolist()
    kept_visual = [i for i in plan.keep_index[0].tolist() if int(batch.kinds[0, i]) == KIND_VISUAL]
    assert sorted(kept_visual) == sorted(expected) and len(kept_visual) == 3 * v // 2
    # the query of the first sample is the slot before its first target, not its last slot
    first_target = int((batch.labels[0] != -100).nonzero()[0])
    assert int(queries[0]) == first_target


def test_average_pool_gives_grid_means() -> None:
    assert pool_grid(8) == (2, 4) and pool_grid(16) == (4, 4) and pool_grid(1) == (1, 1) and pool_grid(2) == (1, 2)
    grid = torch.arange(16.0).view(4, 4)  # one image, 16 tokens of width 1 in raster order
    pooled = average_pool(grid.reshape(1, 16, 1), 4)[0, :, 0]
    blocks = [grid[r:r + 2, c:c + 2].mean() for r in (0, 2) for c in (0, 2)]
    assert torch.equal(pooled, torch.stack(blocks))


def test_average_pool_fills_the_register_slots_and_has_no_registers() -> None:
    cfg = tiny_config(AVG_POOL)
    model = ReferenceVLM(cfg).eval()
    assert model.registers is None
    batch = packed_batches(cfg)[0]
    with torch.no_grad():
        visual = model.projector(model.vision(batch.images))
        x = model.embedding.word_embeddings(batch.tokens)
        filled = scatter_image_slots(x, build_drop_plan(batch, cfg).image_slots, visual, image_slot_fill(cfg, visual, None))
    registers = filled[batch.kinds == KIND_REGISTER].view(-1, 4, cfg.model.hidden_size)
    torch.testing.assert_close(registers, average_pool(visual, 4))
    assert build_drop_plan(batch, cfg).drop_layer == 0


@pytest.mark.parametrize("variant", ["fastv", "avg_pool"])
def test_megatron_loss_matches_the_reference(variant: str) -> None:
    from megavictor.distributed import init_distributed
    from megavictor.model.sharding import shard_into
    from megavictor.model.vlm import VictorVLM

    cfg = tiny_config(FASTV if variant == "fastv" else AVG_POOL)
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    reference = ReferenceVLM(cfg)
    megatron = VictorVLM(cfg, [cfg.model.num_layers])
    shard_into(megatron, dict(reference.named_parameters()), 0, 1, 0)
    for batch in packed_batches(cfg):
        expected = reference(batch).sum()
        got = megatron(batch).sum()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        expected.backward()
        got.backward()
    expected_grad = reference.projector.encoder.linear_fc1.weight.grad
    # fp32 sums in another order: the tolerance scales with the gradient, not with each element (as in test_deepspeed).
    torch.testing.assert_close(megatron.projector.encoder.linear_fc1.weight.grad, expected_grad, rtol=1e-4,
                               atol=1e-5 * expected_grad.abs().max().item())


@pytest.mark.parametrize("overrides, message", [
    (["peer.fastv_layer=2"], "set victor.enabled=false"),
    (FASTV + ["parallel.pp=2"], "needs parallel.pp=1"),
    (FASTV + ["model.num_layers=2", "victor.drop_layer=1"], r"peer.fastv_layer=2 must be in \[1, model.num_layers=2\)"),
    (["peer.avg_pool_to=4"], "set victor.enabled=true victor.num_registers=4 victor.drop_layer=0"),
    (AVG_POOL + ["train.engine=deepspeed"], "needs train.engine=megatron"),
    (FASTV + ["peer.avg_pool_to=4"], "alternatives"),
])
def test_inconsistent_peer_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(overrides)
