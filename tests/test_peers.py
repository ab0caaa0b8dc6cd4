"""The peer variants (`megavictor.model.peers`): FastV keeps the most attended visual slots, the average pool fills
the register slots with grid means, the megatron model and its twin agree on both, bad settings are one line. The
training-free selections (`megavictor.model.visual_select`: random, DivPrune, VisionZip) against plain loops, in
both models, and in `megavictor eval` on a trained baseline checkpoint; `megavictor train` refuses them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megavictor.config import Config, ConfigError
from megavictor.model.batch import KIND_REGISTER, KIND_VISUAL
from megavictor.model.drop_plan import build_drop_plan, ranking_queries, scatter_image_slots
from megavictor.model.peers import average_pool, image_slot_fill, pool_grid
from megavictor.model.reference import ReferenceVLM
from megavictor.model.visual_select import (TowerOutputs, captured_outputs, divprune_indices, group_means,
                                            random_indices, select_visual, tower_readout, visionzip_counts,
                                            visionzip_groups)
from tests.fixtures import ANYRES, packed_batches, tiny_config
from tests.runs import STAGE2, run, train_cmd

FASTV = ["victor.enabled=false", "peer.fastv_layer=2"]
AVG_POOL = ["victor.num_registers=4", "victor.drop_layer=0", "peer.avg_pool_to=4"]
PYRAMID = ["victor.enabled=false", "peer.pyramid_layers=[1,2,3]", "peer.pyramid_keep=[8,4,2]"]  # 16 visual tokens


def test_fastv_keeps_the_half_of_each_image_its_query_attends_most() -> None:
    """Layers < K are the baseline's, so the baseline's layer K-1 probabilities, ranked by hand, must give the
    visual slots that the FastV plan keeps."""
    cfg = tiny_config(FASTV)
    base_cfg = tiny_config(["victor.enabled=false"])
    model = ReferenceVLM(cfg).eval()
    batch = packed_batches(cfg)[0]
    with torch.no_grad(), captured_outputs(model.decoder.layers[1].self_attention.softmax) as probs:
        model.load_state_dict(ReferenceVLM(base_cfg).state_dict())  # same weights either way
        ReferenceVLM.forward(model, batch, build_drop_plan(batch, base_cfg))
    plan = build_drop_plan(batch, cfg)
    with torch.no_grad():
        model(batch, plan)
    received = probs[0].mean(dim=1)[0]  # [S, S]
    segments, labelled = batch.segment_ids()[0], batch.labels[0] != -100
    visual = (batch.kinds[0] == KIND_VISUAL).nonzero().flatten()
    v = cfg.vision.num_visual_tokens
    expected = []
    for image in visual.view(-1, v):  # three images in this row
        query = int((labelled & (segments == segments[image[0]])).nonzero()[0])  # predicts the sample's first target
        scores = received[query, image]
        expected += image[scores.argsort(descending=True)[:v // 2]].tolist()
    kept_visual = [i for i in plan.keep_index[0].tolist() if int(batch.kinds[0, i]) == KIND_VISUAL]
    assert sorted(kept_visual) == sorted(expected) and len(kept_visual) == 3 * v // 2
    # one query per sample: the slot before its first target, not its last slot
    queries = ranking_queries(batch.segment_ids(), batch.labels)[0]
    first_target = int(labelled.nonzero()[0])
    assert bool(queries[first_target]) and int(queries[segments == segments[first_target]].sum()) == 1


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


@pytest.mark.parametrize("variant", ["fastv", "avg_pool", "pyramid"])
def test_megatron_loss_matches_the_reference(variant: str) -> None:
    from megavictor.distributed import init_distributed
    from megavictor.model.sharding import shard_into
    from megavictor.model.vlm import VictorVLM

    cfg = tiny_config({"fastv": FASTV, "avg_pool": AVG_POOL, "pyramid": PYRAMID}[variant])
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
    (["peer.pyramid_layers=[1,2]", "peer.pyramid_keep=[8,4]"], r"peer.pyramid_layers=\[1, 2\] replaces the Victor "
                                                                "drop: set victor.enabled=false"),
    (PYRAMID + ["parallel.pp=2"], r"peer.pyramid_layers=\[1, 2, 3\] needs parallel.pp=1"),
    (PYRAMID + ["train.attention_backend=te"], "needs train.attention_backend=local"),
    (PYRAMID + ["train.engine=deepspeed"], "needs train.engine=megatron"),
    (PYRAMID + ["peer.fastv_layer=2"], "peer.fastv_layer and peer.pyramid_layers are alternatives"),
    (PYRAMID + ANYRES, "not supported with anyres images"),
    (["victor.enabled=false", "peer.pyramid_layers=[1,2]"], "go together"),
    (["victor.enabled=false", "peer.pyramid_keep=[8,4]"], "go together"),
    (PYRAMID[:2] + ["peer.pyramid_keep=[8,4]"], "lists of one length"),
    (["victor.enabled=false", "peer.pyramid_layers=[]", "peer.pyramid_keep=[]"], "non-empty lists"),
    (PYRAMID[:1] + ["peer.pyramid_layers=[2,1,3]"] + PYRAMID[2:], "must ascend strictly"),
    (PYRAMID[:1] + ["peer.pyramid_layers=[0,1,2]"] + PYRAMID[2:], r"each in \[1, model.num_layers=4\)"),
    (PYRAMID[:1] + ["peer.pyramid_layers=[1,2,4]"] + PYRAMID[2:], r"each in \[1, model.num_layers=4\)"),
    (PYRAMID[:2] + ["peer.pyramid_keep=[8,8,2]"], "must decrease strictly"),
    (PYRAMID[:2] + ["peer.pyramid_keep=[16,4,2]"], "from below vision.num_visual_tokens=16"),
    (PYRAMID[:2] + ["peer.pyramid_keep=[8,4,0]"], "to at least 1"),
])
def test_inconsistent_peer_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(overrides)


# The training-free selections (`peer.prune`, megavictor.model.visual_select), each against a plain loop.

def prune(method: str, keep: int = 4) -> list[str]:
    return [f"victor.num_registers={keep}", "victor.drop_layer=0", f"peer.prune={method}", f"peer.prune_to={keep}"]


def cosine_distances(tokens: torch.Tensor) -> list[list[float]]:
    return [[1 - F.cosine_similarity(a.double(), b.double(), dim=0).item() for b in tokens] for a in tokens]


def min_pairwise(distance: list[list[float]], chosen: Sequence[int]) -> float:
    return min(distance[i][j] for i, j in itertools.combinations(chosen, 2))


def divprune_loop(tokens: torch.Tensor, keep: int) -> list[int]:
    """DivPrune as the paper states it, one token at a time (max() keeps the first of equals: the lowest index)."""
    d, v = cosine_distances(tokens), len(tokens)
    chosen = [max(range(v), key=lambda i: min(d[i][j] for j in range(v) if j != i))]
    while len(chosen) < keep:
        chosen.append(max((i for i in range(v) if i not in chosen), key=lambda i: min(d[i][j] for j in chosen)))
    return sorted(chosen)


def visionzip_loop(attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant: int,
                   contextual: int) -> tuple[list[int], list[torch.Tensor]]:
    """One image: the `dominant` most attended tokens, then each contextual group's mean feature."""
    v = len(attention)
    kept = sorted(sorted(range(v), key=lambda i: -attention[i].item())[:dominant])
    if contextual == 0:
        return kept, []
    rest = [i for i in range(v) if i not in kept]
    targets = rest[::len(rest) // contextual][:contextual]
    members: list[list[int]] = [[t] for t in targets]
    for i in rest:
        if i not in targets:
            similarity = [F.cosine_similarity(keys[i], keys[t], dim=0).item() for t in targets]
            members[similarity.index(max(similarity))].append(i)
    return kept, [features[m].mean(dim=0) for m in members]


def test_random_keeps_b_distinct_tokens_in_order_the_same_for_an_image_anywhere() -> None:
    images = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    picks = random_indices(images, 16, 5, seed=1234)
    assert picks.shape == (6, 5)
    assert all(row == sorted(set(row)) and 0 <= row[0] and row[-1] < 16 for row in picks.tolist())
    assert len({tuple(row) for row in picks.tolist()}) > 1
    # An image's draw depends on the seed and its pixels only: not on its place in the batch or the evaluation order.
    assert torch.equal(random_indices(images.flip(0), 16, 5, seed=1234), picks.flip(0))
    assert torch.equal(random_indices(images[2:3], 16, 5, seed=1234), picks[2:3])
    assert not torch.equal(random_indices(images, 16, 5, seed=1235), picks)
    # Uniform: over many images each of 16 tokens is kept a quarter of the time (400 of 1600; sd 17).
    many = random_indices(torch.randn(1600, 3, generator=torch.Generator().manual_seed(1)), 16, 4, seed=1234)
    counts = torch.bincount(many.flatten(), minlength=16)
    assert counts.min() > 330 and counts.max() < 470, counts


@pytest.mark.parametrize("seed", range(3))
def test_divprune_is_the_greedy_max_min_loop(seed: int) -> None:
    tokens = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(seed))
    picks = divprune_indices(tokens, 6)
    assert [divprune_loop(t, 6) for t in tokens] == picks.tolist()


