"""`megavictor bench accuracy`: the accuracy / speed trade-off on the digits task, one training budget for all.

Every variant is the demo recipe (`configs/demo_stage1.yaml` then `demo_stage2.yaml`, the budget those files set,
the same data and seed) changed only in Victor's settings: the plain LLaVA baseline (`victor.enabled=false`),
R in {0, 1, 2, 4, 8, 16} registers at k=3, and k in {1, 2, 5} at R=8 (`--quick`: baseline, R=8, R=0). Each is
trained and evaluated like `megavictor demo` (greedy exact match on the test split) in RUN_DIR/<name>; a rerun
reuses finished variants.

`train_speedup` = the variant's median stage-2 `tokens_per_s` (text + visual tokens, from its metrics.jsonl) over
the baseline's; `infer_speedup` = the baseline's greedy-evaluation wall time over the variant's (the same test
questions, no KV cache). Variants run one after another, so unlike `bench train` machine noise is not cancelled:
run it on an idle machine. `flop_bound` is the analytic training-FLOP ratio, baseline over variant, of one demo
sample (one image + `data.text_length` text tokens), and `ratio_to_bound` = train_speedup / flop_bound.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from megavictor.benchmarks.common import median, print_table
from megavictor.config import Config, load_config
from megavictor.demo import CONFIGS, train_and_evaluate
from megavictor.metrics import decoder_flops, vision_flops

WARMUP_STEPS = 5  # stage-2 steps left out of the tokens/s median (first-step allocation, caches)


@dataclass(frozen=True)
class Variant:
    name: str
    enabled: bool = True
    num_registers: int | None = 8  # None for the baseline, which has neither registers nor a drop
    drop_layer: int | None = 3

    def overrides(self) -> list[str]:
        if not self.enabled:
            return ["victor.enabled=false"]
        return ["victor.enabled=true", f"victor.num_registers={self.num_registers}",
                f"victor.drop_layer={self.drop_layer}"]


BASELINE = Variant("baseline", enabled=False, num_registers=None, drop_layer=None)
VICTOR, NO_REGISTERS = Variant("R8_k3"), Variant("R0_k3", num_registers=0)
QUICK = [BASELINE, VICTOR, NO_REGISTERS]
FULL = [BASELINE, *(Variant(f"R{r}_k3", num_registers=r) for r in (0, 1, 2, 4, 8, 16)),
        *(Variant(f"R8_k{k}", drop_layer=k) for k in (1, 2, 5))]


def sample_flops(cfg: Config) -> float:
    """Training FLOPs of one demo sample: one image, its registers, `data.text_length` text tokens."""
    v, r, t = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image, cfg.data.text_length
    long = v + r + t
    short = r + t if cfg.victor.enabled else long
    return decoder_flops(cfg, long, short) + vision_flops(cfg, 1, train=True)


def stage2_tokens_per_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    return median([r["tokens_per_s"] for r in records[WARMUP_STEPS:] or records])


def run_variant(variant: Variant, run_dir: Path, data: Path, overrides: list[str]) -> dict:
    out = run_dir / variant.name
    all_overrides = variant.overrides() + overrides
    result = train_and_evaluate(out, data, all_overrides)
    cfg = load_config(CONFIGS / "demo_stage2.yaml", all_overrides)
    return {"name": variant.name, "enabled": variant.enabled, "num_registers": variant.num_registers,
            "drop_layer": variant.drop_layer, "accuracy": result["accuracy"], "chance": result["chance"],
            "tokens_per_s": stage2_tokens_per_s(out), "eval_s": result["eval_s"], "flops": sample_flops(cfg)}


def add_speedups(results: list[dict]) -> None:
    base = next(r for r in results if not r["enabled"])
    for r in results:
        r["train_speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["infer_speedup"] = base["eval_s"] / r["eval_s"]
        r["flop_bound"] = base["flops"] / r["flops"]
        r["ratio_to_bound"] = r["train_speedup"] / r["flop_bound"]


def plot(results: list[dict], path: Path) -> None:
    """Accuracy against measured training speedup, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["train_speedup"], r["accuracy"], color="tab:gray" if not r["enabled"] else "tab:blue")
        ax.annotate(r["name"], (r["train_speedup"], r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(results[0]["chance"], color="tab:red", linestyle=":", label="chance")
    ax.set_xlabel("training speedup over baseline (tokens/s)")
    ax.set_ylabel("digits VQA test accuracy (exact match)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor bench accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="baseline, R=8 and R=0 only")
    parser.add_argument("--run-dir", default="runs/bench_accuracy")
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every variant, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    results = [run_variant(v, run_dir, Path(args.data), args.overrides) for v in (QUICK if args.quick else FULL)]
    add_speedups(results)
    plot_path = run_dir / "accuracy_vs_speedup.png"
    plot(results, plot_path)
    print_table(f"digits VQA, demo recipe, chance {results[0]['chance']:.3f}",
                ["variant", "R", "k", "accuracy", "tokens/s", "train speedup", "flop bound", "infer speedup"],
                [[r["name"], "-" if r["num_registers"] is None else r["num_registers"],
                  "-" if r["drop_layer"] is None else r["drop_layer"],
                  r["accuracy"], r["tokens_per_s"], r["train_speedup"], r["flop_bound"], r["infer_speedup"]]
                 for r in results])
    by_name = {r["name"]: r["accuracy"] for r in results}
    out = {"results": results, "baseline_accuracy": by_name[BASELINE.name], "victor_accuracy": by_name[VICTOR.name],
           "no_register_accuracy": by_name[NO_REGISTERS.name], "chance": results[0]["chance"],
           "plot": str(plot_path), "run_dir": str(run_dir)}
    (run_dir / "accuracy.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0
