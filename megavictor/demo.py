"""`megavictor demo`: the whole product on the embedded digits data, on CPU.

Prepares `data/digits` if missing, trains LLaVA stage 1 (captions: projector + registers) then stage 2 (VQA:
also the LLM), evaluates greedy exact-match accuracy on the test split and prints it as JSON last.
Overrides apply to both stages, e.g. `victor.enabled=false` for the plain LLaVA baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from megavictor.config import load_config
from megavictor.data.manifest import MANIFEST_NAME, VISION_ENCODER_FILE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def ensure_digits(path: Path, prep_args: Sequence[str] = ()) -> None:
    """Prepare the digits shards and the pretrained vision tower if either is missing (prep resumes; `prep_args`
    are further `prep digits` flags, e.g. `--hires`); index digits data prepared before the length index existed
    (the demo's own data: a few seconds)."""
    from megavictor.cli import main as megavictor
    from megavictor.data.index import INDEX_NAME

    def prep(argv: list[str]) -> int:  # the `prep` verb: data_prep sits above megavictor, which never imports it
        return megavictor(["prep", *argv])

    if (path / MANIFEST_NAME).is_file() and (path / VISION_ENCODER_FILE).is_file():
        if not (path / INDEX_NAME).is_file() and prep(["index", "--data", str(path)]) != 0:
            raise SystemExit(f"megavictor demo: indexing the digits data in {path} failed")
        return
    if prep(["digits", "--out", str(path), *prep_args]) != 0:
        raise SystemExit(f"megavictor demo: preparing the digits data in {path} failed")


def train_llava_stages(run_dir: Path, data: Path, overrides: list[str], recipe: str = "demo") -> None:
    """LLaVA stage 1 then stage 2 of `configs/<recipe>_stage{1,2}.yaml` in RUN_DIR/stage{1,2} (each resumes, or is
    skipped if already complete)."""
    from megavictor.training import job

    ensure_digits(data)
    for llava_stage in (1, 2):
        stage_overrides = [f"data.path={data}", f"train.run_dir={run_dir / f'stage{llava_stage}'}"]
        if llava_stage == 1:  # the pretrained ViT; stage 2 takes everything from stage 1's checkpoint
            stage_overrides.append(f"vision.init_from={data / VISION_ENCODER_FILE}")
        else:
            stage_overrides.append(f"train.init_from={run_dir / 'stage1'}")
        cfg = load_config(CONFIGS / f"{recipe}_stage{llava_stage}.yaml", stage_overrides + list(overrides))
        summary = job.run(cfg)
        if summary.stopped_by_signal:  # Ctrl-C or SIGTERM: saved; the same command resumes where it stopped
            saved = "checkpoint saved" if summary.checkpoint else "nothing trained yet, nothing saved"
            raise SystemExit(f"megavictor demo: stopped during LLaVA stage {llava_stage} at step {summary.final_step} "
                             f"({saved}); run the same command again to resume")
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731  (None: the stage was already complete)
        print(f"stage {llava_stage}: {summary.final_step} steps, loss {fmt(summary.final_loss)}, "
              f"val loss {fmt(summary.val_loss)}")


def evaluate_run(run_dir: Path, data: Path, out_dir: Path | None = None, overrides: list[str] | None = None,
                 limit: int | None = None) -> dict:
    """Test-split accuracy of RUN_DIR/stage2 (inference `overrides`, e.g. FastV on a baseline; the first `limit`
    questions), written to OUT_DIR/eval.json (default RUN_DIR). `eval_s` is the wall time of the greedy evaluation."""
    from megavictor.vqa import checkpoint_generator, evaluate

    out_dir = run_dir if out_dir is None else out_dir
    generate, cfg = checkpoint_generator(run_dir / "stage2", data, overrides=overrides or [])
    start = time.perf_counter()
    result = evaluate(generate, cfg, data, cfg.data.test_split, limit)
    result.update(eval_s=time.perf_counter() - start, split=cfg.data.test_split, run_dir=str(run_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def train_and_evaluate(run_dir: Path, data: Path, overrides: list[str], recipe: str = "demo") -> dict:
    """Stage 1, stage 2, then test-split accuracy (also written to RUN_DIR/eval.json)."""
    train_llava_stages(run_dir, data, overrides, recipe)
    return evaluate_run(run_dir, data)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("--recipe", choices=("demo", "fidelity"), default="demo",
                        help="configs/<recipe>_stage{1,2}.yaml; fidelity: 8 layers, drop after layer 1 (k/L as in the paper)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both stages, e.g. victor.num_registers=4")
    args = parser.parse_args(argv)
    result = train_and_evaluate(Path(args.run_dir), Path(args.data), args.overrides, args.recipe)
    print(f"test accuracy {result['accuracy']:.3f} on {result['n']} questions (chance {result['chance']:.3f})")
    print(json.dumps(result))
    return 0
