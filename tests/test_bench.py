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


def test_accuracy_mean_and_sample_std() -> None:
    from megavictor.benchmarks.accuracy import mean_std

    mean, std = mean_std([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert mean_std([0.25]) == (0.25, 0.0)


def test_bench_accuracy_sweep_over_seeds(capsys: pytest.CaptureFixture[str], digits_data: Path,
                                         tmp_path: Path) -> None:
    """`bench accuracy` on a 2-step budget and 2 seeds, the fidelity recipe cut to 2 layers: Victor R=8 and R=0,
    the training-free FastV (the baseline's checkpoints) and the average pool. Each accuracy is the mean of its
    seeds' eval.json with their sample std; the seeds differ in initialisation and data order; the JSON has the
    fixed fields; the plot is a PNG."""
    import statistics

    from megavictor.benchmarks.accuracy import variants

    assert [v.name for v in variants(1, quick=True)] == ["baseline", "R8_k1", "R0_k1"]
    out = last_json(capsys, ["accuracy", "--seeds", "2", "--run-dir", str(tmp_path), "--data", str(digits_data),
                             "--variants", "R8_k1,R0_k1,fastv_free_K1,avgpool_R4", "--eval-limit", "48",
                             "train.max_steps=2", "data.seq_length=128", "log.wandb=false", "model.num_layers=2"])
    assert (out["seeds"], out["drop_layer"], out["num_layers"]) == ([1234, 1235], 1, 2)
    by_name = {r["name"]: r for r in out["results"]}
    assert list(by_name) == ["baseline", "R0_k1", "R8_k1", "fastv_free_K1", "avgpool_R4"]
    for r in out["results"]:
        accuracies = [json.loads((tmp_path / r["name"] / f"seed{s}" / "eval.json").read_text())["accuracy"]
                      for s in out["seeds"]]
        assert r["accuracies"] == accuracies and r["seeds"] == out["seeds"]
        assert r["accuracy"] == pytest.approx(statistics.fmean(accuracies))
        assert r["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert positive(r["train_speedup"]) and positive(r["infer_speedup"]) and positive(r["flops"])
    for field, name in (("baseline_accuracy", "baseline"), ("victor_accuracy", "R8_k1"),
                        ("no_register_accuracy", "R0_k1")):
        assert (out[field], out[f"{field}_std"]) == (by_name[name]["accuracy"], by_name[name]["accuracy_std"])
    first_losses = [json.loads((tmp_path / "R8_k1" / f"seed{s}" / "stage2" / "metrics.jsonl").read_text()
                               .splitlines()[0])["loss"] for s in out["seeds"]]
    assert first_losses[0] != first_losses[1], "the seeds must differ (initialisation, data order)"
    assert by_name["baseline"]["train_speedup"] == 1.0 and by_name["fastv_free_K1"]["train_speedup"] == 1.0
    assert not (tmp_path / "fastv_free_K1" / "seed1234" / "stage2").exists()  # evaluated, not trained
    assert by_name["R8_k1"]["flop_bound"] > 1 and by_name["R0_k1"]["flop_bound"] > by_name["R8_k1"]["flop_bound"]
    assert by_name["avgpool_R4"]["flop_bound"] > by_name["R0_k1"]["flop_bound"]  # the LLM never sees the image
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
