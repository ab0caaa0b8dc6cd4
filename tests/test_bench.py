"""`megavictor bench train | infer | pipeline` at tiny sizes: each runs and its last stdout line is one JSON object
with the documented fields and sane values. No timing assertions: the speed goals live in the benchmark output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megavictor.benchmarks.cli import main
from tests.test_interface import assert_pinned_json

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
    assert_pinned_json("train", out)
    fields = ("victor_step_s", "baseline_step_s", "speedup", "flop_bound", "ratio_to_bound", "victor_peak_mem_mb",
              "baseline_peak_mem_mb")
    assert set(out["by_text_length"]) == {"8"}
    for record in (out, *out["by_text_length"].values()):
        for field in fields:
            assert positive(record[field]), (field, record)
        assert record["flop_bound"] > 1  # Victor does less work than the baseline on the same data
        assert record["victor_peak_mem_mb"] > 50 and record["baseline_peak_mem_mb"] > 50  # whole processes
    assert out["speedup"] == out["by_text_length"]["8"]["speedup"]
    # No GPU here: host memory, wall-clock timer; the row lengths are one sample's slots (no FP8 padding).
    assert out["peak_memory_kind"] == "host_rss" and out["timer"] == "wall_clock" and out["fp8"] is None
    assert out["attention_backend"] == "local"  # null, resolved in the worker as a training job does
    record = out["by_text_length"]["8"]
    assert record["baseline_seq_length"] == 16 + 8 and record["victor_seq_length"] == 16 + 8 + 8
    assert record["victor_short_length"] == 8 + 8
    assert record["victor_host_peak_mem_mb"] == record["victor_peak_mem_mb"]


def test_bench_train_anyres(capsys: pytest.CaptureFixture[str]) -> None:
    """`--anyres`: LLaVA-NeXT's token shape, the images cycling through five aspect ratios (each its own grid);
    rows are padded to the longest sample in both variants, and the bound counts exactly those rows."""
    from megavictor.benchmarks.common import anyres_image_sizes, bench_config

    grids = ["vision.image_grid_pinpoints=[[32,64],[64,32],[64,64],[96,32],[32,96]]"]
    out = last_json(capsys, ["train", "--anyres", "--repeats", "1", "--warmup", "0", "--rows", "5",
                             "--text-lengths", "8", *TINY, *grids])
    assert_pinned_json("train", out)
    spec = bench_config(None, [*TINY, *grids, "data.image_aspect_ratio=anyres"]).vision.anyres()
    expected = [spec.layout(h, w).tokens for h, w in anyres_image_sizes(bench_config(None, TINY))]
    assert out["anyres"] and out["visual_per_image"] == expected and len(set(expected)) >= 3
    record = out["by_text_length"]["8"]
    assert record["baseline_seq_length"] == max(expected) + 8 and record["victor_seq_length"] == max(expected) + 16
    # After the drop a row keeps its registers, text and tail padding: the padding of the row with fewest tokens.
    assert record["victor_short_length"] == 8 + 8 + max(expected) - min(expected)
    assert record["flop_bound"] > 1 and positive(record["speedup"])


def test_bench_train_lengths_are_fp8_aligned() -> None:
    """Under `train.fp8` the bench rows of Victor and of the baseline, and Victor's short length after the drop, are
    all multiples of 16 (R=8 makes the two rows differ by 8: both are padded up); without FP8 the rows stay one
    sample's slots exactly. Pure Python: the configs and batches only."""
    from megavictor.benchmarks.common import bench_config, image_text_batches, sample_slots, variant
    from megavictor.model.drop_plan import short_length

    fp8 = ["train.fp8=hybrid", "train.attention_backend=te", "train.precision=bf16"]
    for shape in ([], TINY):  # the default CPU LLaVA-1.5 shape (576 visual tokens) and the tiny one (16)
        cfg = bench_config(None, shape + fp8)
        assert cfg.victor.num_registers % 16 != 0  # the case that cannot be aligned without padding
        for text in (8, 24, 64, 100, 256):
            victor, baseline = variant(cfg, True, text), variant(cfg, False, text)
            assert victor.train.fp8 and baseline.train.fp8
            for c, on in ((victor, True), (baseline, False)):
                assert c.data.seq_length % 16 == 0, (shape, text, on, c.data.seq_length)
                assert 0 <= c.data.seq_length - sample_slots(cfg, on, text) < 16
            batch = image_text_batches(victor, 2, 1)[0]
            short = short_length(batch, victor)
            assert short % 16 == 0 and victor.victor.num_registers + text <= short < victor.data.seq_length
            assert short_length(image_text_batches(baseline, 2, 1)[0], baseline) == baseline.data.seq_length
        plain = bench_config(None, shape)
        assert variant(plain, True, 64).data.seq_length == sample_slots(plain, True, 64)
        assert variant(plain, False, 64).data.seq_length == sample_slots(plain, False, 64)


