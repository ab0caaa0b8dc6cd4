"""Overlapped data-parallel gradient reduction on gloo: several buckets, each reduction started inside backward."""

from __future__ import annotations

import torch

from tests.fixtures import packed_batches, tiny_config
from tests.spawn import run_ranks


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
    for rank in run_ranks(2, overlap_rank):
        assert rank["buckets"] > 1, rank
        first, second = rank["steps"]
        # megatron counts each bucket's gradients in step 1 and reduces after backward; from step 2 every bucket's
        # reduction starts as soon as its gradients are complete, during backward.
        assert len(second) == rank["buckets"] and all(second), rank
        assert len(first) == rank["buckets"], rank