def test_divprune_spreads_its_picks() -> None:
    """Four tight clusters: one token of each. Small random cases: the greedy min distance beats most subsets'
    (at least their median, and at least half the best subset's: greedy max-min's guarantee)."""
    g = torch.Generator().manual_seed(0)
    clusters = torch.eye(8)[:4].repeat_interleave(5, dim=0) + 0.01 * torch.randn(20, 8, generator=g)
    order = torch.randperm(20, generator=g)
    picks = divprune_indices(clusters[order][None], 4)[0]
    assert sorted((order[picks] // 5).tolist()) == [0, 1, 2, 3]
    for _ in range(10):
        tokens = torch.randn(10, 6, generator=g)
        d = cosine_distances(tokens)
        picked = min_pairwise(d, divprune_indices(tokens[None], 4)[0].tolist())
        subsets = sorted(min_pairwise(d, s) for s in itertools.combinations(range(10), 4))
        assert picked >= subsets[len(subsets) // 2] and picked >= subsets[-1] / 2


def test_visionzip_splits_54_to_10() -> None:
    assert [visionzip_counts(b) for b in (64, 576, 8, 2, 1)] == [(54, 10), (486, 90), (7, 1), (1, 1), (1, 0)]


@pytest.mark.parametrize("seed", range(3))
def test_visionzip_groups_are_the_loops(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    attention, keys, features = torch.rand(2, 20, generator=g), torch.randn(2, 20, 6, generator=g), \
        torch.randn(2, 20, 5, generator=g)
    kept, groups = visionzip_groups(attention, keys, 9, 3)
    merged = group_means(features, groups, 3)
    for n in range(2):
        expected_kept, expected_means = visionzip_loop(attention[n], keys[n], features[n], 9, 3)
        assert kept[n].tolist() == expected_kept
        torch.testing.assert_close(merged[n], torch.stack(expected_means))


@pytest.mark.parametrize("keep, dominant", [(10, 8), (1, 1)])
def test_visionzip_keeps_the_patches_the_vit_class_token_attends_most(keep: int, dominant: int) -> None:
    """Through the tiny model: the dominant tokens are the projected patches with the top-D head-mean attention
    of the class token in the ViT's last layer (its softmax, captured), the contextual ones the projected group
    means of the ViT features, grouped by the head-mean keys of that layer. B=1: one dominant token alone."""
    cfg = tiny_config(prune("visionzip", keep))  # of 16 patches
    model = ReferenceVLM(cfg).eval()
    images = packed_batches(cfg)[0].images
    last = model.vision.decoder.layers[-1]
    inputs: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad(), captured_outputs(last.self_attention.softmax) as probs, \
            tower_readout(cfg, model.vision) as qkv:
        features = model.vision(images)
        visual = model.projector(features)
        filled = image_slot_fill(cfg, visual, None, TowerOutputs(images, features, model.projector, qkv[0]))
        heads, head_dim = cfg.vision.num_attention_heads, cfg.vision.hidden_size // cfg.vision.num_attention_heads
        fused = last.self_attention.linear_qkv(last.input_layernorm(inputs[0]))
        keys = fused.view(*fused.shape[:2], heads, 3, head_dim)[:, 1:, :, 1].mean(dim=2)
    hook.remove()
    assert filled.shape == (len(images), keep, cfg.model.hidden_size)
    for n in range(len(images)):
        kept, means = visionzip_loop(probs[0][n, :, 0, 1:].mean(dim=0), keys[n], features[n], dominant,
                                     keep - dominant)
        torch.testing.assert_close(filled[n, :dominant], visual[n, kept])
        if means:
            with torch.no_grad():
                torch.testing.assert_close(filled[n, dominant:], model.projector(torch.stack(means)))


@pytest.mark.parametrize("method", ["random", "divprune", "visionzip"])
def test_selections_give_the_megatron_model_the_references_logits(method: str) -> None:
    from megavictor.distributed import init_distributed
    from megavictor.model.sharding import shard_into
    from megavictor.model.vlm import VictorVLM

    cfg = tiny_config(prune(method))
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    reference = ReferenceVLM(cfg).eval()
    assert reference.registers is None
    megatron = VictorVLM(cfg, [cfg.model.num_layers]).eval()
    shard_into(megatron, dict(reference.named_parameters()), 0, 1, 0)
    with torch.no_grad():
        for batch in packed_batches(cfg):
            torch.testing.assert_close(megatron(batch, return_logits=True), reference(batch, return_logits=True),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["peer.prune=divprune"], "peer.prune=divprune and peer.prune_to=None go together"),
    (["victor.drop_layer=0", "victor.num_registers=4", "peer.prune_to=4"], "go together"),
    (["peer.prune=random", "peer.prune_to=4"], "set victor.enabled=true victor.num_registers=4 victor.drop_layer=0"),
    (prune("visionzip", 17), r"peer.prune_to=17 must be in \[1, 16\]"),
    (prune("random") + ["peer.avg_pool_to=4"], "peer.avg_pool_to and peer.prune are alternatives"),
    (prune("random") + ["peer.fastv_layer=2"], "peer.fastv_layer and peer.prune are alternatives"),
    (prune("divprune") + ["train.engine=deepspeed"], "peer.prune needs train.engine=megatron"),
    (prune("divprune") + ANYRES, "peer.prune=divprune is not supported with anyres images"),
    (prune("tome"), "peer.prune"),
])
def test_inconsistent_prune_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(overrides)


def test_train_refuses_the_selections_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from megavictor.cli import main

    assert main(["train", "--config", STAGE2, f"train.run_dir={tmp_path}", *prune("divprune")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "megavictor train: error: peer.prune=divprune is an evaluation-time switch (training-free): train without it, "
        "then `megavictor eval --checkpoint RUN ... peer.prune=divprune peer.prune_to=4`"]
    assert not any(tmp_path.iterdir()), "nothing starts"


@pytest.fixture(scope="module")
def baseline_run(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain-LLaVA run (victor.enabled=false), 2 steps: what the training-free selections are set on."""
    run_dir = tmp_path_factory.mktemp("prune") / "baseline"
    run(train_cmd(1, digits_data, run_dir, "victor.enabled=false", "train.max_steps=2", "train.warmup_steps=0"))
    return run_dir


@pytest.mark.parametrize("method, kv_cache", [("random", True), ("divprune", True), ("visionzip", True),
                                              ("visionzip", False)])
def test_eval_applies_a_selection_to_a_baseline_checkpoint(method: str, kv_cache: bool, baseline_run: Path,
                                                           digits_data: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`megavictor eval` with the overrides the benchmark passes: Victor's register slots on, filled by the
    selection, on a checkpoint that has no registers; both decoding paths (the KV cache's twin, the megatron model)."""
    from megavictor.cli import main
    from megavictor.model import peers

    selected: list[tuple[str, int]] = []

    def spy(cfg: Config, visual: torch.Tensor, tower: TowerOutputs) -> torch.Tensor:
        kept = select_visual(cfg, visual, tower)
        selected.append((str(cfg.peer.prune), kept.shape[1]))
        return kept

    monkeypatch.setattr(peers, "select_visual", spy)
    flags = [] if kv_cache else ["--no-kv-cache"]
    argv = ["eval", "--checkpoint", str(baseline_run), "--data", str(digits_data), "--limit", "6",
            "--max-new-tokens", "2", *flags, "victor.enabled=true", *prune(method)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 6 and 0 <= result["accuracy"] <= 1
    assert selected and set(selected) == {(method, 4)}
