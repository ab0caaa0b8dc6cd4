"""Host syncs of a megatron training step, counted on the CPU (`tests.host_syncs`).

One optimizer step of three micro-batches (one and two images packed with text, two images, text only) on every
attention path that runs on the CPU (megatron's local attention with Victor's causal and text_blind masks, the
baseline) and under the GPU defaults that run here (bf16, overlapped gradient reduction and parameter gather with
the distributed optimizer, full recompute). The drop plan is built on the host before the batch is copied, so it is
not counted.

Stated numbers (per optimizer step, whatever the number of micro-batches):
- inside a micro-batch (its forward, loss and backward): 0;
- inside the pipeline schedule, once per step: 1, megatron's own `finalize_model_grads` (`if num_tokens > 0`
  before dividing the gradients by the step's loss-token count; Megatron-LM's per-token loss has it too);
- outside the schedule: 1 device-to-host copy of the step's (loss sum, loss tokens) for logging, and 1 read of the
  gradient norm (megatron's `get_grad_norm_fp32`) that decides whether the update is applied and is logged.
  Megatron-LM's own step has the same two (its loss reduction and its grad-norm / found-inf check).

Not counted, because they run differently on a GPU: megatron's CPU fallback for the fused L2 norm kernel
(`local_multi_tensor_l2_norm`; Transformer Engine or APEX provide `multi_tensor_l2norm` on GPUs) and the inner
optimizer's update (torch's Adam on the CPU, whose step counters are host tensors; a fused Adam on GPUs).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from megavictor.distributed import run_on_local_ranks
from tests.fixtures import samples, tiny_config

PATHS = {
    "victor causal": [],
    "victor text_blind": ["victor.mask=text_blind"],
    "baseline": ["victor.enabled=false"],
    "gpu defaults": ["train.precision=bf16", "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                     "train.distributed_optimizer=true", "train.recompute=full"],
}
INSIDE_PER_STEP = [("item/bool/int/float", "megatron/core/distributed/finalize_model_grads.py")]
OUTSIDE_PER_STEP = Counter({("tolist", "megavictor/engines/megatron.py"): 1,
                            ("item/bool/int/float", "megatron/core/optimizer/clip_grads.py"): 1})


def micro_batches(cfg):  # noqa: ANN001, ANN201
    from megavictor.data.collate import collate_rows, expand_sample

    s = samples()
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    lay = lambda name: expand_sample(s[name], v, r)  # noqa: E731
    rows = [[lay("one_image"), lay("text_only"), lay("two_images")], [lay("two_images")], [lay("text_only")]]
    return [collate_rows([row], cfg.data.seq_length) for row in rows]


def count_rank(run_dir: str, inject_item: bool) -> dict[str, dict[str, list]]:
    """Per path: the syncs inside the schedule and outside it, in the second of two steps."""
    from megavictor.checkpoint.initial_weights import choose_initial_weights
    from megavictor.distributed import init_from_config
    from megavictor.engines import megatron as engine_module
    from tests.host_syncs import HostSyncCounter

    counter = HostSyncCounter()
    inside: list = []
    real_plan, real_schedule = engine_module.build_drop_plan, engine_module.get_forward_backward_func

    def host_plan(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with counter.paused():  # built on the host, before the copy to the device
            return real_plan(*args, **kwargs)

    def schedule():  # noqa: ANN202
        run = real_schedule()

        def counted(**kwargs):  # noqa: ANN003, ANN202
            start = len(counter.events)
            out = run(**kwargs)
            inside.extend(counter.events[start:])
            return out
        return counted

    engine_module.build_drop_plan, engine_module.get_forward_backward_func = host_plan, schedule
    if inject_item:  # a deliberate sync inside the model's forward: the count must see it
        from megavictor.model.vlm import VictorVLM

        real_forward = VictorVLM.forward

        def forward(self, batch, plan=None, return_logits=False):  # noqa: ANN001, ANN202
            out = real_forward(self, batch, plan, return_logits)
            out.sum().item()
            return out
        VictorVLM.forward = forward
    import megatron.core.optimizer.clip_grads as clip_grads

    real_norm = clip_grads.l2_norm_impl

    def cpu_norm(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with counter.paused():  # megatron's CPU fallback of the fused multi-tensor L2 norm
            return real_norm(*args, **kwargs)
    clip_grads.l2_norm_impl = cpu_norm
    results = {}
    init_from_config(tiny_config(["data.micro_batch_size=1", "train.global_batch_size=3"]))
    for name, overrides in PATHS.items():
        cfg = tiny_config(["data.micro_batch_size=1", "train.global_batch_size=3", f"train.run_dir={run_dir}/{name}",
                           *overrides])
        engine = engine_module.MegatronEngine(cfg, init_from_config(cfg), choose_initial_weights(cfg))
        for inner in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
            inner.optimizer.step = paused(counter, inner.optimizer.step)  # torch's Adam here, a fused one on GPUs
        batches = micro_batches(cfg)
        engine.train_step(batches, 0)  # megatron's DDP learns the gradient order in the first step
        counter.events.clear()
        inside.clear()
        with counter.counting():
            result = engine.train_step(batches, 0)
        assert not result.skipped
        outside = list(counter.events)
        for event in inside:
            outside.remove(event)
        results[name] = {"inside": inside[:], "outside": outside}
    return results


def paused(counter, fn):  # noqa: ANN001, ANN201
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with counter.paused():
            return fn(*args, **kwargs)
    return run


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_on_local_ranks(1, count_rank, str(tmp_path_factory.mktemp("syncs")), False)[0]


@pytest.mark.parametrize("path", list(PATHS))
def test_no_host_sync_inside_a_micro_batch(counts: dict, path: str) -> None:
    inside = [(name, where.split(":")[0]) for name, where in counts[path]["inside"]]
    assert inside == INSIDE_PER_STEP, f"{path}: syncs inside the schedule: {counts[path]['inside']}"


@pytest.mark.parametrize("path", list(PATHS))
def test_one_loss_read_and_one_grad_norm_read_per_step(counts: dict, path: str) -> None:
    outside = Counter((name, where.split(" < ")[0].split(":")[0]) for name, where in counts[path]["outside"])
    assert outside == OUTSIDE_PER_STEP, f"{path}: {counts[path]['outside']}"


def test_an_item_in_the_forward_is_counted(tmp_path: Path) -> None:
    counts = run_on_local_ranks(1, count_rank, str(tmp_path), True)[0]
    for path, result in counts.items():
        injected = [where for _, where in result["inside"] if where.startswith("tests/test_host_syncs.py")]
        assert len(injected) == 3, f"{path}: one per micro-batch expected: {result['inside']}"
        assert len(result["inside"]) == len(INSIDE_PER_STEP) + 3, f"{path}: {result['inside']}"
