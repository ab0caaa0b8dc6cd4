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
  (visual tokens average-pooled to r before the LLM), r in {1, 2, 4, 8, 16};
- the 2025 peers at budgets B in {8, 16, 32} retained visual tokens per image (`PEER_BUDGETS`): `random_B<b>`,
  `divprune_B<b>`, `visionzip_B<b>` (training-free selections before the LLM, `megavictor.model.visual_select`, on
  the baseline's checkpoints) and `pdrop_B<b>` (PyramidDrop trained: B tokens from layer k, halved at k + 2, k + 4).

`--hires` (issue #31): the high-resolution digits task (`megavictor prep digits --hires`: canvases of 32x64 to 96x32
px whose 8x8 digits one 32-px view shrinks to 2.7-4 px) with `configs/hires_stage{1,2}.yaml` (the fidelity recipe's
LLM, k=1, on LLaVA-NeXT anyres images) and three variants: `baseline` (anyres), `baseline_single` (the baseline on one
32-px view per image, LLaVA-1.5's pad) and `R8_k1` (Victor, anyres). Its JSON adds `single_view_accuracy`.

The paired protocol (issue #32): seed S is one pair of conditions for every variant (the same initial values of
the parameters variants share, the same data order; see `Task`), so each variant's per-seed accuracies pair with the
baseline's. Each accuracy is the mean over seeds with its sample standard deviation (`*_std`), and each variant's
`minus_baseline` is the paired mean difference from the baseline with its 95% confidence interval (Student's t
over seeds); the JSON names two pairs, `victor_minus_baseline` (R=8 - baseline) and `victor_minus_no_register`
(R=8 - R=0), each `{mean, ci95_low, ci95_high}`, in accuracy units (0.01 = one point). The test split must hold at
least 2000 questions (`test_questions`: one run's exact-match noise about 1 point or less), unless `--eval-limit`.
`--quick`: baseline, R=8 and R=0 over the 4 seeds 1234-1237.

`--jobs N` (default 2 on two or more cores) runs N trainings side by side, each in a process of its own with
cores/N torch threads and its output in RUN_DIR/<variant>/seed<S>/bench.log. `train_speedup` = the variant's mean
median stage-2 `tokens_per_s` (text + visual tokens, from its metrics.jsonl) over the baseline's; `infer_speedup` =
the baseline's mean greedy-evaluation wall time over the variant's. Runs are not interleaved like `bench train`'s,
and with N > 1 each shares the machine with another run, so the speedups carry machine noise: run it on an otherwise
idle machine. `flops` = analytic training FLOPs of one sample (one image + `data.text_length` text tokens; under
anyres the mean over images of each pinpoint's shape; the training-free FastV is trained as the baseline),
`train_samples` = the mean number of samples stage 2 trained on (rows are packed to `data.seq_length`, so a variant
with fewer slots per sample sees more samples in the same steps), `flop_bound` = the baseline's over the variant's, and
`ratio_to_bound` = train_speedup / flop_bound. `infer_flops` = analytic forward FLOPs of one sample as evaluated
(a training-free pruner's LLM sees its B visual tokens from layer 0; the selection itself is not counted), and
`infer_flop_bound` = the baseline's over the variant's, the bound of `infer_speedup`. `wall_s` = the benchmark's wall
time, data preparation included. The plot: accuracy against training FLOPs per sample (trained variants) and against
forward FLOPs per sample (every variant), error bars one standard deviation (`--replot` redraws it from
RUN_DIR/accuracy.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from megavictor.benchmarks.common import median, print_table
from megavictor.config import Config, load_config
from megavictor.data.manifest import load_manifest
from megavictor.demo import CONFIGS, ensure_digits, evaluate_run, train_llava_stages
from megavictor.errors import UserError
from megavictor.model.flops import TRAIN_FACTOR, decoder_flops, vision_flops
from megavictor.model.peers import removed_visual

WARMUP_STEPS = 5  # stage-2 steps left out of the tokens/s median (first-step allocation, caches)
FIRST_SEED = 1234  # the recipes' seed: seed list [1234, 1235, ...], so the first seed is the plain demo run
QUICK_SEEDS = 4  # --quick: seeds 1234-1237, fixed before any result of the paired protocol was seen
# One run's exact-match noise sqrt(p (1 - p) / n) must stay about 1 point or less: n >= 2000 (1.1 points at the worst
# case p = 0.5; `prep digits` writes 2500 test questions, 1.0 point). Fewer only with --eval-limit, on purpose.
MIN_TEST_QUESTIONS = 2000


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # baseline | single_view | victor | text_blind | fastv | fastv_free | avg_pool | random | divprune |
    # visionzip | pyramid_drop
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
# Retained visual tokens per image of the 2025 peers. The literature compares at 64 of LLaVA-1.5's 576 (11%); our
# images have 64 visual tokens, where 64 would keep them all: 8 is that 11% regime, 16 and 32 are looser budgets.
PEER_BUDGETS = (8, 16, 32)
PRUNE_METHODS = ("random", "divprune", "visionzip")
TRAINING_FREE_METHODS = ("fastv_free", *PRUNE_METHODS)


def victor(r: int, k: int, method: str = "victor") -> Variant:
    extra = ("victor.mask=text_blind",) if method == "text_blind" else ()
    name = f"text_blind_R{r}_k{k}" if method == "text_blind" else f"R{r}_k{k}"
    return Variant(name, method, ("victor.enabled=true", f"victor.num_registers={r}", f"victor.drop_layer={k}",
                                  *extra), num_registers=r, drop_layer=k)


def pruned(method: str, b: int) -> Variant:
    """A training-free selection of `b` visual tokens per image before the LLM, on the baseline's checkpoints."""
    return Variant(f"{method}_B{b}", method, inference=("victor.enabled=true", f"victor.num_registers={b}",
                                                        "victor.drop_layer=0", f"peer.prune={method}",
                                                        f"peer.prune_to={b}"),
                   trained_as=BASELINE.name, num_registers=b, drop_layer=0)


def pyramid_drop(b: int, k: int, num_layers: int) -> Variant:
    """PyramidDrop trained at budget `b`: `b` visual tokens per image from Victor's k on, then half as many every
    two layers (the paper's lambda = 0.5; stages at k, k + 2, k + 4 inside the model)."""
    layers = [layer for layer in (k, k + 2, k + 4) if layer < num_layers]
    keep = [max(1, b >> i) for i in range(len(layers))]
    return Variant(f"pdrop_B{b}", "pyramid_drop", ("victor.enabled=false",
                                                   f"peer.pyramid_layers=[{','.join(map(str, layers))}]",
                                                   f"peer.pyramid_keep=[{','.join(map(str, keep))}]"),
                   drop_layer=k)


def variants(k: int, quick: bool, hires: bool = False, num_layers: int = 8) -> list[Variant]:
    """The sweep at drop layer k of a `num_layers`-layer LLM (see the module docstring)."""
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
                      num_registers=r, drop_layer=0) for r in (1, 2, 4, 8, 16)),
            *(pruned(method, b) for method in PRUNE_METHODS for b in PEER_BUDGETS),
            *(pyramid_drop(b, k, num_layers) for b in PEER_BUDGETS)]


def sample_flops(cfg: Config, train: bool = True) -> float:
    """Training FLOPs of one sample (`train=False`: its forward FLOPs, the ViT included): one image, its registers,
    `data.text_length` text tokens. Under anyres, the mean over one image of each pinpoint's own shape (its visual
    tokens, its views through the ViT): the `--hires` canvases are exactly the pinpoints, drawn uniformly."""
    spec = cfg.vision.anyres()
    shapes = ([(cfg.vision.num_visual_tokens, 1)] if spec is None
              else [(layout.tokens, layout.tiles) for layout in (spec.layout(h, w) for h, w in spec.pinpoints)])
    r, t = cfg.victor.registers_per_image, cfg.data.text_length
    factor = TRAIN_FACTOR if train else 1.0
    return statistics.fmean(decoder_flops(cfg, v + r + t, v + r + t - removed_visual(cfg, v), factor=factor)
                            + vision_flops(cfg, views, train=train) for v, views in shapes)


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


@dataclass(frozen=True)
class Task:
    """One variant at one seed. Seed S sets `train.seed` (the initial values, a function of each parameter's name and
    the seed: every variant starts from the same values of the parameters it shares with another) and `data.seed`
    (the epoch permutation: every variant draws the samples in the same order; its packer fills rows by its own
    sample lengths), so the variants of one seed are paired."""

    variant: Variant
    seed: int
    run_dir: Path
    data: Path
    recipe: str
    overrides: tuple[str, ...]
    eval_limit: int | None

    @property
    def out(self) -> Path:
        return self.run_dir / self.variant.name / f"seed{self.seed}"

    def training_overrides(self) -> list[str]:
        """The variant's settings, the user's overrides, then the seed."""
        return [*self.variant.train, *self.overrides, f"train.seed={self.seed}", f"data.seed={self.seed}"]

    @property
    def trained(self) -> Path:
        """The run whose checkpoints are scored: this one, or for a training-free variant the one it evaluates."""
        source = self.variant.trained_as
        return self.out if source is None else self.run_dir / source / f"seed{self.seed}"


def run_task(task: Task) -> dict:
    """Train (unless training-free) and score one variant at one seed; the per-seed record."""
    if task.variant.trained_as is None:
        train_llava_stages(task.out, task.data, task.training_overrides(), task.recipe)
    result = evaluate_run(task.trained, task.data, task.out, list(task.variant.inference), task.eval_limit)
    return {"seed": task.seed, "accuracy": result["accuracy"], "chance": result["chance"], "n": result["n"],
            "tokens_per_s": stage2_tokens_per_s(task.trained), "eval_s": result["eval_s"],
            "train_samples": stage2_samples(task.trained)}


def run_task_in_worker(task: Task, threads: int) -> dict:
    """`run_task` in a worker process of its own (megatron's parallel state is per process) with `threads` torch
    threads; its output goes to OUT/bench.log, since runs side by side would interleave theirs."""
    import torch

    torch.set_num_threads(threads)
    task.out.mkdir(parents=True, exist_ok=True)
    with open(task.out / "bench.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run_task(task)


def run_tasks(tasks: list[Task], jobs: int) -> dict[tuple[str, int], dict]:
    """Run `tasks`, `jobs` at a time (each in a fresh process with cores / jobs threads; one job: in this process, one
    after another); per-seed records by (variant name, seed).

    A run that fails is reported the moment it does and the others go on: a sweep of hours learns of it at once and
    keeps its finished runs, which the same command reuses once the cause is fixed. The call then stops, naming
    every failed run."""
    if jobs == 1:
        return {(t.variant.name, t.seed): run_task(t) for t in tasks}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done: dict[tuple[str, int], dict] = {}
    failed: list[str] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_task_in_worker, t, threads): t for t in tasks}
        for future in as_completed(futures):
            task = futures[future]
            log = task.out / "bench.log"
            try:
                done[(task.variant.name, task.seed)] = record = future.result()
            except Exception as exc:  # the run's own error (a UserError's line); its traceback, if any, is in its log
                failed.append(f"{task.variant.name} seed {task.seed} (log {log})")
                print(f"{task.variant.name} seed {task.seed}: failed: {exc} (log {log})", file=sys.stderr, flush=True)
                continue
            print(f"{task.variant.name} seed {task.seed}: accuracy {record['accuracy']:.3f} (log {log})", flush=True)
    if failed:
        raise UserError(f"{len(failed)} of {len(tasks)} runs failed: {'; '.join(failed)}; fix the cause their lines "
                        "above name and run the same command again (finished runs are reused)")
    return done


def paired_difference(a: list[float], b: list[float]) -> dict[str, float | None]:
    """Mean over seeds of the per-seed difference a - b and its 95% confidence interval (Student's t over the seeds,
    n - 1 degrees of freedom). Paired: whatever a seed's initial values and data order do to both variants alike
    cancels. One seed gives no interval (None)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95_low": None, "ci95_high": None}
    from scipy.stats import t

    half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}


def summarise(variant: Variant, per_seed: list[dict], recipe: str, overrides: list[str]) -> dict:
    """A variant's result: per-seed values, their mean and sample std, and its analytic FLOPs per sample."""
    seeds = [s["seed"] for s in per_seed]
    train_overrides = list(BASELINE.train if variant.trained_as else variant.train) + list(overrides)
    cfg = load_config(CONFIGS / f"{recipe}_stage2.yaml", train_overrides)
    # Evaluated as trained plus the variant's inference settings (a training-free pruner: B tokens from layer 0).
    infer_cfg = load_config(CONFIGS / f"{recipe}_stage2.yaml", train_overrides + list(variant.inference))
    accuracy, accuracy_std = mean_std([s["accuracy"] for s in per_seed])
    return {"name": variant.name, "method": variant.method, "enabled": variant.enabled,
            "num_registers": variant.num_registers, "drop_layer": variant.drop_layer,
            "accuracy": accuracy, "accuracy_std": accuracy_std, "accuracies": [s["accuracy"] for s in per_seed],
            "seeds": seeds, "chance": per_seed[0]["chance"], "questions": per_seed[0]["n"],
            "train_samples": statistics.fmean(s["train_samples"] for s in per_seed),
            "tokens_per_s": statistics.fmean(s["tokens_per_s"] for s in per_seed),
            "eval_s": statistics.fmean(s["eval_s"] for s in per_seed), "flops": sample_flops(cfg),
            "infer_flops": sample_flops(infer_cfg, train=False)}


def run_sweep(sweep: list[Variant], seeds: list[int], jobs: int, run_dir: Path, data: Path, recipe: str,
              overrides: list[str], eval_limit: int | None) -> list[dict]:
    """Every variant at every seed: the trained ones first (seed by seed, so a stopped sweep has whole seeds), then
    the training-free ones, which score the checkpoints of the variant they name."""
    tasks = {(v.name, seed): Task(v, seed, run_dir, data, recipe, tuple(overrides), eval_limit)
             for seed in seeds for v in sweep}
    records = run_tasks([t for t in tasks.values() if t.variant.trained_as is None], jobs)
    records |= run_tasks([t for t in tasks.values() if t.variant.trained_as is not None], jobs)
    return [summarise(v, [records[(v.name, seed)] for seed in seeds], recipe, overrides) for v in sweep]


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
    """Each variant against the baseline: speedups, FLOP bound, and the paired accuracy difference over seeds."""
    base = next(r for r in results if r["name"] == BASELINE.name)
    for r in results:
        r["minus_baseline"] = paired_difference(r["accuracies"], base["accuracies"])
        r["train_speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["infer_speedup"] = base["eval_s"] / r["eval_s"]
        r["flop_bound"] = base["flops"] / r["flops"]
        r["infer_flop_bound"] = base["infer_flops"] / r["infer_flops"]
        r["ratio_to_bound"] = r["train_speedup"] / r["flop_bound"]


COLORS = {"baseline": "tab:gray", "single_view": "tab:olive", "victor": "tab:blue", "text_blind": "tab:purple",
          "fastv": "tab:orange", "fastv_free": "tab:brown", "avg_pool": "tab:green", "random": "tab:pink",
          "divprune": "tab:cyan", "visionzip": "gold", "pyramid_drop": "black"}


def plot(results: list[dict], path: Path, title: str) -> None:
    """Accuracy (mean over seeds, error bar one standard deviation) against training FLOPs per sample (the trained
    variants: a training-free one trains as the baseline and would sit on its point) and against forward FLOPs per
    sample (every variant: where the training-free pruners, at their budgets, compare with the trained ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = ((axes[0], "flops", "training FLOPs per sample (MFLOP, analytic)", False),
              (axes[1], "infer_flops", "forward FLOPs per sample at evaluation (MFLOP, analytic)", True))
    for ax, field, label, training_free in panels:
        shown = [r for r in results if training_free or r["method"] not in TRAINING_FREE_METHODS]
        for method, color in COLORS.items():
            points = [r for r in shown if r["method"] == method]
            if points:
                ax.errorbar([r[field] / 1e6 for r in points], [r["accuracy"] for r in points],
                            yerr=[r["accuracy_std"] for r in points], fmt="o", color=color, capsize=3, label=method)
        for r in shown:
            ax.annotate(r["name"], (r[field] / 1e6, r["accuracy"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=6)
        ax.axhline(results[0]["chance"], color="tab:red", linestyle=":", label="chance")
        ax.set_xlabel(label)
    axes[0].set_ylabel("test accuracy (exact match)")
    axes[1].legend(loc="lower right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], recipe_cfg: Config, seeds: list[int], quick: bool, hires: bool = False) -> dict:
    by_name = {r["name"]: r for r in results}
    k, n = recipe_cfg.victor.drop_layer, recipe_cfg.model.num_layers
    out: dict = {"results": results, "seeds": seeds, "drop_layer": k, "num_layers": n, "quick": quick,
                 "hires": hires}
    victor_name, no_register_name = f"R8_k{k}", f"R0_k{k}"
    for field, name in (("baseline_accuracy", BASELINE.name), ("victor_accuracy", victor_name),
                        ("no_register_accuracy", no_register_name), ("single_view_accuracy", SINGLE_VIEW.name)):
        if name in by_name:
            out[field], out[f"{field}_std"] = by_name[name]["accuracy"], by_name[name]["accuracy_std"]
    for field, other in (("victor_minus_baseline", BASELINE.name), ("victor_minus_no_register", no_register_name)):
        if victor_name in by_name and other in by_name:
            out[field] = paired_difference(by_name[victor_name]["accuracies"], by_name[other]["accuracies"])
    out["chance"], out["test_questions"] = results[0]["chance"], results[0]["questions"]
    return out


def check_test_split(data: Path, split: str, eval_limit: int | None) -> None:
    """Refuse a test split too small for the protocol (one line), unless --eval-limit asks for fewer on purpose."""
    if eval_limit is not None:
        return
    n = sum(shard.samples for shard in load_manifest(data).split_shards(split))
    if n < MIN_TEST_QUESTIONS:
        raise UserError(f"--data {data}: its test split {split} holds {n} questions; the paired protocol needs at "
                        f"least {MIN_TEST_QUESTIONS} (one run's exact-match noise <= about 1 point): prepare the "
                        "digits again (`megavictor prep digits --out NEW_DIR`: 2500) or pass --eval-limit N to score "
                        "fewer on purpose")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="baseline, R=8 and R=0 only, 4 paired seeds")
    parser.add_argument("--seeds", type=int, help=f"seeds per variant (default: {QUICK_SEEDS} with --quick, else 3)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs side by side, each in its own process with cores/jobs torch threads (default "
                             "min(2, cores); 1: one after another in this process)")
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
        results = json.loads(saved.read_text())["results"]
        if any("infer_flops" not in r for r in results):
            raise UserError(f"--replot: {saved} was written before `infer_flops` existed: rerun the benchmark with "
                            "the same --run-dir (finished training is reused; only the evaluations run again)")
        plot(results, plot_path, title)
        print(json.dumps({"plot": str(plot_path)}))
        return 0
    n_seeds = args.seeds or (QUICK_SEEDS if args.quick else 3)
    if n_seeds < 1:
        raise UserError(f"--seeds {n_seeds} must be >= 1")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} must be >= 1")
    seeds = [FIRST_SEED + i for i in range(n_seeds)]
    data = Path(args.data or ("data/digits_hires" if args.hires else "data/digits"))
    start = time.perf_counter()
    ensure_digits_task(data, args.hires)
    check_test_split(data, recipe_cfg.data.test_split, args.eval_limit)
    sweep = variants(recipe_cfg.victor.drop_layer, args.quick, args.hires, recipe_cfg.model.num_layers)
    if args.variants:
        wanted = set(args.variants.split(","))
        unknown = wanted - {v.name for v in sweep}
        if unknown:
            raise UserError(f"--variants: unknown {', '.join(sorted(unknown))} (known: "
                            f"{', '.join(v.name for v in sweep)})")
        sweep = [v for v in sweep if v.name in wanted or v is BASELINE]
    results = run_sweep(sweep, seeds, args.jobs, run_dir, data, recipe, args.overrides, args.eval_limit)
    add_speedups(results)
    plot(results, plot_path, title)
    print_table(f"{task}, {recipe} recipe, seeds {seeds}, chance {results[0]['chance']:.3f}, "
                f"{results[0]['questions']} test questions",
                ["variant", "R", "k", "accuracy", "std", "tokens/s", "train samples", "train speedup", "flop bound",
                 "infer speedup", "infer flop bound"],
                [[r["name"], "-" if r["num_registers"] is None else r["num_registers"],
                  "-" if r["drop_layer"] is None else r["drop_layer"], r["accuracy"], r["accuracy_std"],
                  r["tokens_per_s"], r["train_samples"], r["train_speedup"], r["flop_bound"], r["infer_speedup"],
                  r["infer_flop_bound"]]
                 for r in results])
    out = report(results, recipe_cfg, seeds, args.quick, args.hires)
    points = lambda x: "-" if x is None else f"{100 * x:+.1f}"  # noqa: E731
    pairs = [(f"{r['name']} - baseline", r["minus_baseline"]) for r in results if r["name"] != BASELINE.name]
    if "victor_minus_no_register" in out:
        pairs.append(("victor_minus_no_register (R=8 - R=0)", out["victor_minus_no_register"]))
    print_table("paired differences over seeds (accuracy points, 95% CI: t over seeds)",
                ["pair", "mean", "ci95 low", "ci95 high"],
                [[name, *(points(diff[key]) for key in ("mean", "ci95_low", "ci95_high"))] for name, diff in pairs])
    out.update(plot=str(plot_path), run_dir=str(run_dir), recipe=recipe, jobs=args.jobs,
               wall_s=time.perf_counter() - start)
    (run_dir / "accuracy.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0
