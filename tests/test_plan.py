"""`megavictor split` (formerly `megavictor plan`, still accepted): per-stage layer counts and costs for even and
balanced splits, for one typical sample or a data set's moments (anyres)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megavictor.commands.split import data_sample_shape
from megavictor.config import load_config
from megavictor.model.pipeline_split import SampleShape, balanced_split, even_split, stage_costs

ROOT = Path(__file__).resolve().parents[1]
LLAVA = str(ROOT / "configs" / "llava15_7b.yaml")


def split_cli(verb: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-m", "megavictor", verb, "--config", LLAVA, "--pp", "4"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_split_cli_llava_7b_pp4() -> None:
    report, _ = split_cli("split")
    even, balanced = report["even"], report["balanced"]
    assert even["layers"] == [8, 8, 8, 8]
    assert sum(balanced["layers"]) == 32 and len(balanced["layers"]) == 4
    # k=3 with 576 visual tokens: the even split's first stage is several times slower than the others.
    assert even["stage_cost"][0] > 2.5 * min(even["stage_cost"][1:])
    assert balanced["layers"][0] < 8
    assert report["speedup"] == round(max(even["stage_cost"]) / max(balanced["stage_cost"]), 4)
    assert report["speedup"] > 1.5


def test_the_old_verb_name_still_works_and_says_so() -> None:
    report, stderr = split_cli("plan")
    assert report == split_cli("split")[0]
    assert "`megavictor plan` is deprecated; use `megavictor split`" in stderr


def test_balanced_is_optimal_among_all_splits() -> None:
    cfg = load_config(LLAVA, ["model.num_layers=10", "parallel.pp=3"])
    best = max(stage_costs(cfg, balanced_split(cfg, 3)))
    for a in range(1, 9):
        for b in range(1, 10 - a):
            assert max(stage_costs(cfg, [a, b, 10 - a - b])) >= best - 1e-6


def test_without_victor_balanced_is_near_even() -> None:
    cfg = load_config(LLAVA, ["victor.enabled=false", "parallel.pp=4"])
    assert even_split(32, 4) == [8, 8, 8, 8]
    # Only the ViT on stage 0 and the output layer on the last stage make it uneven.
    assert abs(balanced_split(cfg, 4)[1] - 8) <= 2


NEXT = str(ROOT / "configs" / "llava_next_7b.yaml")


def test_a_data_sets_moments_give_each_stage_its_mean_cost_exactly() -> None:
    """The cost model over a mix of samples (anyres grids, text-only, several images) equals the mean of each
    sample's own cost, whose attention is quadratic in its length: moments, not a typical sample."""
    cfg = load_config(NEXT, ["parallel.pp=4"])
    # (visual, registers, text, views) per sample: a 2x2 grid, a 1x2 grid, text only, two images.
    samples = [(2928, 8, 100, 5), (1488, 8, 40, 3), (0, 0, 700, 0), (2928 + 1488, 16, 60, 8)]
    shape = SampleShape.of_samples(*zip(*samples))
    layers = [2, 6, 12, 12]
    one_by_one = [stage_costs(cfg, layers, SampleShape.typical(*s)) for s in samples]
    expected = [sum(costs) / len(samples) for costs in zip(*one_by_one)]
    assert stage_costs(cfg, layers, shape) == pytest.approx(expected, rel=1e-12)
    # The mean length alone would under-count attention (E[s^2] > E[s]^2 when lengths vary).
    flat = SampleShape.typical(round(shape.visual), round(shape.registers), round(shape.text), round(shape.views))
    assert stage_costs(cfg, layers, flat)[0] < 0.98 * expected[0]


def test_anyres_moves_the_balanced_boundary() -> None:
    """LLaVA-NeXT's images (up to 2928 visual tokens) make layers < k heavier still than LLaVA-1.5's 576, so the
    balanced split gives the first stage fewer layers; a data set of small grids gives it more."""
    next_split = balanced_split(load_config(NEXT, ["parallel.pp=4"]), 4)
    llava_split = balanced_split(load_config(LLAVA, ["parallel.pp=4"]), 4)
    assert next_split[0] < llava_split[0] and sum(next_split) == 32
    cfg = load_config(NEXT, ["parallel.pp=4"])
    small = SampleShape.of_samples([0, 0, 0, 0, 0, 0, 0, 1000], [0] * 7 + [8], [300] * 8, [0] * 7 + [3])
    assert balanced_split(cfg, 4, small)[0] > next_split[0]


def test_split_data_weighs_the_stages_by_the_data_sets_samples(mix_data: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`split --data DIR` (and a training job's balanced split) sees the training split's own samples: the mean
    visual slots per sample recomputed here from the index's image sizes (nothing truncated at 2048 slots)."""
    from megavictor.cli import main
    from megavictor.data.index import load_index
    from megavictor.data.manifest import load_manifest

    overrides = [f"data.path={mix_data}", "data.train_split=train", "data.val_split=val", "data.test_split=test",
                 "vision.image_grid_pinpoints=[[32,64],[64,32],[64,64],[96,32],[32,96]]",
                 "data.image_aspect_ratio=anyres", "data.seq_length=2048", "parallel.pp=2"]
    demo = str(ROOT / "configs" / "demo_stage2.yaml")
    assert main(["split", "--config", demo, "--data", str(mix_data), *overrides[1:]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    cfg = load_config(demo, overrides)
    spec = cfg.vision.anyres()
    split = load_index(str(mix_data), str(mix_data / load_manifest(str(mix_data)).tokenizer), "v1",
                       cfg.data.system_prompt, need_sizes=True).split("train")
    visual = [sum(spec.layout(h, w).tokens for h, w in split.image_sizes(i)) for i in range(len(split))]
    assert f"per sample {sum(visual) / len(visual):.6g} visual" in out[0], out[0]
    assert "mean over" in out[0] and len({v for v in visual}) > 10  # the mix: text-only, several grids
    shape = data_sample_shape(cfg)
    assert json.loads(out[-1])["balanced"]["layers"] == balanced_split(cfg, 2, shape)
