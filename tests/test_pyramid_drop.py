"""PyramidDrop (`peer.pyramid_layers`, `peer.pyramid_keep`): FastV's ranking at several layers. Each stage keeps, of
the visual slots the stage before kept, those its samples' last instruction tokens attend most; each layer (and its
KV cache) runs on its own stage's slots; FastV is the one-stage case; the analytic FLOPs count every stage; a tiny
run trains with the drops on and evaluates the same with and without the KV cache. The megatron model against the
reference, the cached decoding against the uncached one and the refusals are in test_peers.py and test_kv_cache.py.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from megavictor.config import Config, load_config
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample
from megavictor.model.batch import IGNORE_INDEX, KIND_VISUAL, VictorBatch
from megavictor.model.drop_plan import build_drop_plan
from megavictor.model.flops import decoder_flops, generate_flops, transformer_layer_flops
from megavictor.model.peers import removed_visual
from megavictor.model.visual_select import captured_outputs
from megavictor.model.reference import KVSlot, ReferenceVLM
from tests.fixtures import SEQ_LENGTH, packed_batches, samples, tiny_config
from tests.runs import ROOT, run, train_cmd

LAYERS, KEEP = [1, 2, 3], [8, 4, 2]  # of the tiny model's 16 visual tokens per image, 4 layers
PYRAMID = ["victor.enabled=false", f"peer.pyramid_layers={LAYERS}", f"peer.pyramid_keep={KEEP}"]


def two_turn_batch(cfg: Config) -> VictorBatch:
    """One row: a sample with one image and two question-answer turns (the second question reads the image too),
    then the two-image sample of `samples()`, then padding."""
    g = torch.Generator().manual_seed(7)
    text = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    turns = [(text(3), text(2)), (text(4), text(3))]  # (question, answer)
    tokens, trainable = [IMAGE_PLACEHOLDER], [False]
    for question, answer in turns:
        tokens += question + answer
        trainable += [False] * len(question) + [True] * len(answer)
    two_turns = Sample(tokens, trainable, [torch.randn(3, 32, 32, generator=g)])
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    return collate_rows([[expand_sample(two_turns, v, r), expand_sample(samples()["two_images"], v, r)]], SEQ_LENGTH)


def answer_starts(labels: list[int], segments: list[int]) -> list[int]:
    """The slots that predict the first token of an answer (the last token of each question), by a plain loop."""
    return [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX
            and (i == 0 or labels[i - 1] == IGNORE_INDEX or segments[i - 1] != segments[i])]


def test_each_stage_keeps_what_the_last_instruction_tokens_attend_most_of_the_stage_before() -> None:
    """The probabilities each ranking layer (0, 1, 2) computed, ranked by hand: per image, the mean attention from the
    sample's last instruction tokens (both turns' for the two-turn sample) over the visual slots the previous view
    holds; the plan must keep exactly the top KEEP[n] of them from layer LAYERS[n] on."""
    cfg = tiny_config(PYRAMID)
    model = ReferenceVLM(cfg).eval()
    batch = two_turn_batch(cfg)
    plan = build_drop_plan(batch, cfg)
    with torch.no_grad(), ExitStack() as stack:
        probs = [stack.enter_context(captured_outputs(model.decoder.layers[layer - 1].self_attention.softmax))
                 for layer in LAYERS]
        model(batch, plan)
    v = cfg.vision.num_visual_tokens
    labels, segments = batch.labels[0].tolist(), batch.segment_ids()[0].tolist()
    images = (batch.kinds[0] == KIND_VISUAL).nonzero().flatten().view(-1, v).tolist()  # long slots, image by image
    queries = {segments[q]: [] for q in answer_starts(labels, segments)}
    for q in answer_starts(labels, segments):
        queries[segments[q]].append(q)
    assert [len(qs) for qs in queries.values()] == [2, 1], "control: the first sample has two turns"
    held = [set(image) for image in images]  # the long slots of each image that the current view holds
    first_turn_only_differs = False
    for n, (layer, keep) in enumerate(zip(LAYERS, KEEP)):
        before = plan.views[n]
        columns = (plan.stages[n - 1].keep_index[0] if n else torch.arange(SEQ_LENGTH)).tolist()
        received = probs[n][0].mean(dim=1)[0]  # [S_n, S_n], the heads' mean
        assert received.shape[0] == before.seq_length
        kept = {i for i, ghost in zip(plan.stages[n].keep_index[0].tolist(), plan.stages[n].view.ghost[0].tolist())
                if not ghost}
        for image in range(len(images)):
            slots = sorted(held[image])
            assert len(slots) == (v if n == 0 else KEEP[n - 1])
            cols = [columns.index(i) for i in slots]
            rows = [columns.index(q) for q in queries[segments[slots[0]]]]
            scores = received[rows][:, cols].mean(dim=0)
            expected = {slots[j] for j in scores.topk(keep).indices.tolist()}
            assert held[image] & kept == expected, f"stage {n} image {image}"
            first_turn = {slots[j] for j in received[rows[0], cols].topk(keep).indices.tolist()}
            first_turn_only_differs |= first_turn != expected
            held[image] = expected
    assert first_turn_only_differs, "control: ranking by the first turn alone would have kept other slots"
    # Each layer sees its stage's count of every image's visual slots: 16, then 8, 4, 2.
    for index in range(cfg.model.num_layers):
        view = plan.view_for_layer(index)
        long_slots = (plan.stages[plan.stage_of(index) - 1].keep_index[0] if plan.stage_of(index)
                      else torch.arange(SEQ_LENGTH))
        visual = [int(i) for i, ghost in zip(long_slots, view.ghost[0]) if not ghost
                  and int(batch.kinds[0, i]) == KIND_VISUAL]
        assert [sum(i in image for i in visual) for image in images] == [([v] + KEEP)[plan.stage_of(index)]] * 3


def test_each_layer_caches_only_its_stages_slots() -> None:
    """The KV cache's prefill: every layer holds the keys of its own view (the fewer, the deeper the stage)."""
    cfg = tiny_config(PYRAMID)
    model = ReferenceVLM(cfg).eval()
    batch = packed_batches(cfg)[0]
    plan = build_drop_plan(batch, cfg)
    cache = [KVSlot() for _ in model.decoder.layers]
    with torch.no_grad():
        model.hidden_states(batch, plan, cache)
    lengths = [slot.k.shape[1] for slot in cache]
    assert lengths == [plan.views[plan.stage_of(i)].seq_length for i in range(cfg.model.num_layers)]
    images = int((batch.kinds[0] == KIND_VISUAL).sum()) // cfg.vision.num_visual_tokens
    assert lengths == [SEQ_LENGTH] + [SEQ_LENGTH - images * (cfg.vision.num_visual_tokens - keep) for keep in KEEP]


