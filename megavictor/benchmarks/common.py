"""What the benchmarks share: the CPU-width LLaVA-1.5 and LLaVA-NeXT shapes, synthetic image + text batches, timers,
peak memory, medians."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from megavictor.config import Config, load_config
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample
from megavictor.model.batch import KIND_TEXT, KIND_VISUAL, VictorBatch
from megavictor.model.drop_plan import FP8_ALIGNMENT

# LLaVA-1.5-7B's token counts at CPU width: 32 decoder layers, 576 visual tokens (a small frozen ViT with 24 x 24
# patches of a 96 px image instead of CLIP ViT-L/336's 24 x 24 patches of 14 px), R=8 registers, drop at k=3.
CPU_LLAVA15 = [
    "model.num_layers=32", "model.hidden_size=128", "model.ffn_hidden_size=352", "model.num_attention_heads=4",
    "model.vocab_size=512",
    "vision.image_size=96", "vision.patch_size=4", "vision.num_layers=2", "vision.hidden_size=32",
    "vision.ffn_hidden_size=128", "vision.num_attention_heads=2", "vision.freeze=true",
    "victor.enabled=true", "victor.num_registers=8", "victor.drop_layer=3",
    "data.seq_length=1024", "data.text_length=64", "train.llava_stage=2", "train.lr=1e-4", "log.wandb=false",
]

# LLaVA-NeXT-7B's token counts at CPU width: CPU_LLAVA15 with v1.6's anyres grids scaled to its 96-px tiles (24 x 24
# patches each, as CLIP ViT-L/336's), so an image takes up to 576 + 48 x 49 = 2928 visual tokens.
CPU_LLAVA_NEXT = [*CPU_LLAVA15, "vision.image_grid_pinpoints=[[96,192],[192,96],[192,192],[288,96],[96,288]]",
                  "data.image_aspect_ratio=anyres", "data.seq_length=4096"]
# The anyres benchmarks' images, cycled over a step's samples, as (height, width) at LLaVA-NeXT's 336-px tiles
# (scaled to the config's tile): COCO-like 4:3 landscape and 3:4 portrait, a square, a 1:3 panorama and a 3:1
# page. v1.6 gives them 2340, 2352, 2928, 2328 and 2376 visual tokens.
ANYRES_IMAGE_MIX = [(480, 640), (640, 480), (512, 512), (336, 1008), (1008, 336)]


def anyres_image_sizes(cfg: Config) -> list[tuple[int, int]]:
    """`ANYRES_IMAGE_MIX` at `cfg`'s tile size."""
    scale = cfg.vision.image_size / 336
    return [(round(h * scale), round(w * scale)) for h, w in ANYRES_IMAGE_MIX]


def bench_config(path: str | None, overrides: list[str], defaults: list[str] = CPU_LLAVA15) -> Config:
    """The YAML recipe at `path`, or without one the benchmark's default shape; then dotted overrides."""
    return load_config(path, ([] if path else list(defaults)) + list(overrides))


def variant(cfg: Config, victor: bool, text_length: int | None = None) -> Config:
    """`cfg` with Victor on or off (the baseline is `victor.enabled=false`), seq_length = one sample's slots
    (`bench_seq_length`)."""
    d = cfg.to_dict()
    d["victor"]["enabled"] = victor
    if text_length is not None:
        d["data"]["text_length"] = text_length
    t = d["data"]["text_length"]
    d["data"]["seq_length"] = bench_seq_length(cfg, victor, t)
    overrides = [f"{s}.{k}={json.dumps(v)}" for s, vals in d.items() for k, v in vals.items()]
    return load_config(None, overrides)


def sample_slots(cfg: Config, victor: bool, text_length: int) -> int:
    """The slots of the benchmark's longest sample (one image: under anyres the mix's largest)."""
    spec = cfg.vision.anyres()
    visual = (cfg.vision.num_visual_tokens if spec is None
              else max(spec.layout(h, w).tokens for h, w in anyres_image_sizes(cfg)))
    return visual + (cfg.victor.num_registers if victor else 0) + text_length


