"""`megavictor bench accuracy`: accuracy against training cost on the digits task, Victor and its peers, over seeds.

Every variant is one recipe (`--recipe fidelity`, the default: `configs/fidelity_stage{1,2}.yaml`, 8 LLM layers
with the drop after layer 1, the paper's proportion; `--recipe demo`: the 6-layer demo with k=3) changed only in
the settings that define the variant, trained and evaluated like `megavictor demo` (greedy exact match on the test
split, KV cache) in RUN_DIR/<variant>/seed<S>, once per seed: seed S sets both `train.seed` (initialisation) and
`data.seed` (data order). A rerun reuses finished training. The variants, at the recipe's drop layer k:

- `baseline` (plain LLaVA), `R<r>_k<k>` (Victor with r registers; r=0 is "drop without summary"), and for the full
  sweep R in {0, 1, 2, 4, 8, 16} at k, and R=8 at the other k in {1, 2, 3};
- the peers (`megavictor.model.peers`): `text_blind_R8_k<k>` (VoCo-LLaMA-style mask), `fastv_K<k>` (FastV
  trained), `fastv_free_K<k>` (the baseline's checkpoints evaluated with FastV: training-free), `avgpool_R<r>`
  (visual tokens average-pooled to r before the LLM), r in {1, 2, 4, 8, 16}.

`--hires` (issue #31): the high-resolution digits task (`megavictor prep digits --hires`: canvases of 32x64 to 96x32
px whose 8x8 digits one 32-px view shrinks to 2.7-4 px) with `configs/hires_stage{1,2}.yaml` (the fidelity recipe's
LLM, k=1, on LLaVA-NeXT anyres images) and three variants: `baseline` (anyres), `baseline_single` (the baseline on one
32-px view per image, LLaVA-1.5's pad) and `R8_k1` (Victor, anyres). Its JSON adds `single_view_accuracy`.

`--quick`: baseline, R=8 and R=0 over 2 seeds. Each accuracy is the mean over seeds with its sample standard
deviation (`*_std`); `train_speedup` = the variant's mean median stage-2 `tokens_per_s` (text + visual tokens, from
its metrics.jsonl) over the baseline's; `infer_speedup` = the baseline's mean greedy-evaluation wall time over the
variant's. Variants run one after another, so unlike `bench train` machine noise is not cancelled: run it on an
idle machine. `flops` = analytic training FLOPs of one sample (one image + `data.text_length` text tokens; under
anyres the mean over images of each pinpoint's shape; the training-free FastV is trained as the baseline),
`train_samples` = the mean number of samples stage 2 trained on (rows are packed to `data.seq_length`, so a variant
with fewer slots per sample sees more samples in the same steps), `flop_bound` = the baseline's over the variant's, and
`ratio_to_bound` = train_speedup / flop_bound. The plot: accuracy against training FLOPs per sample, error bars
one standard deviation (`--replot` redraws it from RUN_DIR/accuracy.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from megavictor.benchmarks.common import median, print_table
from megavictor.config import Config, load_config
from megavictor.data.manifest import load_manifest
from megavictor.demo import CONFIGS, ensure_digits, evaluate_run, train_llava_stages
from megavictor.errors import UserError
from megavictor.model.flops import decoder_flops, vision_flops
from megavictor.model.peers import removed_visual

WARMUP_STEPS = 5  # stage-2 steps left out of the tokens/s median (first-step allocation, caches)
FIRST_SEED = 1234  # the recipes' seed: seed list [1234, 1235, ...], so the first seed is the plain demo run


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # baseline | victor | text_blind | fastv | fastv_free | avg_pool
    train: tuple[str, ...] = ()  # overrides of the training recipe
    inference: tuple[str, ...] = ()  # overrides applied only at evaluation
    trained_as: str | None = None  # evaluate this variant's checkpoints instead of training (training-free)
    num_registers: int | None = None
    drop_layer: int | None = None

    @property
    def enabled(self) -> bool:
        return self.method in ("victor", "text_blind", "avg_pool")


BASELINE = Variant("baseline", "baseline", ("victor.enabled=false",))
# `--hires`: the baseline on one 32-px view per image instead of the recipe's anyres tiles.
SINGLE_VIEW = Variant("baseline_single", "single_view", ("victor.enabled=false", "data.image_aspect_ratio=pad",
                                                         "vision.image_grid_pinpoints=null"))
HIRES_RECIPE = "hires"  # configs/hires_stage{1,2}.yaml


def victor(r: int, k: int, method: str = "victor") -> Variant:
    extra = ("victor.mask=text_blind",) if method == "text_blind" else ()
    name = f"text_blind_R{r}_k{k}" if method == "text_blind" else f"R{r}_k{k}"
    return Variant(name, method, ("victor.enabled=true", f"victor.num_registers={r}", f"victor.drop_layer={k}",
                                  *extra), num_registers=r, drop_layer=k)


def variants(k: int, quick: bool, hires: bool = False) -> list[Variant]:
    """The sweep at drop layer k (see the module docstring)."""
    if hires:
        return [BASELINE, SINGLE_VIEW, victor(8, k)]
    if quick:
        return [BASELINE, victor(8, k), victor(0, k)]
    fastv = ("victor.enabled=false", f"peer.fastv_layer={k}")
    return [BASELINE, *(victor(r, k) for r in (0, 1, 2, 4, 8, 16)),
            *(victor(8, other) for other in (1, 2, 3) if other != k),
            victor(8, k, "text_blind"),
            Variant(f"fastv_K{k}", "fastv", fastv, drop_layer=k),
            Variant(f"fastv_free_K{k}", "fastv_free", inference=(f"peer.fastv_layer={k}",), trained_as="baseline",
                    drop_layer=k),
            *(Variant(f"avgpool_R{r}", "avg_pool", ("victor.enabled=true", f"victor.num_registers={r}",
                                                      "victor.drop_layer=0", f"peer.avg_pool_to={r}"),
                      num_registers=r, drop_layer=0) for r in (1, 2, 4, 8, 16))]


def sample_flops(cfg: Config) -> float:
    """Training FLOPs of one sample: one image, its registers, `data.text_length` text tokens. Under anyres, the mean
    over one image of each pinpoint's own shape (its visual tokens, its views through the ViT): the `--hires`
    canvases are exactly the pinpoints, drawn uniformly."""
    spec = cfg.vision.anyres()
    shapes = ([(cfg.vision.num_visual_tokens, 1)] if spec is None
              else [(layout.tokens, layout.tiles) for layout in (spec.layout(h, w) for h, w in spec.pinpoints)])
    r, t = cfg.victor.registers_per_image, cfg.data.text_length
    return statistics.fmean(decoder_flops(cfg, v + r + t, v + r + t - removed_visual(cfg, v))
                            + vision_flops(cfg, views, train=True) for v, views in shapes)


def stage2_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]


def stage2_tokens_per_s(run_dir: Path) -> float:
    records = stage2_metrics(run_dir)
    return median([r["tokens_per_s"] for r in records[WARMUP_STEPS:] or records])


def stage2_samples(run_dir: Path) -> int:
    """Samples stage 2 trained on (each step's samples/s times its time)."""
    return round(sum(r["samples_per_s"] * r["step_time_s"] for r in stage2_metrics(run_dir)))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_variant(variant: Variant, run_dir: Path, data: Path, recipe: str, seeds: list[int],
                overrides: list[str], eval_limit: int | None = None) -> dict:
    """Train (unless training-free) and evaluate `variant` once per seed; per-seed values and their means."""
    per_seed = []
    for seed in seeds:
        seeded = [*variant.train, *overrides, f"train.seed={seed}", f"data.seed={seed}"]
        out = run_dir / variant.name / f"seed{seed}"
        trained = run_dir / variant.trained_as / f"seed{seed}" if variant.trained_as else out
        if variant.trained_as is None:
            train_llava_stages(out, data, seeded, recipe)
        result = evaluate_run(trained, data, out, list(variant.inference), eval_limit)
        per_seed.append({"seed": seed, "accuracy": result["accuracy"], "chance": result["chance"], "n": result["n"],
                         "tokens_per_s": stage2_tokens_per_s(trained), "eval_s": result["eval_s"],
                         "train_samples": stage2_samples(trained)})
    train_overrides = list(BASELINE.train if variant.trained_as else variant.train) + list(overrides)
    cfg = load_config(CONFIGS / f"{recipe}_stage2.yaml", train_overrides)
    accuracy, accuracy_std = mean_std([s["accuracy"] for s in per_seed])
    return {"name": variant.name, "method": variant.method, "enabled": variant.enabled,
            "num_registers": variant.num_registers, "drop_layer": variant.drop_layer,
            "accuracy": accuracy, "accuracy_std": accuracy_std, "accuracies": [s["accuracy"] for s in per_seed],
            "seeds": seeds, "chance": per_seed[0]["chance"], "questions": per_seed[0]["n"],
            "train_samples": statistics.fmean(s["train_samples"] for s in per_seed),
            "tokens_per_s": statistics.fmean(s["tokens_per_s"] for s in per_seed),
            "eval_s": statistics.fmean(s["eval_s"] for s in per_seed), "flops": sample_flops(cfg)}


def ensure_digits_task(data: Path, hires: bool) -> None:
    """Prepare the digits data of the task if missing (`prep digits`, with `--hires` for the high-resolution task);
    one line if `data` holds the other task's images (either recipe would train, on the wrong images)."""
    ensure_digits(data, ["--hires"] if hires else [])
    source = load_manifest(data).source
    if source.get("kind") == "digits" and bool(source.get("hires")) != hires:
        if hires:
            raise UserError(f"--data {data} holds the 32-px digits; --hires trains on the data of "
                            "`megavictor prep digits --hires --out DIR`")
        raise UserError(f"--data {data} holds the --hires digits: add --hires, or pass the data of "
                        "`megavictor prep digits --out DIR`")


def add_speedups(results: list[dict]) -> None:
    base = next(r for r in results if r["name"] == BASELINE.name)
    for r in results:
        r["train_speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["infer_speedup"] = base["eval_s"] / r["eval_s"]
        r["flop_bound"] = base["flops"] / r["flops"]
        r["ratio_to_bound"] = r["train_speedup"] / r["flop_bound"]


COLORS = {"baseline": "tab:gray", "single_view": "tab:olive", "victor": "tab:blue", "text_blind": "tab:purple",
          "fastv": "tab:orange", "fastv_free": "tab:brown", "avg_pool": "tab:green"}


def plot(results: list[dict], path: Path, title: str) -> None:
    """Accuracy (mean over seeds, error bar one standard deviation) against training FLOPs per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in COLORS.items():
        points = [r for r in results if r["method"] == method]
        if points:
            ax.errorbar([r["flops"] / 1e6 for r in points], [r["accuracy"] for r in points],
                        yerr=[r["accuracy_std"] for r in points], fmt="o", color=color, capsize=3, label=method)
    for r in results:  # the training-free FastV sits on the baseline's FLOPs: its label goes below
        ax.annotate(r["name"], (r["flops"] / 1e6, r["accuracy"]), textcoords="offset points",
                    xytext=(4, -10 if r["method"] == "fastv_free" else 4), fontsize=7)
    ax.axhline(results[0]["chance"], color="tab:red", linestyle=":", label="chance")
    ax.set_xlabel("training FLOPs per sample (MFLOP, analytic)")
    ax.set_ylabel("test accuracy (exact match)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], recipe_cfg: Config, seeds: list[int], quick: bool, hires: bool = False) -> dict:
    by_name = {r["name"]: r for r in results}
    k, n = recipe_cfg.victor.drop_layer, recipe_cfg.model.num_layers
    out: dict = {"results": results, "seeds": seeds, "drop_layer": k, "num_layers": n, "quick": quick,
                 "hires": hires}
    for field, name in (("baseline_accuracy", BASELINE.name), ("victor_accuracy", f"R8_k{k}"),
                        ("no_register_accuracy", f"R0_k{k}"), ("single_view_accuracy", SINGLE_VIEW.name)):
        if name in by_name:
            out[field], out[f"{field}_std"] = by_name[name]["accuracy"], by_name[name]["accuracy_std"]
    out["chance"] = results[0]["chance"]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="baseline, R=8 and R=0 only")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: 2 with --quick, else 3)")
    parser.add_argument("--recipe", choices=("fidelity", "demo"), default=None,
                        help="configs/<recipe>_stage{1,2}.yaml (default: fidelity, k/L = 1/8)")
    parser.add_argument("--hires", action="store_true",
                        help="the high-resolution digits task (anyres; configs/hires_stage{1,2}.yaml): baseline, "
                             "baseline_single (one 32-px view), R8_k1")
    parser.add_argument("--variants", help="comma-separated subset of the sweep's variant names (baseline is "
                                           "always run: speedups are relative to it)")
    parser.add_argument("--run-dir", default="runs/bench_accuracy")
    parser.add_argument("--data", default=None, help="digits data (default data/digits, with --hires "
                                                      "data/digits_hires; prepared if missing)")
    parser.add_argument("--eval-limit", type=int, help="score only the first N test questions (smoke runs)")
    parser.add_argument("--plot", help="PNG path (default RUN_DIR/accuracy_vs_flops.png)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from RUN_DIR/accuracy.json")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every variant, e.g. train.max_steps=50")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.hires and args.recipe:
        raise UserError(f"--recipe {args.recipe} does not apply to --hires (its recipe is configs/hires_stage*.yaml)")
    recipe = HIRES_RECIPE if args.hires else args.recipe or "fidelity"
    run_dir = Path(args.run_dir)
    plot_path = Path(args.plot) if args.plot else run_dir / "accuracy_vs_flops.png"
    recipe_cfg = load_config(CONFIGS / f"{recipe}_stage2.yaml", args.overrides)
    task = "high-res digits VQA" if args.hires else "digits VQA"
    title = f"{task}, {recipe} recipe ({recipe_cfg.model.num_layers} layers), mean +- std over seeds"
    if args.replot:
        saved = run_dir / "accuracy.json"
        if not saved.is_file():
            raise UserError(f"--replot: {saved} does not exist (run the benchmark first)")
        plot(json.loads(saved.read_text())["results"], plot_path, title)
        print(json.dumps({"plot": str(plot_path)}))
        return 0
    n_seeds = args.seeds or (2 if args.quick else 3)
    if n_seeds < 1:
        raise UserError(f"--seeds {n_seeds} must be >= 1")
    seeds = [FIRST_SEED + i for i in range(n_seeds)]
    data = Path(args.data or ("data/digits_hires" if args.hires else "data/digits"))
    ensure_digits_task(data, args.hires)
    sweep = variants(recipe_cfg.victor.drop_layer, args.quick, args.hires)
    if args.variants:
        wanted = set(args.variants.split(","))
        unknown = wanted - {v.name for v in sweep}
        if unknown:
            raise UserError(f"--variants: unknown {', '.join(sorted(unknown))} (known: "
                            f"{', '.join(v.name for v in sweep)})")
        sweep = [v for v in sweep if v.name in wanted or v is BASELINE]
    results = [run_variant(v, run_dir, data, recipe, seeds, args.overrides, args.eval_limit) for v in sweep]
    add_speedups(results)
    plot(results, plot_path, title)
    print_table(f"{task}, {recipe} recipe, seeds {seeds}, chance {results[0]['chance']:.3f}, "
                f"{results[0]['questions']} test questions",
                ["variant", "R", "k", "accuracy", "std", "tokens/s", "train samples", "train speedup", "flop bound",
                 "infer speedup"],
                [[r["name"], "-" if r["num_registers"] is None else r["num_registers"],
                  "-" if r["drop_layer"] is None else r["drop_layer"], r["accuracy"], r["accuracy_std"],
                  r["tokens_per_s"], r["train_samples"], r["train_speedup"], r["flop_bound"], r["infer_speedup"]]
                 for r in results])
    out = report(results, recipe_cfg, seeds, args.quick, args.hires)
    out.update(plot=str(plot_path), run_dir=str(run_dir), recipe=recipe)
    (run_dir / "accuracy.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0
