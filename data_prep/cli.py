"""`megavictor prep <source>` (also `python -m data_prep`): turn image-text data into WebDataset shards."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_STAGE1 = Path(__file__).resolve().parents[1] / "configs" / "demo_stage1.yaml"
HIRES_STAGE1 = DEMO_STAGE1.with_name("hires_stage1.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor prep", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)

    llava = sub.add_parser("llava", help="LLaVA-format JSON + image folder -> tar shards + manifest.json")
    llava.add_argument("--json", type=Path, required=True, help="LLaVA JSON list of records")
    llava.add_argument("--images", type=Path, required=True, help="folder the records' 'image' paths are under")
    llava.add_argument("--out", type=Path, required=True, help="output folder (shards, manifest.json)")
    llava.add_argument("--split", default="train", help="split name of the shards (default: train)")
    llava.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most (default 10000)")
    llava.add_argument("--maxsize", type=int, default=1_000_000_000,
                       help="start a new shard once this many payload bytes are written (default 1e9)")
    llava.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image-checking processes")
    llava.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping")
    llava.add_argument("--restart", action="store_true", help="discard an interrupted run in --out, do not resume")
    llava.add_argument("--tokenizer", default=None,
                       help="your LLM's HF tokenizer dir: also write the length index (else run `prep index` later)")
    llava.add_argument("--system-prompt", default="", help="the v1 system prompt for the index (data.system_prompt)")
    llava.add_argument("--max-slots", type=int, default=None,
                       help="skip records needing more slots than this (data.seq_length; needs --tokenizer)")
    llava.add_argument("--image-slots", type=int, default=584,
                       help="slots per image for --max-slots (visual + register tokens; default 576 + 8)")
    llava.add_argument("--min-image-side", type=int, default=8, help="skip images with a shorter side (default 8)")
    llava.add_argument("--max-image-pixels", type=int, default=40_000_000,
                       help="skip images with more pixels (default 4e7)")

    digits = sub.add_parser("digits", help="the embedded handwritten-digit grids (captions + VQA) + tokenizer")
    digits.add_argument("--out", type=Path, default=None,
                        help="output folder (default data/digits, with --hires data/digits_hires)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the scan split and the grids (default 0)")
    digits.add_argument("--grid", type=int, default=None, choices=(2, 4),
                        help="cells per image side: 2 (4 cells, the demo default) or 4 (16 cells, 8x8 digits)")
    digits.add_argument("--hires", action="store_true",
                        help="the anyres task: 32x64 to 96x32 px canvases of native 8x8 digits in 16-px cells, "
                             "questions by row and column (no --grid)")
    digits.add_argument("--test-samples", type=int, default=None,
                        help="questions in vqa_test (default 2500: one run's exact-match noise <= 1 point, as "
                             "`bench accuracy` needs; the first 500 are the same at every size)")
    digits.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    digits.add_argument("--restart", action="store_true", help="discard an interrupted run in --out, do not resume")
    digits.add_argument("--vision-config", type=Path, default=None,
                        help="config whose vision tower is pretrained into OUT/vision_encoder.safetensors "
                             "(default: the demo's configs/demo_stage1.yaml, with --hires configs/hires_stage1.yaml)")
    digits.add_argument("--vision-steps", type=int, default=600,
                        help="vision pretraining steps of 64 images (default 600, ~30 s on 2 cores; 0: skip)")
    mix = sub.add_parser("mix", help="a small LLaVA-mix-shaped set (text-only, 1-3 images, aspect 1:3..3:1, "
                                     "multi-turn) through `prep llava`, in seconds")
    mix.add_argument("--out", type=Path, required=True, help="output folder (shards, manifest, index, tokenizer, "
                                                             "the LLaVA JSON + images under llava/)")
    mix.add_argument("--samples", type=int, default=400, help="samples of the train split (default 400)")
    mix.add_argument("--eval-samples", type=int, default=64,
                     help="samples of the val and of the test split each (default 64; 0: train only)")
    mix.add_argument("--seed", type=int, default=0, help="seed of the records and images (default 0)")
    mix.add_argument("--text-only-fraction", type=float, default=0.2,
                     help="fraction of text-only conversations (default 0.2)")
    mix.add_argument("--multi-image-fraction", type=float, default=0.25,
                     help="fraction of samples with two or three images (default 0.25)")
    index = sub.add_parser("index", help="write (or rewrite) the per-sample length index of a prepared data set")
    index.add_argument("--data", type=Path, required=True, help="prepared data set folder (holds manifest.json)")
    index.add_argument("--tokenizer", type=Path, default=None,
                       help="HF tokenizer dir (default: the one stored beside the shards)")
    index.add_argument("--system-prompt", default="",
                       help="the v1 system prompt the runs will use (data.system_prompt; default empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data_prep.shards import PrepError  # after parsing, so --help does not import webdataset/torch
    from megavictor.errors import UserError

    try:
        if args.kind == "llava":
            from data_prep.llava import RecordLimits, prep_llava

            limits = RecordLimits(min_image_side=args.min_image_side, max_image_pixels=args.max_image_pixels,
                                  max_slots=args.max_slots, image_slots=args.image_slots, tokenizer=args.tokenizer,
                                  system=args.system_prompt)
            prep_llava(args.json, args.images, args.out, split=args.split, maxcount=args.maxcount,
                       maxsize=args.maxsize, workers=args.workers, strict=args.strict, restart=args.restart,
                       limits=limits)
        elif args.kind == "mix":
            from data_prep.llava_mix import prep_mix

            prep_mix(args.out, samples=args.samples, seed=args.seed, text_only_fraction=args.text_only_fraction,
                     eval_samples=args.eval_samples, multi_image_fraction=args.multi_image_fraction)
        elif args.kind == "index":
            from megavictor.data.index import build_index

            print(f"wrote {build_index(args.data, args.tokenizer, args.system_prompt)}")
        else:
            from data_prep.digits import TEST_SAMPLES, prep_digits
            from data_prep.vision_encoder import ensure_vision_encoder

            out = args.out or Path("data/digits_hires" if args.hires else "data/digits")
            test_samples = TEST_SAMPLES if args.test_samples is None else args.test_samples
            prep_digits(out, maxcount=args.maxcount, seed=args.seed, restart=args.restart, grid=args.grid,
                        hires=args.hires, test_samples=test_samples)
            if args.vision_steps > 0:
                vision_config = args.vision_config or (HIRES_STAGE1 if args.hires else DEMO_STAGE1)
                ensure_vision_encoder(out, vision_config, args.vision_steps, args.seed)
    except (PrepError, UserError) as exc:
        print(f"megavictor prep {args.kind}: error: {exc}", file=sys.stderr)
        return 2  # a user error: one line, as every megavictor verb
    except KeyboardInterrupt:
        print(f"megavictor prep {args.kind}: interrupted; run the same command again to resume "
              f"(or pass --restart)", file=sys.stderr)
        return 130
    return 0
