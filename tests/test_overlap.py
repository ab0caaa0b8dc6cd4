"""Overlapped data-parallel gradient reduction on gloo: several buckets, each reduction started inside backward."""

from __future__ import annotations

import math

import pytest
import torch

from megavictor.distributed import run_on_local_ranks
from tests.fixtures import packed_batches, samples, tiny_config


def overlap_rank() -> dict:
    """Two optimizer steps of dp2 with `parallel.overlap_grad_reduce`; record, per bucket reduction started, whether
    a backward pass was running."""
    from megavictor.distributed import init_from_config
    from megavictor.engines.megatron import build_model, forward_backward, wrap_for_training

    cfg = tiny_config(["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=20000",
                       "data.micro_batch_size=1"])
    ddp, optimizer = wrap_for_training(cfg, build_model(cfg, init_from_config(cfg)))
    in_backward, started = [False], []
    real_backward = torch.autograd.backward

    def backward(*args, **kwargs):  # megatron's backward_step calls torch.autograd.backward
        in_backward[0] = True
        try:
            return real_backward(*args, **kwargs)
        finally:
            in_backward[0] = False

    torch.autograd.backward = backward
    for group in ddp.bucket_groups:
        def start(*args, _start=group.start_grad_sync, **kwargs):
            started.append(in_backward[0])
            return _start(*args, **kwargs)
        group.start_grad_sync = start
    steps = []
    for _ in range(2):
        started.clear()
        ddp.zero_grad_buffer()
        forward_backward(ddp, packed_batches(cfg))
        optimizer.step()
        steps.append(list(started))
    return dict(buckets=len(ddp.bucket_groups), steps=steps)


def test_gradient_reduction_overlaps_backward() -> None:
    for rank in run_on_local_ranks(2, overlap_rank):
        assert rank["buckets"] > 1, rank
        first, second = rank["steps"]
        # megatron counts each bucket's gradients in step 1 and reduces after backward; from step 2 every bucket's
        # reduction starts as soon as its gradients are complete, during backward.
        assert len(second) == rank["buckets"] and all(second), rank
        assert len(first) == rank["buckets"], rank


def imageless_steps_rank(overrides: list[str]) -> list[float]:
    """dp2 steps under every overlap, in small buckets, where one whole step (both ranks) holds no image: its image-
    path parameters get zero gradients and their buckets are reduced and all-gathered like every other."""
    from megavictor.data.collate import collate_rows, expand_sample
    from megavictor.distributed import init_from_config
    from megavictor.engines.megatron import build_model, forward_backward, wrap_for_training

    cfg = tiny_config(["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                       "train.distributed_optimizer=true", "parallel.ddp_bucket_size=5000",
                       "data.micro_batch_size=1", *overrides])
    ddp, optimizer = wrap_for_training(cfg, build_model(cfg, init_from_config(cfg)))
    s = samples()
    lay = lambda name: expand_sample(s[name], cfg.vision.num_visual_tokens, cfg.victor.registers_per_image)  # noqa: E731
    with_images = [collate_rows([[lay("one_image"), lay("text_only")]], 128), collate_rows([[lay("two_images")]], 128)]
    text_only = [collate_rows([[lay("text_only")]], 128), collate_rows([[lay("text_only"), lay("text_only")]], 128)]
    losses = []
    for batches in (with_images, text_only, with_images, text_only):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss_sum, tokens = forward_backward(ddp, batches)
        optimizer.step()
        losses.append(loss_sum / tokens)
    return losses


@pytest.mark.parametrize("overrides", [["train.llava_stage=1"], ["train.llava_stage=2", "vision.freeze=false"]],
                         ids=["stage1", "stage2-vision-trained"])
def test_steps_without_images_under_overlapped_reduction_and_gather(overrides: list[str]) -> None:
    for losses in run_on_local_ranks(2, imageless_steps_rank, overrides):
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