def test_bench_timer_synchronizes_cuda_around_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`timed` (every `bench train` step) waits for the GPU before starting and before stopping the clock. The CUDA
    functions are monkeypatched here only to record the order of the calls: this machine has no GPU."""
    import time

    import torch

    from megavictor.benchmarks import common

    calls: list[str] = []
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))
    monkeypatch.setattr(time, "perf_counter", lambda: calls.append("clock") or next(clock))
    result, seconds, cpu_seconds = common.timed(lambda: calls.append("step") or "out")
    assert calls == ["synchronize", "clock", "step", "synchronize", "clock"]
    assert (result, seconds) == ("out", 2.5) and cpu_seconds >= 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls.clear()
    clock = iter([1.0, 2.0])
    common.timed(lambda: calls.append("step"))
    assert calls == ["clock", "step", "clock"]  # no CUDA: no synchronize


# 32-dim heads (the smallest vLLM's CPU attention runs) and 64 visual tokens per image.
SERVE_TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=2",
              "vision.image_size=64", "vision.patch_size=8", "vision.hidden_size=32", "vision.ffn_hidden_size=64",
              "vision.num_attention_heads=2", "model.vocab_size=64", "victor.drop_layer=1"]


def test_bench_serve(capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM (the serving venv) serves the Victor export and the same weights as a stock LLaVA; Victor holds fewer KV
    blocks per request: 1 layer x ceil(84 / 32) + 3 x ceil(20 / 32) = 6 layer-blocks against 4 x ceil(76 / 32) = 12."""
    import importlib.util

    from megavictor.serving import venv as serving_venv

    if importlib.util.find_spec("vllm") is None and serving_venv.ready() is None:
        pytest.skip(f"no vLLM here and no serving venv at {serving_venv.venv_root()}: build it with `python -m "
                    "megavictor.serving.venv` (.ci/run does)")
    out = last_json(capsys, ["serve", "--batch", "2", "--prompt-tokens", "8", "--long-tokens", "4", "--repeats", "1",
                             *SERVE_TINY])
    assert_pinned_json("serve", out)
    assert (out["victor_kv_layer_blocks_per_request"], out["baseline_kv_layer_blocks_per_request"]) == (6, 12)
    assert out["kv_blocks_ratio"] == 2
    assert all(positive(out[k]) for k in ("speedup", "speedup_128", "bound", "ratio_to_bound"))
    assert out["bound"] > 1


def test_bench_infer(capsys: pytest.CaptureFixture[str]) -> None:
    out = last_json(capsys, ["infer", "--batch", "2", "--prompt-tokens", "8", "--long-tokens", "4", "--repeats", "1",
                             "--long-repeats", "1", *TINY])
    assert_pinned_json("infer", out)
    for field in ("speedup", "speedup_128", "prefill_speedup", "decode_speedup", "flop_bound", "ratio_to_bound"):
        assert positive(out[field]), field
    assert out["flop_bound"] > 1


