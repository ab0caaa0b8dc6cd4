"""`megavictor bench pipeline`: pp=2 training throughput with `parallel.pp_split: even` vs `balanced`.

Two gloo ranks (spawned here), one torch thread each (one core per stage on a 2-core machine). Each rank builds both
splits' stage of the model (megatron `VictorVLM` + DDP + AdamW, as the training job) and alternates optimizer steps
between them, each step megatron's 1F1B pipeline schedule (`megavictor.engines.megatron.forward_backward`) over several
micro-batches; medians over repeats. The default shape puts the drop layer k in stage 0 of the even split:
8 layers of hidden 256, k=2, 576 visual tokens + 8 registers + 64 text tokens per sample. `predicted_speedup` is
`megavictor.model.pipeline_split`'s cost model for the same config (slowest even stage / slowest balanced stage).

`--length-buckets 72,128` adds a third variant, the balanced split with `parallel.pipeline_length_buckets`: static
pipeline shapes (no shape exchange before each send) at the cost of the filler slots the rounding adds
(`bucket_padding`: their share of the short sequence).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from megavictor.benchmarks.common import bench_config, data_tokens, image_text_batches, median, print_table, variant
from megavictor.config import config_from_dict, validate
from megavictor.distributed import run_on_local_ranks
from megavictor.model.drop_plan import short_length
from megavictor.model.pipeline_split import split_report

# Hidden 256: at hidden 64 the short layers (72 slots) cost ~2.5x their FLOPs in per-op overhead on CPU, which the
# FLOP cost model does not see (measured: balanced [1, 7] gave 1.18x by per-stage busy time against 1.78x predicted).
DEFAULTS = ["model.num_layers=8", "model.hidden_size=256", "model.ffn_hidden_size=704", "victor.drop_layer=2",
            "data.text_length=64"]


def _measure(cfg_dict: dict, variants: dict, rows: int, micro_batches: int, repeats: int,
             warmup: int) -> dict[str, dict]:
    """On each of the two ranks: both splits' stage built, then timed steps alternating between them."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from megavictor.distributed import collective_device, init_distributed, shutdown
    from megavictor.engines.megatron import build_model, forward_backward, wrap_for_training

    cfg = config_from_dict(cfg_dict)
    dims = init_distributed(1, 2, cfg.train.seed)
    device = collective_device()  # the timings' collectives: on the GPU under NCCL
    batches = image_text_batches(cfg, rows, micro_batches)
    stages = {}
    for name, (layers, buckets) in variants.items():
        torch.manual_seed(cfg.train.seed)
        stage_cfg = copy.deepcopy(cfg)  # each model keeps its own config (read again at every step)
        stage_cfg.parallel.pp_split, stage_cfg.parallel.pipeline_length_buckets = layers, buckets
        stages[name] = wrap_for_training(stage_cfg, build_model(stage_cfg, dims))
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[list[float]]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]
        for name in order:
            ddp, optimizer = stages[name]
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(ddp, batches)
            optimizer.step()
            elapsed = torch.tensor([time.perf_counter() - start], device=device)
            busy = [torch.zeros(1, device=device) for _ in range(dims.world)]
            dist.all_gather(busy, torch.tensor([time.process_time() - cpu_start], device=device))
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its slowest stage does
            if i >= warmup:
                times[name].append(float(elapsed))
                cpu[name].append([float(b) for b in busy])
    shutdown()
    return {"wall": times, "cpu": cpu}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (default: 8 layers, k=2, 576 visual tokens, hidden 256)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1, help="rows (one sample each) per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--length-buckets", type=lambda text: [int(x) for x in text.split(",")],
                        help="comma-separated short lengths: also time the balanced split with these "
                             "parallel.pipeline_length_buckets (static pipeline shapes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. victor.drop_layer=1")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = variant(bench_config(args.config, ([] if args.config else DEFAULTS) + args.overrides + ["parallel.pp=2"]),
                  True)
    report = split_report(cfg)
    splits = {"even": report["even"]["layers"], "balanced": report["balanced"]["layers"]}
    variants = {name: (layers, None) for name, layers in splits.items()}
    batches = image_text_batches(cfg, args.rows, args.micro_batches)
    if args.length_buckets:
        validate(config_from_dict({**cfg.to_dict(), "parallel": {**cfg.to_dict()["parallel"],
                                                                 "pipeline_length_buckets": args.length_buckets}}))
        variants["buckets"] = (splits["balanced"], args.length_buckets)
    measured = run_on_local_ranks(2, _measure, cfg.to_dict(), variants, args.rows, args.micro_batches,
                                  args.repeats, args.warmup, timeout=1800)[0]
    times = measured["wall"]
    # Per-stage busy time (process CPU time of each rank, one thread): what each stage costs when it is not
    # waiting, so the split's effect on dedicated cores shows even when other jobs share the machine's cores.
    stage_cpu = {n: [median([step[r] for step in measured["cpu"][n]]) for r in range(2)] for n in variants}
    tokens = data_tokens(batches)
    step = {name: median(t) for name, t in times.items()}
    out = {
        "even_tokens_per_s": round(tokens / step["even"], 1),
        "balanced_tokens_per_s": round(tokens / step["balanced"], 1),
        "speedup": round(step["even"] / step["balanced"], 4), "predicted_speedup": report["speedup"],
        "even_layers": splits["even"], "balanced_layers": splits["balanced"],
        "even_step_s": round(step["even"], 4), "balanced_step_s": round(step["balanced"], 4),
        "micro_batches": args.micro_batches, "rows": args.rows, "repeats": args.repeats, "threads_per_rank": 1,
        "step_times_s": {n: [round(x, 4) for x in t] for n, t in times.items()},
        "stage_cpu_s": {n: [round(x, 4) for x in c] for n, c in stage_cpu.items()},
        "stage_cpu_speedup": round(max(stage_cpu["even"]) / max(stage_cpu["balanced"]), 4),
    }
    out["ratio_to_predicted"] = round(out["speedup"] / out["predicted_speedup"], 4)
    if args.length_buckets:
        needed = max(short_length(b, cfg) for b in batches)
        bucket = next((b for b in args.length_buckets if b >= needed), cfg.data.seq_length)
        out.update(buckets=args.length_buckets, buckets_tokens_per_s=round(tokens / step["buckets"], 1),
                   buckets_speedup=round(step["balanced"] / step["buckets"], 4), short_length=needed,
                   bucketed_short_length=bucket, bucket_padding=round(1 - needed / bucket, 4),
                   buckets_step_s=round(step["buckets"], 4))
    m = cfg.model
    print(f"pipeline pp=2 (2 gloo ranks, 1 thread each): {m.num_layers} layers, hidden {m.hidden_size}, k="
          f"{cfg.victor.drop_layer}, {cfg.vision.num_visual_tokens} visual + {cfg.victor.num_registers} registers + "
          f"{cfg.data.text_length} text per sample; {args.micro_batches} micro-batches x {args.rows} rows")
    print_table("", ["split", "layers", "step s", "tokens/s", "predicted stage cost", "stage busy s"],
                [[n, layers, step[n], round(tokens / step[n], 1), report["balanced" if n == "buckets" else n][
                    "stage_cost"], out["stage_cpu_s"][n]] for n, (layers, _) in variants.items()])
    print(f"  speedup {out['speedup']}x, predicted {out['predicted_speedup']}x; from per-stage busy time "
          f"{out['stage_cpu_speedup']}x")
    if args.length_buckets:
        print(f"  buckets {args.length_buckets}: short length {out['short_length']} -> {out['bucketed_short_length']} "
              f"(padding {out['bucket_padding']:.1%}), {out['buckets_speedup']}x over exact lengths (balanced split)")
    print(json.dumps(out))
    return 0