def bench_seq_length(cfg: Config, victor: bool, text_length: int) -> int:
    """A benchmark row's length: one sample's slots (anyres: the longest of the image mix; shorter rows are padded
    in both variants and counted in the FLOPs), and with `train.fp8` rounded up to a multiple of 16 (FP8 GEMM
    alignment; the row's tail is padding). Victor's row is R slots longer than the baseline's, so with R not a
    multiple of 16 (the default 8) the two cannot both be exact multiples of 16: both are padded up instead. After
    the drop Victor's short length (registers + text) is rounded up the same way by the drop plan
    (`megavictor.model.drop_plan.short_length`). Without FP8 the rows are unpadded, as before."""
    slots = sample_slots(cfg, victor, text_length)
    align = FP8_ALIGNMENT if cfg.train.fp8 else 1
    return -(-slots // align) * align


def image_text_batches(cfg: Config, rows: int, micro_batches: int, seed: int = 0) -> list[VictorBatch]:
    """`micro_batches` micro-batches of `rows` packed rows, each row one sample: one image, then
    `data.text_length` text tokens (all of them targets); under anyres the images cycle through
    `ANYRES_IMAGE_MIX`'s grids. The same seed gives the same images and text for Victor and the baseline (only the
    register slots differ)."""
    g = torch.Generator().manual_seed(seed)
    v, r, t = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image, cfg.data.text_length
    size, spec, mix = cfg.vision.image_size, cfg.vision.anyres(), anyres_image_sizes(cfg)
    batches = []
    for m in range(micro_batches):
        expanded = []
        for i in range(rows):
            tokens = [IMAGE_PLACEHOLDER] + torch.randint(3, cfg.model.vocab_size, (t,), generator=g).tolist()
            if spec is None:
                sample = Sample(tokens, [False] + [True] * t, [torch.randn(3, size, size, generator=g)])
            else:
                height, width = mix[(m * rows + i) % len(mix)]
                layout = spec.layout(height, width)
                sample = Sample(tokens, [False] + [True] * t, [torch.randn(layout.tiles, 3, size, size, generator=g)],
                                [(height, width)], [layout.tokens])
            expanded.append([expand_sample(sample, v, r)])
        batches.append(collate_rows(expanded, cfg.data.seq_length))
    return batches


def data_tokens(batches: list[VictorBatch]) -> int:
    """Text + visual slots (not registers, not padding): the same count for Victor and the baseline."""
    return sum(int(((b.kinds == KIND_TEXT) | (b.kinds == KIND_VISUAL)).sum()) for b in batches)


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and its peak (VmHWM), MiB.

    VmHWM belongs to the process's own address space: unlike `ru_maxrss`, Linux does not carry a parent's peak
    into it across fork + exec, so a fresh worker process per variant measures that variant alone.
    """
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_mb": out.get("VmHWM", 0.0)}


def peak_memory_kind() -> str:
    """What `measured_memory_mb` reports: the GPU's allocated memory with CUDA, else the host's resident set."""
    return "cuda_allocated" if torch.cuda.is_available() else "host_rss"


def reset_peak_memory() -> None:
    """Start this process's CUDA peak (`torch.cuda.max_memory_allocated`) from now; nothing to do on the host, whose
    VmHWM is per process."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def measured_memory_mb() -> dict[str, float]:
    """The memory a benchmark variant reports, MiB: with CUDA the tensors allocated on this process's GPU now
    (`rss_mb`) and at their peak since `reset_peak_memory` (`peak_mb`); on the host VmRSS and VmHWM. The host
    numbers always come along as `host_rss_mb` / `host_peak_mb`."""
    host = memory_mb()
    out = {"host_rss_mb": host["rss_mb"], "host_peak_mb": host["peak_mb"]}
    if torch.cuda.is_available():
        return {"rss_mb": torch.cuda.memory_allocated() / 2**20, "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                **out}
    return {**host, **out}


def synchronize() -> None:
    """Wait for the work queued on the current CUDA device (nothing to wait for without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """`fn()`, its wall seconds and this process's CPU seconds. With CUDA the device is synchronised before each
    clock read: kernels queued before the start are not charged to `fn`, and the ones `fn` queued are finished
    when the clock stops (CUDA calls return at launch)."""
    synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start, time.process_time() - cpu


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(title)
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads`, default 1: on a shared machine a parallel region waits for its slowest thread, which other
    jobs deschedule; 0 keeps torch's default."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
