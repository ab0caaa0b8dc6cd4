"""`megavictor bench loader --data DIR [--dp N] [--seq-length N] [overrides]`: what one data-parallel rank's
loader does per training step.

Runs data-parallel rank 0 of `--dp N` (tp = pp = 1) through `--steps` steps of the training data (default: one
epoch of the split) with the demo's stage-2 shape (`configs/demo_stage2.yaml`: 64 visual + 8 register slots per
image, seq_length 512, micro-batch 2; `--seq-length N` sets `data.seq_length`, and trailing `section.key=value`
overrides apply on top of everything, as in `megavictor train`) and a global batch of `--global-batch-size` rows
(default 64). It reports the samples the rank decodes per second, the images it decodes per step (falls as 1/dp:
each rank decodes only its own rows) and, over one epoch of the global row order, `packing_efficiency` (real slots,
text + visual + register, over all slots of the packed rows) and `unpacked_efficiency` (the same real slots over
the slots of one sample per row padded to seq_length, megatron's fixed [micro_batch, seq_length] shape without
packing), and `visual_per_image`, the mean visual slots per image over that epoch (`visual_tokens` at fixed
resolution; under LLaVA-NeXT's anyres each image's count follows from its size). The last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from megavictor.config import load_config
from megavictor.data.row_order import RowOrder
from megavictor.data.training_data import TrainData
from megavictor.distributed import ParallelDims
from megavictor.model.batch import KIND_PAD

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_stage2.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench loader", description=__doc__)
    parser.add_argument("--data", required=True, help="prepared data set folder (holds manifest.json, index.npz)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size; rank 0 is measured (default 1)")
    parser.add_argument("--split", default="vqa_train")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="the shape (default: the demo's stage 2)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="slots per row (data.seq_length; default: the config's, 512 for the demo's stage 2)")
    parser.add_argument("--global-batch-size", type=int, default=64, help="rows per step (default 64)")
    parser.add_argument("--steps", type=int, default=None, help="steps to run (default: one epoch of the split)")
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes (data.num_workers)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides on top of the above, e.g. data.pack_buffer=8")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    own = [f"data.path={args.data}", f"data.train_split={args.split}",
           f"train.global_batch_size={args.global_batch_size}", f"data.num_workers={args.workers}",
           "train.init_from=null"]
    if args.seq_length is not None:
        own.append(f"data.seq_length={args.seq_length}")
    cfg = load_config(args.config, own + args.overrides)
    dims = ParallelDims(world=args.dp, rank=0, tp=1, pp=1, dp=args.dp, tp_rank=0, pp_rank=0, dp_rank=0)
    data = TrainData(cfg, dims)
    plan = data.data.order
    epoch = [row for row in RowOrder(data.data.index, replace(plan.spec, epochs=1)).rows() if row]
    steps = args.steps or max(1, len(epoch) // data.rows_per_step)
    real = sum(plan.row_slots(r) for r in epoch)
    epoch_images = sum(plan.row_images(r) for r in epoch)
    epoch_samples = sum(len(r) for r in epoch)
    start = time.perf_counter()
    samples = images = 0
    for _ in range(steps):
        batches = data.next_step()
        images += batches.images
        samples += sum(int((b.kinds.flatten()[b.cu_seqlens[:-1].long()] != KIND_PAD).sum()) for b in batches.mine)
    seconds = time.perf_counter() - start
    result = {
        "dp": args.dp, "split": args.split, "steps": steps, "global_batch_rows": data.rows_per_step,
        "micro_batches_per_rank": data.per_rank, "seq_length": cfg.data.seq_length,
        "visual_tokens": cfg.vision.num_visual_tokens, "registers": cfg.victor.registers_per_image,
        "visual_per_image": round(sum(plan.row_visual(r) for r in epoch) / max(epoch_images, 1), 2),
        "workers": args.workers, "seconds": round(seconds, 3),
        "samples_per_rank_per_step": round(samples / steps, 2),
        "samples_per_s_per_rank": round(samples / seconds, 1),
        "images_decoded_per_rank_per_step": round(images / steps, 2),
        "packing_efficiency": round(real / (len(epoch) * cfg.data.seq_length), 4),
        "unpacked_efficiency": round(real / (epoch_samples * cfg.data.seq_length), 4),
        **data.counts,
    }
    print(f"loader bench: {args.data} split {args.split}, dp {args.dp} (rank 0 measured), {steps} steps of "
          f"{data.rows_per_step} rows x {cfg.data.seq_length} slots, {result['visual_per_image']} visual"
          f"{' (anyres, mean)' if cfg.vision.anyres() else ''} + {result['registers']} register slots/image")
    for name in ("samples_per_s_per_rank", "samples_per_rank_per_step", "images_decoded_per_rank_per_step",
                 "packing_efficiency", "unpacked_efficiency"):
        print(f"  {name:<36} {result[name]}")
    print(json.dumps(result))
    return 0


