"""`megavictor bench train`: training step time, Victor vs the plain LLaVA baseline, against the analytic FLOP bound.

One step is what the training job does per optimizer step: megatron's forward/backward schedule over the
micro-batches (`megavictor.engines.megatron.forward_backward` on the megatron DDP-wrapped `VictorVLM`), then the AdamW step.
Victor and the baseline (`victor.enabled=false`) are the same model shape on the same images and text; each row of a
micro-batch holds one sample (one image + `text_length` text tokens), so Victor's rows are R slots longer.

Each variant lives in its own fresh worker process (for a per-variant peak memory), and the parent alternates
single steps between the two workers, so machine noise hits both alike; reported times are medians. With CUDA each
step is timed between two `torch.cuda.synchronize()` calls (`common.timed`), so it covers the kernels, not their
launch. Peak memory (`peak_memory_kind` in the JSON): with CUDA the worker's `torch.cuda.max_memory_allocated`
(reset when the worker starts: model, optimizer state and activations of that variant alone), on the host the
worker's VmHWM (peak resident set of that process alone, imports and model included).

Each row holds one sample and no padding, except under `train.fp8`, where both variants' rows (and Victor's short
length after the drop) are padded up to multiples of 16 for the FP8 GEMMs (`common.bench_seq_length`); the padding
is counted in the FLOPs, not in tokens/s.

`flop_bound` is baseline FLOPs / Victor FLOPs of exactly the batches run (`megavictor.model.flops.batch_train_flops`:
layers < k on visual + registers + text, layers >= k on registers + text, quadratic attention, the frozen ViT
forward only), and `ratio_to_bound` = measured speedup / flop_bound.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import warnings

from megavictor.benchmarks.common import (CPU_LLAVA15, CPU_LLAVA_NEXT, add_threads_option, bench_config, data_tokens,
                                          image_text_batches, median, measured_memory_mb, peak_memory_kind,
                                          print_table, reset_peak_memory, timed, variant)
from megavictor.config import Config
from megavictor.model.batch import KIND_VISUAL
from megavictor.model.drop_plan import short_length
from megavictor.model.flops import batch_train_flops

MEMORY_METHODS = {
    "host_rss": "VmHWM (peak RSS) of a fresh worker process per variant, imports + model included",
    "cuda_allocated": "torch.cuda.max_memory_allocated of a fresh worker process per variant (reset at its start): "
                      "model, optimizer state and activations",
}


def _worker(conn, cfg_dict: dict, rows: int, micro_batches: int, threads: int) -> None:
    """One variant in its own process: build, then run one training step per "step" message."""
    warnings.filterwarnings("ignore")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from megavictor.config import config_from_dict
    from megavictor.distributed import init_distributed, shutdown
    from megavictor.engines.megatron import build_model, forward_backward, wrap_for_training
    from megavictor.training.cuda_expected import resolve_attention_backend

    try:
        cfg = config_from_dict(cfg_dict)
        resolve_attention_backend(cfg)  # `train.attention_backend: null` as a training job on this machine decides it
        dims = init_distributed(1, 1, cfg.train.seed)
        reset_peak_memory()
        torch.manual_seed(cfg.train.seed)
        ddp, optimizer = wrap_for_training(cfg, build_model(cfg, dims))
        batches = image_text_batches(cfg, rows, micro_batches)

        def step() -> tuple[float, int]:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            loss_sum, loss_tokens = forward_backward(ddp, batches)
            optimizer.step()
            return loss_sum, loss_tokens

        conn.send({"ready": True, "attention_backend": str(cfg.train.attention_backend), **measured_memory_mb()})
        while conn.recv() == "step":
            (loss_sum, loss_tokens), seconds, cpu_seconds = timed(step)
            conn.send({"seconds": seconds, "cpu_seconds": cpu_seconds, "loss": float(loss_sum) / max(loss_tokens, 1)})
        conn.send(measured_memory_mb())
        shutdown()
    except BaseException as exc:  # report to the parent instead of hanging it
        import traceback

        conn.send({"error": f"{exc!r}\n{traceback.format_exc()}"})


class Worker:
    def __init__(self, cfg: Config, rows: int, micro_batches: int, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, cfg.to_dict(), rows, micro_batches, threads),
                                daemon=True)
        self.proc.start()
        self.start_memory: dict = {}

    def wait_ready(self) -> None:
        self.start_memory = self._recv()

    def _recv(self) -> dict:
        if not self.conn.poll(1800):
            raise TimeoutError("benchmark worker did not answer")
        msg = self.conn.recv()
        if "error" in msg:
            raise RuntimeError(f"benchmark worker failed: {msg['error']}")
        return msg

    def step(self) -> dict:
        self.conn.send("step")
        return self._recv()

    def finish(self) -> dict:
        self.conn.send("stop")
        memory = self._recv()
        self.proc.join(timeout=60)
        return memory


def measure(cfg: Config, text_length: int, rows: int, micro_batches: int, repeats: int, warmup: int,
            threads: int) -> dict:
    cfgs = {name: variant(cfg, name == "victor", text_length) for name in ("victor", "baseline")}
    flops = {name: sum(batch_train_flops(c, b) for b in image_text_batches(c, rows, micro_batches))
             for name, c in cfgs.items()}
    victor_batches = image_text_batches(cfgs["victor"], rows, micro_batches)
    victor_short = max(short_length(b, cfgs["victor"]) for b in victor_batches)
    visual_per_image = [n for b in victor_batches for n in (b.kinds == KIND_VISUAL).sum(dim=1).tolist()]
    times: dict[str, list[float]] = {"victor": [], "baseline": []}
    cpu: dict[str, list[float]] = {"victor": [], "baseline": []}
    workers = {}
    try:
        for name in ("victor", "baseline"):  # built side by side; nothing is timed before both are ready
            workers[name] = Worker(cfgs[name], rows, micro_batches, threads)
        for w in workers.values():
            w.wait_ready()
        for i in range(warmup + repeats):
            order = ("victor", "baseline") if i % 2 == 0 else ("baseline", "victor")
            for name in order:  # alternating, never concurrently
                result = workers[name].step()
                if i >= warmup:
                    times[name].append(result["seconds"])
                    cpu[name].append(result["cpu_seconds"])
        memory = {name: w.finish() for name, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.is_alive():
                w.proc.kill()
    victor_s, baseline_s = median(times["victor"]), median(times["baseline"])
    speedup = baseline_s / victor_s
    bound = flops["baseline"] / flops["victor"]
    tokens = data_tokens(victor_batches)
    # Noise checks: the same speedup from adjacent (victor, baseline) pairs, and from process CPU time (all threads).
    pairs = median([b / v for v, b in zip(times["victor"], times["baseline"])])
    cpu_speedup = median(cpu["baseline"]) / median(cpu["victor"])
    return {
        "text_length": text_length, "victor_step_s": round(victor_s, 4), "baseline_step_s": round(baseline_s, 4),
        "speedup": round(speedup, 4), "flop_bound": round(bound, 4), "ratio_to_bound": round(speedup / bound, 4),
        "victor_peak_mem_mb": round(memory["victor"]["peak_mb"], 1),
        "baseline_peak_mem_mb": round(memory["baseline"]["peak_mb"], 1),
        "victor_start_mem_mb": round(workers["victor"].start_memory["rss_mb"], 1),
        "baseline_start_mem_mb": round(workers["baseline"].start_memory["rss_mb"], 1),
        "victor_gflop": round(flops["victor"] / 1e9, 3), "baseline_gflop": round(flops["baseline"] / 1e9, 3),
        "victor_tokens_per_s": round(tokens / victor_s, 1), "baseline_tokens_per_s": round(tokens / baseline_s, 1),
        "paired_speedup": round(pairs, 4), "cpu_time_speedup": round(cpu_speedup, 4),
        "cpu_time_ratio_to_bound": round(cpu_speedup / bound, 4),
        "victor_step_times_s": [round(t, 4) for t in times["victor"]],
        "baseline_step_times_s": [round(t, 4) for t in times["baseline"]],
        "victor_seq_length": cfgs["victor"].data.seq_length, "baseline_seq_length": cfgs["baseline"].data.seq_length,
        "victor_short_length": victor_short, "visual_per_image": visual_per_image,
        "attention_backend": workers["victor"].start_memory["attention_backend"],
        "victor_host_peak_mem_mb": round(memory["victor"]["host_peak_mb"], 1),
        "baseline_host_peak_mem_mb": round(memory["baseline"]["host_peak_mb"], 1),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (default: LLaVA-1.5-7B token counts at CPU width)")
    parser.add_argument("--anyres", action="store_true",
                        help="without --config: LLaVA-NeXT-7B's anyres token counts at CPU width (up to 2928 visual "
                             "tokens per image, a mix of five aspect ratios)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--text-lengths", default="64,256", help="comma-separated; the first is the headline")
    parser.add_argument("--rows", type=int, default=2, help="rows (one sample each) per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    add_threads_option(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=64")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = bench_config(args.config, args.overrides, CPU_LLAVA_NEXT if args.anyres else CPU_LLAVA15)
    lengths = [int(x) for x in args.text_lengths.split(",") if x]

    results = [measure(cfg, t, args.rows, args.micro_batches, args.repeats, args.warmup, args.threads)
               for t in lengths]
    m, v, vi, head = cfg.model, cfg.vision, cfg.victor, results[0]
    visual = (f"anyres images of {', '.join(str(n) for n in head['visual_per_image'])} visual tokens"
              if v.anyres() else f"{v.num_visual_tokens} visual tokens")
    print(f"train step: {m.num_layers} layers, hidden {m.hidden_size}, {visual}, "
          f"R={vi.num_registers}, k={vi.drop_layer}; {args.micro_batches} x {args.rows} rows of one image + text; "
          f"median of {args.repeats} alternating steps")
    print_table("", ["text", "victor s", "baseline s", "speedup", "flop bound", "ratio", "victor MB", "baseline MB"],
                [[r["text_length"], r["victor_step_s"], r["baseline_step_s"], r["speedup"], r["flop_bound"],
                  r["ratio_to_bound"], r["victor_peak_mem_mb"], r["baseline_peak_mem_mb"]] for r in results])
    out = {k: head[k] for k in ("victor_step_s", "baseline_step_s", "speedup", "flop_bound", "ratio_to_bound",
                                "victor_peak_mem_mb", "baseline_peak_mem_mb")}
    kind = peak_memory_kind()
    out.update(text_length=head["text_length"], rows=args.rows, micro_batches=args.micro_batches,
               repeats=args.repeats, threads=args.threads, memory_method=MEMORY_METHODS[kind],
               by_text_length={str(r["text_length"]): r for r in results}, peak_memory_kind=kind,
               timer="cuda_synchronized" if kind == "cuda_allocated" else "wall_clock",
               fp8=None if cfg.train.fp8 is None else str(cfg.train.fp8), attention_backend=head["attention_backend"],
               anyres=v.anyres() is not None, visual_per_image=head["visual_per_image"])
    print(json.dumps(out))
    return 0
