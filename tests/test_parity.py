"""Tensor-, sequence- and pipeline-parallel VictorVLM (and full recompute) vs the single-process reference: loss and
every gradient (fp32)."""

from __future__ import annotations

import pytest
import torch

from megavictor.distributed import run_on_local_ranks
from tests.fixtures import ANYRES, packed_batches, tiny_config

REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def parity_rank(overrides_per_case: list[list[str]]) -> list[dict]:
    """Runs on every rank: build both models from the same weights, step once, compare this rank's shard."""
    from megatron.core import parallel_state

    from megavictor.distributed import init_from_config
    from megavictor.engines.megatron import bucketed_short_length, forward_backward
    from megavictor.model.batch import KIND_VISUAL
    from megavictor.model.peers import removed_in_layer, removed_visual, shortened_from
    from megavictor.model.pipeline_split import layers_per_stage
    from megavictor.model.reference import ReferenceVLM
    from megavictor.model.sharding import first_layer, full_name, shard, shard_into
    from megavictor.model.vlm import VictorVLM

    results = []
    for overrides in overrides_per_case:
        cfg = tiny_config(overrides)
        dims = init_from_config(cfg)
        layers = layers_per_stage(cfg)
        offset = first_layer(layers, dims.pp_rank)
        torch.manual_seed(0)
        reference = ReferenceVLM(cfg)
        model = VictorVLM(cfg, layers, pre_process=dims.is_first_stage, post_process=dims.is_last_stage)
        shard_into(model, dict(reference.named_parameters()), dims.tp_rank, dims.tp, offset)

        # What each layer's attention actually runs on (layer k drops at its input, before attending).
        seen_lengths: dict[int, list[int]] = {}
        for layer in model.decoder.layers:
            def record(module, args, kwargs, index=layer.layer_number - 1):
                hidden = args[0] if args else kwargs["hidden_states"]
                seen_lengths.setdefault(index, []).append(hidden.shape[0])
            layer.self_attention.register_forward_pre_hook(record, with_kwargs=True)

        batches = packed_batches(cfg)
        loss_sum, _ = forward_backward(model, batches)
        sp_norms = [p for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]
        if cfg.parallel.sequence_parallel:
            # What finalize_model_grads does for the DDP-wrapped model (the training runs test that path): sum the
            # gradients of weights that each tensor-parallel rank saw only a slice of the sequence through.
            assert sp_norms or cfg.train.llava_stage == 1, "no parameter is marked sequence_parallel"
            for param in sp_norms:
                torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
        ref_loss = sum(reference(b).sum() for b in batches)
        ref_loss.backward()
        ref_grads = dict(reference.named_parameters())

        grad_errors, missing = {}, []
        for name, param in model.named_parameters():
            full = full_name(name, offset)
            if not param.requires_grad:
                assert ref_grads[full].grad is None or not ref_grads[full].requires_grad
                continue
            if param.grad is None:
                missing.append(name)
                continue
            grad_errors[full] = _rel(param.grad, shard(full, ref_grads[full].grad, dims.tp_rank, dims.tp))
        removed = [removed_visual(cfg, int((b.kinds == KIND_VISUAL).sum())) for b in batches]
        results.append(dict(
            overrides=overrides, layers=layers, is_last=dims.is_last_stage, loss=loss_sum,
            ref_loss=float(ref_loss), grad_errors=grad_errors, missing=missing, seen_lengths=seen_lengths,
            seq_length=cfg.data.seq_length, drop_layer=shortened_from(cfg), removed_per_batch=removed,
            removed_per_layer={index: [removed_in_layer(cfg, index, r) for r in removed]
                               for index in range(cfg.model.num_layers)},
            sp=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1, bucket=bucketed_short_length(cfg, batches),
            recompute_full=cfg.train.recompute == "full",
            trainable=sum(p.requires_grad for p in model.parameters())))
    return results


