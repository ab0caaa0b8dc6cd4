"""The CPU compatibility layer: each megatron-core CUDA assumption we work around, pinned down."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compatibility layer is off where CUDA exists")


@pytest.fixture(scope="module", autouse=True)
def compat():
    from megavictor.compat import cpu_compat_active
    from megavictor.distributed import init_distributed

    init_distributed(tp=1, pp=1, seed=123)  # a world of one gloo process, as `megavictor train` alone starts
    assert cpu_compat_active()


def test_cuda_devices_map_to_cpu() -> None:
    assert torch.zeros(2, device="cuda").device.type == "cpu"  # schedules.py's token counter
    assert torch.ones(2).cuda().device.type == "cpu"  # CLIPViTModel's position ids
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"  # p2p buffers
    torch.cuda.synchronize()


def test_rng_tracker_forks_cpu_streams() -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    assert not torch.equal(forked, torch.rand(4))
    with get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    assert not torch.equal(forked, again), "the tracked stream advances between forks"


def test_megatron_activation_checkpoint_runs_on_cpu() -> None:
    from megatron.core import tensor_parallel

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    tensor_parallel.checkpoint(lambda t: torch.tanh(layer(t)), False, x).sum().backward()
    expected = torch.autograd.grad(torch.tanh(layer(x)).sum(), x)[0]
    assert torch.allclose(x.grad, expected)


def test_tensor_type_reports_cuda_names() -> None:
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # what megatron's fp32 optimizer checks
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions still work