def test_fastv_is_the_one_stage_case() -> None:
    """FastV's keys give the one-stage plan: on single-turn samples (one last instruction token each) FastV and a
    PyramidDrop of one layer keeping FastV's count keep the same slots and give the same loss."""
    fastv_cfg = tiny_config(["victor.enabled=false", "peer.fastv_layer=2", "peer.fastv_keep=0.3"])  # ceil(4.8)
    pyramid_cfg = tiny_config(["victor.enabled=false", "peer.pyramid_layers=[2]", "peer.pyramid_keep=[5]"])
    fastv, pyramid = ReferenceVLM(fastv_cfg).eval(), ReferenceVLM(pyramid_cfg).eval()
    pyramid.load_state_dict(fastv.state_dict())
    for batch in packed_batches(fastv_cfg):
        plans = build_drop_plan(batch, fastv_cfg), build_drop_plan(batch, pyramid_cfg)
        with torch.no_grad():
            losses = fastv(batch, plans[0]), pyramid(batch, plans[1])
        assert len(plans[0].stages) == 1 and plans[0].stages[0].keep == 5
        assert torch.equal(plans[0].keep_index, plans[1].keep_index)
        assert torch.equal(losses[0], losses[1])


def test_convert_to_hf_refuses_it_in_one_line(tmp_path: Path) -> None:
    """The exported HF model implements the plain Victor drop only: the export names the key, writes nothing."""
    from megavictor.hf.convert import ConversionError, to_hf

    cfg = tiny_config(PYRAMID)
    with pytest.raises(ConversionError, match=r"^peer.pyramid_layers=\[1, 2, 3\] has no HF implementation"):
        to_hf(cfg, ReferenceVLM(cfg).state_dict(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def per_layer_flops(cfg: Config, slots: list[int], factor: float = 3.0) -> float:
    """The decoder and output layer on the given slots per layer (the last layer's reach the output layer)."""
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    return sum(factor * transformer_layer_flops(s, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, groups,
                                                gated=True) for s in slots) \
        + factor * 2.0 * slots[-1] * m.hidden_size * m.vocab_size


@pytest.mark.parametrize("budget", [8, 16, 32])
def test_flops_count_every_stage_on_its_own_slots(budget: int) -> None:
    """The lead's budget mapping on the fidelity recipe (8 layers, 64 visual tokens, drops at 1, 3, 5 keeping B, B/2,
    B/4): `bench accuracy`'s per-sample call counts each layer on its stage's slots; so do the training FLOPs of
    rows with 0-2 images and the cached generation's."""
    cfg = load_config(ROOT / "configs" / "fidelity_stage2.yaml",
                      ["victor.enabled=false", "peer.pyramid_layers=[1,3,5]",
                       f"peer.pyramid_keep=[{budget},{budget // 2},{budget // 4}]"])
    v, t = cfg.vision.num_visual_tokens, cfg.data.text_length
    visual_per_layer = [v, budget, budget, budget // 2, budget // 2, budget // 4, budget // 4, budget // 4]
    sample = decoder_flops(cfg, v + t, v + t - removed_visual(cfg, v))  # as `bench accuracy`'s sample_flops calls it
    assert sample == pytest.approx(per_layer_flops(cfg, [t + n for n in visual_per_layer]), rel=1e-12)
    for images in (0, 1, 2):
        slots = [cfg.data.seq_length - images * (v - n) for n in visual_per_layer]
        row = decoder_flops(cfg, cfg.data.seq_length, cfg.data.seq_length - removed_visual(cfg, images * v))
        assert row == pytest.approx(per_layer_flops(cfg, slots), rel=1e-12)
    prompt, cached = v + t, [t + n for n in visual_per_layer]  # a prefill, then one decoded token over each cache
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    decode = sum(transformer_layer_flops(1, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, groups, gated=True,
                                         context=c + 1) for c in cached) + 2.0 * m.hidden_size * m.vocab_size
    prefill = per_layer_flops(cfg, cached, factor=1.0) - 2.0 * (cached[-1] - 1) * m.hidden_size * m.vocab_size
    assert generate_flops(cfg, [v], prompt, 2, views=0) == pytest.approx(prefill + decode, rel=1e-12)


def test_fastv_flops_are_unchanged() -> None:
    """FastV's count: layers < K on every slot, layers >= K on the kept share (as before PyramidDrop)."""
    cfg = tiny_config(["victor.enabled=false", "peer.fastv_layer=2"])
    visual = 3 * cfg.vision.num_visual_tokens  # the first packed row's three images
    assert removed_visual(cfg, visual) == visual // 2
    short = SEQ_LENGTH - visual // 2
    assert decoder_flops(cfg, SEQ_LENGTH, short) == pytest.approx(
        per_layer_flops(cfg, [SEQ_LENGTH] * 2 + [short] * 2), rel=1e-12)


def test_a_tiny_run_trains_with_the_drops_and_evaluates_alike_with_and_without_the_cache(
        digits_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two training steps with three drops (the demo model: 6 layers, 64 visual tokens -> 16, 8, 4), then `megavictor
    eval` with the KV cache and without it: the same answers."""
    from megavictor.cli import main

    run_dir = tmp_path / "run"
    run(train_cmd(1, digits_data, run_dir, "victor.enabled=false", "peer.pyramid_layers=[1,3,5]",
                  "peer.pyramid_keep=[16,8,4]", "train.max_steps=2", "train.warmup_steps=0"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    results = []
    for flags in ([], ["--no-kv-cache"]):
        assert main(["eval", "--checkpoint", str(run_dir), "--data", str(digits_data), "--limit", "6",
                     "--max-new-tokens", "2", *flags]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["n"] == 6 and results[0] == results[1]