def check(all_ranks: list[list[dict]]) -> None:
    for rank, cases in enumerate(all_ranks):
        for case in cases:
            label = f"rank {rank} {case['overrides']} split {case['layers']}"
            if case["is_last"]:
                assert abs(case["loss"] - case["ref_loss"]) <= REL_TOL * abs(case["ref_loss"]), label
            assert not case["missing"], f"{label}: no gradient for {case['missing']}"
            assert case["trainable"] == 0 or case["grad_errors"], label
            worst = max(case["grad_errors"].items(), key=lambda kv: kv[1], default=("-", 0.0))
            assert worst[1] <= REL_TOL, f"{label}: gradient of {worst[0]} off by {worst[1]:.2e} (relative)"
            # The drop is real: layers >= k attend over the sequence without its visual slots (FastV: without the
            # half it does not keep; PyramidDrop: without what each stage has dropped by then).
            for layer, lengths in case["seen_lengths"].items():
                dropped = case["drop_layer"] is not None and layer >= case["drop_layer"]
                # Under sequence parallelism each rank holds 1/tp of the sequence, the short one aligned to tp.
                sp = case["sp"]
                expected = [-(-(case["seq_length"] - v) // sp) for v in case["removed_per_layer"][layer]]
                if dropped and case["bucket"] is not None:  # the step's bucket, the same for all micro-batches
                    expected = [case["bucket"] // sp for _ in expected]
                if case["recompute_full"]:  # a recomputed layer runs again in backward
                    assert sorted(set(lengths)) == sorted(set(expected)), f"{label}: layer {layer} saw {lengths}"
                else:
                    assert lengths == expected, f"{label}: layer {layer} saw lengths {lengths}, expected {expected}"
            if case["recompute_full"]:
                calls = [len(lengths) for lengths in case["seen_lengths"].values()]
                assert max(calls) == 2 * len(case["removed_per_batch"]), f"{label}: no layer was recomputed"


VICTOR_K = [["victor.drop_layer=1"], ["victor.drop_layer=2"], ["victor.drop_layer=3"], ["victor.enabled=false"]]
UNFROZEN = ["vision.freeze=false"]
SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
FULL = ["train.recompute=full"]


@pytest.mark.parametrize("layout,world,cases", [
    pytest.param(["parallel.tp=2"], 2, [["victor.drop_layer=3"], ["victor.enabled=false"],
                                        ["victor.mask=text_blind"], ["train.llava_stage=1"],
                                        ["model.num_query_groups=2"], ["train.recompute=selective"],
                                        ["victor.enabled=false", "peer.fastv_layer=2"],
                                        ["victor.enabled=false", "peer.pyramid_layers=[1,2,3]",
                                         "peer.pyramid_keep=[8,4,2]"],
                                        ["victor.num_registers=4", "victor.drop_layer=0", "peer.avg_pool_to=4"],
                                        ANYRES, [*ANYRES, "victor.enabled=false"]],
                 id="tp2"),
    # With the even split [2, 2]: k=1 inside stage 0, k=2 at the boundary, k=3 inside stage 1.
    pytest.param(SP, 2, [["victor.drop_layer=3"], ["victor.enabled=false"], ["victor.mask=text_blind"],
                         ["train.llava_stage=1"], ["victor.drop_layer=1", *FULL], [*ANYRES, "train.llava_stage=1"]],
                 id="tp2-sp"),
    # Static pipeline shapes: both micro-batches drop to the bucket 112 (they need 80 and 112 slots).
    pytest.param(["parallel.pp=2"], 2, VICTOR_K + [["victor.drop_layer=2", "parallel.pipeline_length_buckets=[96,112]"],
                                                   ["victor.drop_layer=1", "parallel.pipeline_length_buckets=[120]"],
                                                   [*ANYRES, "victor.drop_layer=2"]],
                 id="pp2"),
    # tp x pp in one launch of 4 ranks: with sequence parallelism, without it (every tensor-parallel rank sends the
    # whole sequence: the short one when k=2 is at the boundary, the long one when k=3 is inside stage 1; k=1 and the
    # baseline send the same shapes as those two), and full recompute (uniform and block); k inside stage 0, at the
    # boundary and inside stage 1 of the even split [2, 2].
    pytest.param([*SP, "parallel.pp=2"], 4, VICTOR_K + [[*k, "parallel.sequence_parallel=false"]
                                                       for k in VICTOR_K[1:3]] + [
        ["victor.drop_layer=1", *FULL], ["victor.drop_layer=2", *FULL, "train.recompute_method=block"],
        ["victor.drop_layer=3", *FULL, "train.recompute_num_layers=2"], [*ANYRES, "victor.drop_layer=1"]],
                 id="tp2xpp2-sp-recompute"),
    # 6 layers with short text: balanced picks [2, 4] for k=2 (boundary) and k=3 (inside stage 1).
    pytest.param(["parallel.pp=2", "parallel.pp_split=balanced", "model.num_layers=6", "data.text_length=8"], 2,
                 VICTOR_K, id="pp2-balanced"),
])
def test_parallel_matches_reference(layout: list[str], world: int, cases: list[list[str]]) -> None:
    results = run_on_local_ranks(world, parity_rank, [layout + UNFROZEN + case for case in cases])
    check(results)
    if "parallel.pp_split=balanced" in layout:
        splits = {tuple(c["layers"]) for c in results[0]}
        assert (2, 4) in splits, f"balanced split never differed from even: {splits}"


def test_single_process_matches_reference() -> None:
    check(run_on_local_ranks(1, parity_rank, [UNFROZEN + case for case in VICTOR_K]))
