"""`megavictor bench train | infer | pipeline` at tiny sizes: each runs and its last stdout line is one JSON object
with the documented fields and sane values. No timing assertions: the speed goals live in the benchmark output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megavictor.bench import main

TINY = ["model.num_layers=4", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
        "vision.image_size=32", "vision.patch_size=8", "vision.hidden_size=16", "vision.ffn_hidden_size=32",
        "vision.num_attention_heads=2", "model.vocab_size=64", "victor.drop_layer=1"]


def last_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1, "a human table comes before the JSON line"
    return json.loads(lines[-1])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_train(capsys: pytest.CaptureFixture[str]) -> None:
    out = last_json(capsys, ["train", "--repeats", "1", "--warmup", "0", "--rows", "1", "--text-lengths", "8",
                             *TINY])
    fields = ("victor_step_s", "baseline_step_s", "speedup", "flop_bound", "ratio_to_bound", "victor_peak_mem_mb",
              "baseline_peak_mem_mb")
    assert set(out["by_text_length"]) == {"8"}
    for record in (out, *out["by_text_length"].values()):
        for field in fields:
            assert positive(record[field]), (field, record)
        assert record["flop_bound"] > 1  # Victor does less work than the baseline on the same data
        assert record["victor_peak_mem_mb"] > 50 and record["baseline_peak_mem_mb"] > 50  # whole processes
    assert out["speedup"] == out["by_text_length"]["8"]["speedup"]


def test_bench_infer(capsys: pytest.CaptureFixture[str]) -> None:
    out = last_json(capsys, ["infer", "--batch", "2", "--prompt-tokens", "8", "--long-tokens", "4", "--repeats", "1",
                             "--long-repeats", "1", *TINY])
    for field in ("speedup", "speedup_128", "prefill_speedup", "decode_speedup", "flop_bound", "ratio_to_bound"):
        assert positive(out[field]), field
    assert out["flop_bound"] > 1


def test_bench_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    out = last_json(capsys, ["pipeline", "--repeats", "1", "--warmup", "0", "--micro-batches", "2", *TINY])
    for field in ("even_tokens_per_s", "balanced_tokens_per_s", "speedup", "predicted_speedup"):
        assert positive(out[field]), field
    assert sum(out["even_layers"]) == sum(out["balanced_layers"]) == 4
    assert out["speedup"] == pytest.approx(out["balanced_tokens_per_s"] / out["even_tokens_per_s"], rel=1e-2)


def test_flop_bound_of_llava15_7b_matches_the_paper() -> None:
    """The counter behind every benchmark's `flop_bound`, on LLaVA-1.5-7B at 64 text tokens: the paper's analytic
    bound is 5.1x for the LLM and 4.4x with the ViT."""
    from megavictor.config import load_config
    from megavictor.metrics import decoder_flops, vision_flops

    recipe = Path(__file__).resolve().parents[1] / "configs" / "llava15_7b.yaml"
    base = load_config(recipe, ["victor.enabled=false"])
    victor = load_config(recipe)
    v, t = 576, 64
    baseline_llm = decoder_flops(base, v + t, v + t, factor=1.0)
    victor_llm = decoder_flops(victor, v + 8 + t, 8 + t, factor=1.0)
    vit = vision_flops(victor, 1, train=False)
    assert 5.1 <= baseline_llm / victor_llm <= 5.25
    assert 4.3 <= (baseline_llm + vit) / (victor_llm + vit) <= 4.45


def test_bench_infer_on_an_hf_export(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--hf DIR`: a Victor export against the same weights run as a stock LLaVA."""
    from megavictor.benchmarks.common import bench_config
    from megavictor.benchmarks.infer import export_pair

    dirs = export_pair(bench_config(None, TINY + ["data.text_length=8"]), tmp_path)
    out = last_json(capsys, ["infer", "--hf", str(dirs["victor"]), "--batch", "2", "--prompt-tokens", "8",
                             "--long-tokens", "3", "--repeats", "1", "--long-repeats", "1"])
    assert out["source"] == str(dirs["victor"])
    assert out["flop_bound"] > 1 and positive(out["speedup"]) and positive(out["decode_speedup"])


def test_bench_accuracy_quick(capsys: pytest.CaptureFixture[str], digits_data: Path, tmp_path: Path) -> None:
    """`bench accuracy --quick` with a 2-step budget: the three variants train and evaluate like the demo, the
    JSON has the documented fields, the speedups are relative to the baseline, and the plot is a PNG."""
    out = last_json(capsys, ["accuracy", "--quick", "--run-dir", str(tmp_path), "--data", str(digits_data),
                             "train.max_steps=2", "data.seq_length=128", "log.wandb=false"])
    names = [r["name"] for r in out["results"]]
    assert names == ["baseline", "R8_k3", "R0_k3"]
    by_name = {r["name"]: r for r in out["results"]}
    assert by_name["baseline"]["enabled"] is False and by_name["baseline"]["train_speedup"] == 1.0
    assert (by_name["R8_k3"]["num_registers"], by_name["R8_k3"]["drop_layer"]) == (8, 3)
    assert by_name["R0_k3"]["num_registers"] == 0
    for r in out["results"]:
        assert positive(r["train_speedup"]) and positive(r["infer_speedup"])
        assert json.loads((tmp_path / r["name"] / "eval.json").read_text())["accuracy"] == r["accuracy"]
    assert by_name["R8_k3"]["flop_bound"] > 1 and by_name["R0_k3"]["flop_bound"] > by_name["R8_k3"]["flop_bound"]
    assert (out["baseline_accuracy"], out["victor_accuracy"], out["no_register_accuracy"]) == \
        (by_name["baseline"]["accuracy"], by_name["R8_k3"]["accuracy"], by_name["R0_k3"]["accuracy"])
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
