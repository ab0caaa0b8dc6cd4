"""`megavictor bench loader`: loader throughput and how much packing saves over one-sample-per-row batching.

Runs the real loader over one epoch of a split (all shards, flushed tail included) with the default Config's
image slots (vision visual tokens + Victor registers per image). `packing_efficiency` is real slots (text, visual
and register) over all slots of the packed batches; `unpacked_efficiency` is the same for the same samples with
one sample per row padded to seq_length (megatron's fixed [micro_batch, seq_length] shapes). The last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from megavictor.config import Config, PromptFormat
from megavictor.data.loader import VictorLoader
from megavictor.data.manifest import DataError
from megavictor.model.batch import KIND_PAD


def main(argv: list[str]) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="megavictor bench loader", description=__doc__)
    parser.add_argument("--data", required=True, help="prepared data set folder (holds manifest.json)")
    parser.add_argument("--split", default="vqa_train")
    parser.add_argument("--seq-length", type=int, default=defaults.data.seq_length)
    parser.add_argument("--micro-batch-size", type=int, default=defaults.data.micro_batch_size)
    parser.add_argument("--workers", type=int, default=defaults.data.num_workers)
    parser.add_argument("--pack-buffer", type=int, default=defaults.data.pack_buffer)
    parser.add_argument("--prompt-format", default=defaults.data.prompt_format, choices=list(PromptFormat))
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the one beside the shards)")
    args = parser.parse_args(argv)

    cfg = Config()
    d = cfg.data
    d.path, d.seq_length, d.micro_batch_size = args.data, args.seq_length, args.micro_batch_size
    d.num_workers, d.pack_buffer, d.prompt_format, d.tokenizer = (args.workers, args.pack_buffer,
                                                                  args.prompt_format, args.tokenizer)
    try:
        loader = VictorLoader.from_config(cfg, args.split, epochs=1)
    except (DataError, FileNotFoundError) as exc:
        print(f"megavictor bench loader: error: {exc}", file=sys.stderr)
        return 1

    start = time.perf_counter()
    samples = batches = real = 0
    for batch, keys in loader.iter_with_keys():
        batches += 1
        samples += sum(len(row) for row in keys)
        real += int((batch.kinds != KIND_PAD).sum())
    seconds = time.perf_counter() - start
    slots = batches * d.micro_batch_size * d.seq_length
    result = {
        "split": args.split, "samples": samples, "batches": batches, "seq_length": d.seq_length,
        "micro_batch_size": d.micro_batch_size, "visual_tokens": cfg.vision.num_visual_tokens,
        "registers": cfg.victor.registers_per_image, "workers": d.num_workers, "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1), "tokens_per_s": round(real / seconds, 1),
        "packing_efficiency": round(real / slots, 4),
        "unpacked_efficiency": round(real / (samples * d.seq_length), 4), "unpacked_padding": "seq_length",
        "truncated": loader.truncated,
    }
    print(f"loader bench: {args.data} split {args.split}, seq_length {d.seq_length}, micro-batch "
          f"{d.micro_batch_size}, {result['visual_tokens']} visual + {result['registers']} register slots/image")
    rows = [("samples", samples), ("micro-batches", batches), ("samples/s", result["samples_per_s"]),
            ("tokens/s (non-pad slots)", result["tokens_per_s"]),
            ("packing efficiency", result["packing_efficiency"]),
            ("unpacked efficiency (pad to seq_length)", result["unpacked_efficiency"]),
            ("truncated samples", loader.truncated)]
    for name, value in rows:
        print(f"  {name:<42} {value}")
    print(json.dumps(result))
    return 0
