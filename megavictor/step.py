"""Forward and backward over a list of micro-batches through megatron's pipeline schedule (1F1B).

The loss is a per-token sum (megatron's `calculate_per_token_loss`): each micro-batch returns (sum of token
losses, number of loss tokens), gradients are sums, and the caller divides by the global token count, so the
result does not depend on how packed micro-batches are split across ranks and accumulation steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megavictor.model.batch import VictorBatch


@dataclass
class StepResult:
    loss_sum: float  # summed over this rank's micro-batches (last pipeline stage only; 0 elsewhere)
    num_tokens: int


def _forward_step(data_iterator: Iterator[VictorBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    batch = next(data_iterator)
    plan = get_attr_wrapped_model(model, "plan")(batch)  # `model` may be wrapped in megatron's DDP
    output = model(batch, plan)
    mask = plan.loss_mask()

    def loss_func(token_losses: torch.Tensor):
        loss_sum = token_losses.sum()
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return output, loss_func


def forward_backward(model: torch.nn.Module, micro_batches: list[VictorBatch], forward_only: bool = False) -> StepResult:
    """Run all micro-batches; gradients (unless `forward_only`) accumulate as per-token sums."""
    b, s = micro_batches[0].shape
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b, forward_only=forward_only)
    loss_sum, num_tokens = 0.0, 0
    if parallel_state.is_pipeline_last_stage():
        for item in outputs:
            loss_sum += float(item["loss"][0])
            num_tokens += int(item["loss"][1])
    return StepResult(loss_sum, num_tokens)
