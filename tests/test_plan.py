"""`megavictor split` (formerly `megavictor plan`, still accepted): per-stage layer counts and costs for even and
balanced splits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megavictor.config import load_config
from megavictor.model.pipeline_split import balanced_split, even_split, stage_costs

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