def test_bench_infer_anyres(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--anyres`: a Victor LLaVA-NeXT export against the stock LlavaNext, the prompts' images cycling through five
    aspect ratios (each its own visual count), left-padded to the longest prompt; `--hf` serves a NeXT export's
    weights the same way."""
    from megavictor.benchmarks.common import anyres_image_sizes, bench_config
    from megavictor.benchmarks.infer import export_pair

    grids = ["vision.image_grid_pinpoints=[[32,64],[64,32],[64,64],[96,32],[32,96]]"]
    cfg = bench_config(None, [*TINY, *grids, "data.image_aspect_ratio=anyres", "data.text_length=8"])
    expected = [cfg.vision.anyres().layout(h, w).tokens for h, w in anyres_image_sizes(cfg)]
    assert len(set(expected)) >= 3
    common = ["--batch", "6", "--prompt-tokens", "8", "--long-tokens", "3", "--repeats", "1", "--long-repeats", "1"]
    out = last_json(capsys, ["infer", "--anyres", *common, *TINY, *grids])
    assert_pinned_json("infer", out)
    assert out["anyres"] and out["visual_per_image"] == expected + expected[:1]
    assert out["prompt_slots"] == {"victor": max(expected) + 8 + 8, "baseline": max(expected) + 8}
    assert out["flop_bound"] > 1 and positive(out["speedup"]) and positive(out["decode_speedup"])
    dirs = export_pair(cfg, tmp_path)
    served = last_json(capsys, ["infer", "--hf", str(dirs["victor"]), *common])
    assert served["anyres"] and served["visual_per_image"] == out["visual_per_image"]
    assert served["flop_bound"] == out["flop_bound"]


def test_generate_flops_of_a_mix_pad_every_row_to_the_longest_survivor() -> None:
    """After the drop the exported model's rows are as long as the one with the fewest visual slots (right-aligned
    survivors); without a mix the count is `rows` times one prompt's."""
    from megavictor.benchmarks.common import bench_config
    from megavictor.model.flops import generate_flops

    victor, baseline = bench_config(None, TINY), bench_config(None, [*TINY, "victor.enabled=false"])
    prompt = 120 + 8 + 8
    assert generate_flops(victor, [70, 120], prompt, 4) == generate_flops(victor, [70, 70], prompt, 4)
    assert generate_flops(victor, [70, 120], prompt, 4) > generate_flops(victor, [120, 120], prompt, 4)
    assert generate_flops(baseline, [70, 120], prompt, 4) == generate_flops(baseline, [120, 120], prompt, 4)
    assert generate_flops(victor, [16] * 3, 32, 4) == pytest.approx(3 * generate_flops(victor, [16], 32, 4))
    more_views = generate_flops(victor, [70, 120], prompt, 4, views=9) - generate_flops(victor, [70, 120], prompt, 4)
    assert more_views > 0


def test_bench_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    out = last_json(capsys, ["pipeline", "--repeats", "1", "--warmup", "0", "--micro-batches", "2", *TINY])
    assert_pinned_json("pipeline", out)
    for field in ("even_tokens_per_s", "balanced_tokens_per_s", "speedup", "predicted_speedup"):
        assert positive(out[field]), field
    assert sum(out["even_layers"]) == sum(out["balanced_layers"]) == 4
    assert out["speedup"] == pytest.approx(out["balanced_tokens_per_s"] / out["even_tokens_per_s"], rel=1e-2)


def test_flop_bound_of_llava15_7b_matches_the_paper() -> None:
    """The counter behind every benchmark's `flop_bound`, on LLaVA-1.5-7B at 64 text tokens: the paper's analytic
    bound is 5.1x for the LLM and 4.4x with the ViT."""
    from megavictor.config import load_config
    from megavictor.model.flops import decoder_flops, vision_flops

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
    from megavictor.errors import UserError

    dirs = export_pair(bench_config(None, TINY + ["data.text_length=8"]), tmp_path)
    out = last_json(capsys, ["infer", "--hf", str(dirs["victor"]), "--batch", "2", "--prompt-tokens", "8",
                             "--long-tokens", "3", "--repeats", "1", "--long-repeats", "1"])
    assert out["source"] == str(dirs["victor"])
    assert out["flop_bound"] > 1 and positive(out["speedup"]) and positive(out["decode_speedup"])
    assert not out["anyres"] and out["visual_per_image"] == [16, 16]
    with pytest.raises(UserError, match="has no anyres grids"):
        main(["infer", "--anyres", "--hf", str(dirs["victor"])])


def test_accuracy_mean_and_sample_std() -> None:
    from megavictor.benchmarks.accuracy import mean_std

    mean, std = mean_std([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert mean_std([0.25]) == (0.25, 0.0)


def test_accuracy_paired_difference_is_a_t_interval_over_seeds() -> None:
    """Per-seed differences (0.02, 0.02, 0.05, -0.01): mean 0.02, sample std sqrt(0.0006), t(0.975, 3) = 3.182."""
    from megavictor.benchmarks.accuracy import paired_difference

    diff = paired_difference([0.60, 0.62, 0.65, 0.61], [0.58, 0.60, 0.60, 0.62])
    half = 3.182446 * 0.0006 ** 0.5 / 2
    assert diff["mean"] == pytest.approx(0.02)
    assert (diff["ci95_low"], diff["ci95_high"]) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert paired_difference([0.7], [0.5]) == {"mean": pytest.approx(0.2), "ci95_low": None, "ci95_high": None}


def test_accuracy_variants_of_one_seed_are_paired(digits_data: Path, tmp_path: Path) -> None:
    """The paired protocol: at one seed, the baseline, Victor R=8 and R=0 start from the same values of every
    parameter they share and draw the training samples in the same order; another seed changes both."""
    import torch

    from megavictor.benchmarks.accuracy import BASELINE, Task, victor
    from megavictor.config import load_config
    from megavictor.data.training_data import SplitData
    from megavictor.demo import CONFIGS
    from megavictor.distributed import ParallelDims
    from megavictor.model.reference import ReferenceVLM

    def setup(variant, seed: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        task = Task(variant, seed, tmp_path, digits_data, "fidelity", (), None)
        cfg = load_config(CONFIGS / "fidelity_stage2.yaml", [f"data.path={digits_data}", *task.training_overrides()])
        params = dict(ReferenceVLM(cfg).named_parameters())
        dims = ParallelDims(world=1, rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
        order = SplitData(cfg, cfg.data.train_split, dims, shuffle=True, epochs=None).order.epoch_order(0)
        return params, order

    (base, base_order), (r8, r8_order), (r0, r0_order) = (setup(v, 1234) for v in (BASELINE, victor(8, 1),
                                                                                     victor(0, 1)))
    assert "registers" in r8 and "registers" not in base
    for other in (r8, r0):
        shared = base.keys() & other.keys()
        assert len(shared) == len(base) > 10
        assert all(torch.equal(base[name], other[name]) for name in shared)
    assert base_order == r8_order == r0_order
    next_seed, next_order = setup(BASELINE, 1235)
    assert next_order != base_order
    assert not torch.equal(next_seed["decoder.layers.0.self_attention.linear_qkv.weight"],
                           base["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_bench_accuracy_sweep_over_seeds(capsys: pytest.CaptureFixture[str], digits_data: Path,
                                         tmp_path: Path) -> None:
    """`bench accuracy` on a 2-step budget and 2 seeds, the fidelity recipe cut to 2 layers: Victor R=8 and R=0,
    the training-free FastV (the baseline's checkpoints) and the average pool. Each accuracy is the mean of its
    seeds' eval.json with their sample std; the seeds differ in initialisation and data order; the JSON has the
    fixed fields; the plot is a PNG."""
    import statistics

    from megavictor.benchmarks.accuracy import variants

    assert [v.name for v in variants(1, quick=True)] == ["baseline", "R8_k1", "R0_k1"]
    sweep = {v.name: v for v in variants(1, quick=False)}
    assert {f"{peer}_B{b}" for peer in ("random", "divprune", "visionzip", "pdrop") for b in (8, 16, 32)} <= set(sweep)
    assert sweep["pdrop_B16"].train[1:] == ("peer.pyramid_layers=[1,3,5]", "peer.pyramid_keep=[16,8,4]")
    out = last_json(capsys, ["accuracy", "--seeds", "2", "--jobs", "2", "--run-dir", str(tmp_path), "--data",
                             str(digits_data), "--variants", "R8_k1,R0_k1,fastv_free_K1,avgpool_R4,divprune_B8",
                             "--eval-limit", "48", "train.max_steps=2", "data.seq_length=128", "log.wandb=false",
                             "model.num_layers=2"])
    assert_pinned_json("accuracy", out)
    assert out["test_questions"] == 48 and out["jobs"] == 2 and out["wall_s"] > 0
    assert (out["seeds"], out["drop_layer"], out["num_layers"]) == ([1234, 1235], 1, 2)
    by_name = {r["name"]: r for r in out["results"]}
    assert list(by_name) == ["baseline", "R0_k1", "R8_k1", "fastv_free_K1", "avgpool_R4", "divprune_B8"]
    for r in out["results"]:
        accuracies = [json.loads((tmp_path / r["name"] / f"seed{s}" / "eval.json").read_text())["accuracy"]
                      for s in out["seeds"]]
        assert r["accuracies"] == accuracies and r["seeds"] == out["seeds"]
        assert r["accuracy"] == pytest.approx(statistics.fmean(accuracies))
        assert r["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert positive(r["train_speedup"]) and positive(r["infer_speedup"]) and positive(r["flops"])
        assert (tmp_path / r["name"] / "seed1234" / "bench.log").is_file()  # a worker's output, not interleaved
    diffs = {name: [a - b for a, b in zip(by_name["R8_k1"]["accuracies"], by_name[name]["accuracies"])]
             for name in ("baseline", "R0_k1")}
    for field, name in (("victor_minus_baseline", "baseline"), ("victor_minus_no_register", "R0_k1")):
        low, mean, high = out[field]["ci95_low"], out[field]["mean"], out[field]["ci95_high"]
        assert mean == pytest.approx(statistics.fmean(diffs[name])) and low <= mean <= high
        t_975 = math.tan(math.pi * 0.475)  # Student's t at one degree of freedom (Cauchy): 12.706
        assert high - mean == pytest.approx(t_975 * abs(diffs[name][0] - diffs[name][1]) / 2, abs=1e-9)
    assert out["victor_minus_baseline"] == by_name["R8_k1"]["minus_baseline"]
    for field, name in (("baseline_accuracy", "baseline"), ("victor_accuracy", "R8_k1"),
                        ("no_register_accuracy", "R0_k1")):
        assert (out[field], out[f"{field}_std"]) == (by_name[name]["accuracy"], by_name[name]["accuracy_std"])
    first_losses = [json.loads((tmp_path / "R8_k1" / f"seed{s}" / "stage2" / "metrics.jsonl").read_text()
                               .splitlines()[0])["loss"] for s in out["seeds"]]
    assert first_losses[0] != first_losses[1], "the seeds must differ (initialisation, data order)"
    assert by_name["baseline"]["train_speedup"] == 1.0 and by_name["fastv_free_K1"]["train_speedup"] == 1.0
    for free in ("fastv_free_K1", "divprune_B8"):  # evaluated on the baseline's checkpoints, not trained
        assert not (tmp_path / free / "seed1234" / "stage2").exists() and by_name[free]["train_speedup"] == 1.0
    assert by_name["R8_k1"]["flop_bound"] > 1 and by_name["R0_k1"]["flop_bound"] > by_name["R8_k1"]["flop_bound"]
    assert by_name["avgpool_R4"]["flop_bound"] > by_name["R0_k1"]["flop_bound"]  # the LLM never sees the image
    # Forward FLOPs as evaluated: a training-free pruner trains as the baseline but its LLM sees only B visual tokens
    # from layer 0, as avgpool's R do; FastV on the baseline's checkpoints drops visual tokens at k.
    assert by_name["divprune_B8"]["flops"] == by_name["baseline"]["flops"]
    assert by_name["divprune_B8"]["infer_flops"] > by_name["avgpool_R4"]["infer_flops"]  # 8 tokens from layer 0, not 4
    assert by_name["divprune_B8"]["infer_flops"] < by_name["R8_k1"]["infer_flops"] < by_name["baseline"]["infer_flops"]
    assert by_name["fastv_free_K1"]["infer_flops"] < by_name["baseline"]["infer_flops"]
    assert by_name["baseline"]["infer_flop_bound"] == 1.0
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from megavictor.benchmarks.accuracy import main as accuracy
    from megavictor.errors import UserError

    saved = json.loads((tmp_path / "accuracy.json").read_text())
    for r in saved["results"]:
        del r["infer_flops"]
    (tmp_path / "accuracy.json").write_text(json.dumps(saved))  # as written before infer_flops existed
    with pytest.raises(UserError, match="was written before `infer_flops` existed: rerun the benchmark"):
        accuracy(["--replot", "--run-dir", str(tmp_path)])

    # A run that fails (here: its stage-2 run directory held by a live job, this process) is named at once; the other
    # runs finish (reused here: scored again), and the sweep then stops naming it.
    from megavictor.training.run_lock import acquire

    capsys.readouterr()
    held = acquire(tmp_path / "R0_k1" / "seed1235" / "stage2")
    try:
        with pytest.raises(UserError, match=r"1 of 4 runs failed: R0_k1 seed 1235 \(log .*bench.log\); fix the cause"):
            accuracy(["--seeds", "2", "--jobs", "2", "--run-dir", str(tmp_path), "--data", str(digits_data),
                      "--variants", "R0_k1", "--eval-limit", "48", "train.max_steps=2", "data.seq_length=128",
                      "log.wandb=false", "model.num_layers=2"])
    finally:
        held.release()
    printed = capsys.readouterr()
    assert "R0_k1 seed 1235: failed: train.run_dir=" in printed.err and "is in use by" in printed.err, printed.err
    scored = {line.split(":")[0] for line in printed.out.splitlines() if ": accuracy " in line}
    assert scored == {"baseline seed 1234", "baseline seed 1235", "R0_k1 seed 1234"}, printed.out

    with pytest.raises(UserError, match="its test split vqa_test holds 500 questions; the paired protocol needs at "
                                        "least 2000"):  # the session's digits hold 500: refused before any training
        accuracy(["--quick", "--data", str(digits_data), "--run-dir", str(tmp_path / "small")])
    assert not (tmp_path / "small").exists()


def test_bench_accuracy_hires(capsys: pytest.CaptureFixture[str], hires_digits_data: Path, digits_data: Path,
                              tmp_path: Path) -> None:
    """`--hires` on a 2-step budget, one seed, a 2-layer LLM: the anyres baseline, the baseline on one 32-px view and
    Victor R=8 at anyres, trained and scored on the same test questions; the single view takes 16 visual tokens per
    image (the anyres views 52-88), so its rows pack more samples. The task and the data must agree (one line)."""
    from megavictor.benchmarks.accuracy import main as accuracy
    from megavictor.errors import UserError
    from tests.test_interface import BENCH_JSON_FIELDS, BENCH_RECORD_FIELDS

    out = last_json(capsys, ["accuracy", "--hires", "--seeds", "1", "--jobs", "1", "--run-dir", str(tmp_path), "--data",
                             str(hires_digits_data), "--eval-limit", "24", "train.max_steps=2", "log.wandb=false",
                             "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                             "model.num_attention_heads=2", "data.seq_length=256"])
    no_r0 = {"no_register_accuracy", "no_register_accuracy_std", "victor_minus_no_register"}  # --hires: no R=0
    assert BENCH_JSON_FIELDS["accuracy"] - no_r0 <= set(out) and not no_r0 & set(out)
    assert all(BENCH_RECORD_FIELDS["accuracy"][1] <= set(r) for r in out["results"])
    assert (out["hires"], out["recipe"], out["seeds"], out["drop_layer"]) == (True, "hires", [1234], 1)
    by_name = {r["name"]: r for r in out["results"]}
    assert list(by_name) == ["baseline", "baseline_single", "R8_k1"]
    assert {r["questions"] for r in out["results"]} == {24}
    assert (out["single_view_accuracy"], out["victor_accuracy"]) == (by_name["baseline_single"]["accuracy"],
                                                                     by_name["R8_k1"]["accuracy"])
    assert by_name["baseline_single"]["train_samples"] > by_name["baseline"]["train_samples"] > 0
    assert by_name["baseline_single"]["flop_bound"] > by_name["R8_k1"]["flop_bound"] > 1
    single = json.loads((tmp_path / "baseline_single" / "seed1234" / "stage2" / "config.json").read_text())
    assert single["vision"]["image_grid_pinpoints"] is None and single["data"]["image_aspect_ratio"] == "pad"
    with pytest.raises(UserError, match="holds the 32-px digits"):
        accuracy(["--hires", "--data", str(digits_data), "--run-dir", str(tmp_path / "wrong")])
    with pytest.raises(UserError, match="holds the --hires digits"):
        accuracy(["--data", str(hires_digits_data), "--run-dir", str(tmp_path / "wrong")])
    with pytest.raises(UserError, match="--recipe demo does not apply to --hires"):
        accuracy(["--hires", "--recipe", "demo"])
