"""One torchrun job for the decoder-family round trips (tests/test_hf_families.py): for each imported checkpoint, the
tp=2 x pp=2 model with its weights computes the logits of a fixed batch, and is saved again in that layout.

    torchrun --nproc-per-node 4 -m tests.families_payload JOBS.json

JOBS.json: [{"checkpoint": imported dir, "out": checkpoints dir to write, "batch": torch.save'd VictorBatch,
"logits": file the last stage writes}]. One launch covers every family: the process start and the imports of
megatron are paid once.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megavictor.checkpoint import megatron as megatron_checkpoint
from megavictor.checkpoint import read_config, resolve
from megavictor.checkpoint.hf_source import read_source
from megavictor.checkpoint.initial_weights import InitialWeights, WeightOrigin
from megavictor.distributed import init_from_config
from megavictor.engines.megatron import build_model
from megavictor.model.batch import VictorBatch
from megavictor.model.drop_plan import build_drop_plan


def logits_at_tp2_pp2(model: torch.nn.Module, batch: VictorBatch) -> torch.Tensor | None:
    """The full-vocabulary logits [B, S', V] on the last pipeline stage (None elsewhere), through megatron's
    pipeline schedule."""
    captured: list[torch.Tensor] = []

    def step(data: Iterator[VictorBatch], chunk: torch.nn.Module) -> tuple[torch.Tensor, object]:
        micro = next(data)
        out = chunk(micro, build_drop_plan(micro, chunk.cfg), return_logits=True)

        def loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
            captured.append(logits.detach())
            return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return out, loss

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                    num_microbatches=1, seq_length=batch.shape[1], micro_batch_size=batch.shape[0],
                                    forward_only=True)
    return captured[0] if captured else None


def main(argv: list[str]) -> int:
    for job in json.loads(Path(argv[0]).read_text()):
        checkpoint = resolve(job["checkpoint"])
        cfg = copy.deepcopy(read_config(checkpoint))
        cfg.parallel.tp, cfg.parallel.pp = 2, 2
        dims = init_from_config(cfg)
        model = build_model(cfg, dims, InitialWeights(WeightOrigin.INIT_FROM, checkpoint=checkpoint)).eval()
        logits = logits_at_tp2_pp2(model, torch.load(job["batch"], weights_only=False))
        if logits is not None and dims.tp_rank == 0:
            torch.save(logits, job["logits"])
        megatron_checkpoint.save(job["out"], 0, model, cfg=cfg, source=read_source(checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
