"""The public interface, pinned: the CLI verbs and their flags, the config keys, the JSON fields each `bench` verb
prints. Removing or renaming one fails here until an alias keeps the old spelling working (`megavictor.cli.
RENAMED_VERBS`, `megavictor.config.RENAMED_KEYS`, a second option string on the argparse flag, or the old JSON field
kept beside the new one). The pins are literal data, taken from the parsers, dataclasses and result dicts of
2026-12-07 (and the README's command table): add to them, never drop from them without an alias.

Flags come from `build_parser()` where the verb's module is stable (`prep`, `bench`), and otherwise from
`python -m megavictor <verb> [sub] --help` in a subprocess, which holds however the modules behind the verbs move.
`bench loader`'s JSON is checked here on a real run (the `mix_data` set); the other bench verbs' JSON is checked by
tests/test_bench.py's runs through `assert_pinned_json` (no second run of those here).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- verbs and their flags

# (verb, sub-verb...) -> the option flags its parser must accept (it may accept more).
VERB_FLAGS: dict[tuple[str, ...], set[str]] = {
    ("demo",): {"--run-dir", "--data", "--recipe"},
    ("train",): {"--config"},
    ("eval",): {"--checkpoint", "--hf", "--data", "--split", "--limit", "--max-new-tokens", "--no-kv-cache"},
    ("launch",): {"--config", "--cluster", "--nodes", "--gpus-per-node", "--tasks-per-node", "--cpus-per-task",
                  "--partition", "--time", "--account", "--qos", "--network-interface", "--signal-delay", "--entry",
                  "--dry-run", "--wait"},
    ("convert", "from-hf"): {"--llm", "--vision", "--llava", "--out", "--tp", "--pp", "--config", "--force"},
    ("convert", "to-hf"): {"--checkpoint", "--out", "--tokenizer", "--max-shard-size", "--force"},
    ("split",): {"--config", "--pp"},
    ("plan",): {"--config", "--pp"},  # the old name of `split`
    ("prep", "llava"): {"--json", "--images", "--out", "--split", "--maxcount", "--maxsize", "--workers", "--strict",
                        "--restart", "--tokenizer", "--system-prompt", "--max-slots", "--image-slots",
                        "--min-image-side", "--max-image-pixels"},
    ("prep", "digits"): {"--out", "--seed", "--grid", "--maxcount", "--restart", "--vision-config", "--vision-steps",
                         "--hires", "--test-samples"},
    ("prep", "mix"): {"--out", "--samples", "--eval-samples", "--seed", "--text-only-fraction",
                      "--multi-image-fraction"},
    ("prep", "index"): {"--data", "--tokenizer", "--system-prompt"},
    ("bench", "loader"): {"--data", "--dp", "--seq-length", "--split", "--config", "--global-batch-size", "--steps",
                          "--workers"},
    ("bench", "train"): {"--config", "--repeats", "--warmup", "--text-lengths", "--rows", "--micro-batches",
                         "--threads", "--anyres"},
    ("bench", "infer"): {"--hf", "--config", "--batch", "--prompt-tokens", "--long-tokens", "--repeats",
                         "--long-repeats", "--threads", "--anyres"},
    ("bench", "serve"): {"--config", "--batch", "--prompt-tokens", "--long-tokens", "--repeats", "--long-repeats",
                         "--threads"},
    ("bench", "pipeline"): {"--config", "--repeats", "--warmup", "--rows", "--micro-batches", "--length-buckets"},
    ("bench", "accuracy"): {"--quick", "--seeds", "--recipe", "--variants", "--run-dir", "--data", "--eval-limit",
                            "--plot", "--replot", "--hires", "--jobs"},
}

# The verbs that take trailing `section.key=value` config overrides (a positional `overrides`, nargs="*").
TAKES_OVERRIDES: set[tuple[str, ...]] = {
    ("demo",), ("train",), ("eval",), ("launch",), ("convert", "from-hf"), ("split",), ("plan",),
    ("bench", "loader"), ("bench", "train"), ("bench", "infer"), ("bench", "serve"), ("bench", "pipeline"),
    ("bench", "accuracy"),
}

# Verbs whose parser is read in-process: module -> build_parser() (with sub-parsers for prep).
IN_PROCESS = {"prep", "bench"}
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
OPTION_LINE = re.compile(r"^  (-\S.*?)(?: {2,}|$)", re.MULTILINE)  # "  -x, --name NAME, --alias NAME   help"


def _parser_flags(parser: argparse.ArgumentParser) -> tuple[set[str], bool]:
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    overrides = any(a.dest == "overrides" and a.nargs == "*" and not a.option_strings for a in parser._actions)
    return flags, overrides


def _in_process(verb: tuple[str, ...]) -> tuple[set[str], bool]:
    if verb[0] == "prep":
        from data_prep.cli import build_parser

        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return _parser_flags(sub.choices[verb[1]])
    from megavictor.benchmarks.cli import BENCHES

    return _parser_flags(importlib.import_module(BENCHES[verb[1]]).build_parser())


def help_flags(text: str) -> tuple[set[str], bool]:
    """The `--flags` (aliases included) of an argparse `--help` text's option lines, not those its prose mentions,
    and whether it takes `[overrides ...]`."""
    flags = {flag for line in OPTION_LINE.findall(text) for flag in FLAG.findall(line)}
    return flags, bool(re.search(r"\[overrides \.\.\.\]", text))


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """`python -m megavictor <verb> [sub] --help` of every verb not read in-process, all started at once."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {verb: subprocess.Popen([sys.executable, "-m", "megavictor", *verb, "--help"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for verb in VERB_FLAGS if verb[0] not in IN_PROCESS}
    out = {}
    for verb, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[verb] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def flags_of(verb: tuple[str, ...], helps: dict) -> tuple[set[str], bool]:
    if verb[0] in IN_PROCESS:
        return _in_process(verb)
    done = helps[verb]
    assert done.returncode == 0, f"megavictor {' '.join(verb)} --help failed:\n{done.stderr[-3000:]}"
    return help_flags(done.stdout)


def test_every_verb_is_pinned_and_every_pinned_verb_still_runs() -> None:
    from megavictor.benchmarks.cli import BENCHES
    from megavictor.cli import RENAMED_VERBS, VERBS

    pinned = {verb[0] for verb in VERB_FLAGS}
    assert set(VERBS) <= pinned, f"new verbs {set(VERBS) - pinned}: pin their flags in VERB_FLAGS"
    assert pinned <= set(VERBS) | set(RENAMED_VERBS), \
        f"verbs gone without an alias in megavictor.cli.RENAMED_VERBS: {pinned - set(VERBS) - set(RENAMED_VERBS)}"
    benches = {verb[1] for verb in VERB_FLAGS if verb[0] == "bench"}
    assert benches == set(BENCHES), "bench verbs added or removed: pin them (and keep the old ones)"
    assert set(BENCH_JSON_FIELDS) == set(BENCHES)


@pytest.mark.parametrize("verb", list(VERB_FLAGS), ids=" ".join)
def test_the_pinned_flags_are_accepted(verb: tuple[str, ...], helps: dict) -> None:
    flags, overrides = flags_of(verb, helps)
    missing = VERB_FLAGS[verb] - flags
    assert not missing, f"megavictor {' '.join(verb)} no longer accepts {sorted(missing)} (keep an alias)"
    if verb in TAKES_OVERRIDES:
        assert overrides, f"megavictor {' '.join(verb)} no longer takes section.key=value overrides"


def test_help_flags_are_read_from_the_help_text() -> None:
    """The parsing `helps` relies on, on a parser of known flags: aliases and long invocations count, flags the
    description or a help text mentions do not."""
    parser = argparse.ArgumentParser(prog="megavictor x", description="--described-flag N: an old flag")
    parser.add_argument("--some-flag", "--old-some-flag", metavar="VALUE")
    parser.add_argument("--a-very-long-flag-name-that-wraps", help="long invocations put the help on the next line")
    parser.add_argument("--no-thing", action="store_true", help="see --other-flag in the docs")
    parser.add_argument("overrides", nargs="*")
    flags, overrides = help_flags(parser.format_help())
    assert flags == {"--help", "--some-flag", "--old-some-flag", "--a-very-long-flag-name-that-wraps", "--no-thing"}
    assert overrides
    assert help_flags(argparse.ArgumentParser(prog="y").format_help()) == ({"--help"}, False)


# --------------------------------------------------------------------------- config keys

# Every section.key of `megavictor.config.Config` with a value it accepts (the default, or for a key whose default
# is null a valid non-null value), plus the old spellings kept as aliases.
CONFIG_KEYS: dict[str, object] = {
    "model.num_layers": 4,
    "model.hidden_size": 64,
    "model.ffn_hidden_size": 176,
    "model.num_attention_heads": 4,
    "model.num_query_groups": 2,
    "model.vocab_size": 512,
    "model.rotary_base": 10000.0,
    "model.norm_epsilon": 1e-05,
    "model.init_method_std": 0.02,
    "model.qkv_bias": False,
    "model.rope_scaling": "llama3",
    "model.rope_scaling_factor": 8.0,
    "model.rope_low_freq_factor": 1.0,
    "model.rope_high_freq_factor": 4.0,
    "model.rope_original_max_position_embeddings": 8192,
    "vision.image_size": 32,
    "vision.patch_size": 8,
    "vision.num_layers": 2,
    "vision.hidden_size": 48,
    "vision.ffn_hidden_size": 192,
    "vision.num_attention_heads": 4,
    "vision.activation": "quick_gelu",
    "vision.norm_epsilon": 1e-05,
    "vision.freeze": True,
    "vision.init_from": "vision.safetensors",
    "vision.image_grid_pinpoints": [[32, 64], [64, 32]],
    "victor.enabled": True,
    "victor.num_registers": 8,
    "victor.drop_layer": 3,
    "victor.mask": "causal",
    "peer.fastv_layer": 1,
    "peer.fastv_keep": 0.5,
    "peer.pyramid_layers": [1, 2],
    "peer.pyramid_keep": [8, 4],
    "peer.avg_pool_to": 8,
    "peer.prune": "divprune",
    "peer.prune_to": 8,
    "parallel.tp": 1,
    "parallel.pp": 1,
    "parallel.pp_split": "even",
    "parallel.sequence_parallel": False,
    "parallel.overlap_grad_reduce": True,
    "parallel.overlap_param_gather": True,
    "parallel.ddp_bucket_size": 1000000,
    "parallel.pipeline_length_buckets": [64],
    "data.path": "data/digits",
    "data.train_split": "vqa_train",
    "data.val_split": "vqa_val",
    "data.test_split": "vqa_test",
    "data.tokenizer": "tokenizer",
    "data.prompt_format": "v1",
    "data.system_prompt": "A chat between a curious user and an artificial intelligence assistant. The assistant "
                          "gives helpful, detailed, and polite answers to the user's questions.",
    "data.seq_length": 256,
    "data.text_length": 64,
    "data.micro_batch_size": 1,
    "data.num_workers": 2,
    "data.prefetch": 2,
    "data.shuffle_buffer": 256,  # deprecated and ignored, still accepted
    "data.pack_buffer": 64,
    "data.seed": 1234,
    "data.image_aspect_ratio": "pad",
    "data.min_image_side": 8,
    "data.max_image_pixels": 40000000,
    "data.verify_sha256": False,
    "train.run_dir": "runs/default",
    "train.max_steps": 10,
    "train.global_batch_size": 4,
    "train.lr": 0.001,
    "train.min_lr": 1e-05,
    "train.warmup_steps": 0,
    "train.weight_decay": 0.0,
    "train.adam_eps": 1e-08,
    "train.clip_grad": 1.0,
    "train.seed": 1234,
    "train.llava_stage": 2,
    "train.stage": 2,  # the old name of train.llava_stage
    "train.init_from": "runs/stage1",
    "train.save_interval": 0,
    "train.keep_last": 2,
    "train.max_nonfinite_steps": 3,
    "train.eval_interval": 0,
    "train.eval_batches": 4,
    "train.precision": "fp32",
    "train.grad_reduce_dtype": "fp32",
    "train.distributed_optimizer": False,
    "train.fp8": "hybrid",
    "train.fp8_recipe": "delayed",
    "train.fp8_amax_history_len": 1024,
    "train.fp8_amax_compute_algo": "max",
    "train.fp8_margin": 0,
    "train.attention_backend": "local",
    "train.recompute": "full",
    "train.recompute_method": "uniform",
    "train.recompute_num_layers": 1,
    "train.engine": "megatron",
    "train.zero_stage": 2,
    "train.gradient_checkpointing": False,
    "train.allow_config_change": False,
    "log.wandb": True,
    "log.project": "megavictor",
    "log.log_interval": 1,
}

# Settings a pinned value needs beside it to pass validation.
CONFIG_COMPANIONS: dict[str, list[str]] = {
    "peer.fastv_layer": ["victor.enabled=false"],
    "peer.pyramid_layers": ["victor.enabled=false", "peer.pyramid_keep=[8,4]"],
    "peer.pyramid_keep": ["victor.enabled=false", "peer.pyramid_layers=[1,2]"],
    "peer.avg_pool_to": ["victor.drop_layer=0"],
    "peer.prune": ["peer.prune_to=8", "victor.drop_layer=0"],
    "peer.prune_to": ["peer.prune=divprune", "victor.drop_layer=0"],
    "vision.image_grid_pinpoints": ["data.image_aspect_ratio=anyres"],
}


def current_config_keys() -> set[str]:
    from megavictor.config import Config

    return {f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())}


@pytest.mark.parametrize("key", list(CONFIG_KEYS))
def test_the_pinned_config_key_is_accepted(key: str) -> None:
    from megavictor.config import load_config

    override = f"{key}={json.dumps(CONFIG_KEYS[key])}"
    cfg = load_config(None, [*CONFIG_COMPANIONS.get(key, []), override])  # raises ConfigError on an unknown key
    section, name = key.split(".")
    if key in current_config_keys():  # under its own name the value lands where it says
        assert cfg.to_dict()[section][name] == CONFIG_KEYS[key]


def test_every_config_key_is_pinned() -> None:
    """A new key joins the pins (so that renaming or removing it later fails here too)."""
    new = current_config_keys() - set(CONFIG_KEYS)
    assert not new, f"config keys not pinned yet: {sorted(new)} (add them to CONFIG_KEYS with a valid value)"


# --------------------------------------------------------------------------- the JSON fields of `bench`

# verb -> the fields of the JSON object its last stdout line holds (it may hold more).
BENCH_JSON_FIELDS: dict[str, set[str]] = {
    "loader": {"dp", "split", "steps", "global_batch_rows", "micro_batches_per_rank", "seq_length", "visual_tokens",
               "registers", "workers", "seconds", "samples_per_rank_per_step", "samples_per_s_per_rank",
               "images_decoded_per_rank_per_step", "packing_efficiency", "unpacked_efficiency", "truncated",
               "skipped_image_too_small", "skipped_image_too_large", "skipped_too_long"},
    "train": {"victor_step_s", "baseline_step_s", "speedup", "flop_bound", "ratio_to_bound", "victor_peak_mem_mb",
              "baseline_peak_mem_mb", "text_length", "rows", "micro_batches", "repeats", "threads", "memory_method",
              "by_text_length", "peak_memory_kind", "timer", "fp8", "attention_backend", "anyres", "visual_per_image"},
    "infer": {"speedup", "speedup_128", "prefill_speedup", "decode_speedup", "flop_bound", "ratio_to_bound",
              "flop_bound_128", "victor_tokens_per_s", "baseline_tokens_per_s", "victor_tokens_per_s_128",
              "baseline_tokens_per_s_128", "batch", "prompt_text_tokens", "long_tokens", "repeats", "long_repeats",
              "threads", "source", "seconds", "anyres", "visual_per_image", "prompt_slots"},
    "serve": {"speedup", "speedup_128", "kv_blocks_ratio", "bound", "ratio_to_bound", "bound_128",
              "victor_requests_per_s", "baseline_requests_per_s", "victor_requests_per_s_128",
              "baseline_requests_per_s_128", "victor_tokens_per_s", "baseline_tokens_per_s", "victor_tokens_per_s_128",
              "baseline_tokens_per_s_128", "victor_kv_layer_blocks_per_request", "baseline_kv_layer_blocks_per_request",
              "batch", "prompt_text_tokens", "long_tokens", "repeats", "long_repeats", "threads", "kv_cache_groups",
              "seconds"},
    "pipeline": {"even_tokens_per_s", "balanced_tokens_per_s", "speedup", "predicted_speedup", "even_layers",
                 "balanced_layers", "even_step_s", "balanced_step_s", "micro_batches", "rows", "repeats",
                 "threads_per_rank", "step_times_s", "stage_cpu_s", "stage_cpu_speedup", "ratio_to_predicted"},
    # baseline/victor/no_register accuracies: when the sweep has baseline, R8_k<k> and R0_k<k> (--quick and the full)
    "accuracy": {"results", "seeds", "drop_layer", "num_layers", "quick", "baseline_accuracy", "baseline_accuracy_std",
                 "victor_accuracy", "victor_accuracy_std", "no_register_accuracy", "no_register_accuracy_std",
                 "chance", "plot", "run_dir", "recipe", "hires", "victor_minus_baseline", "victor_minus_no_register",
                 "test_questions", "jobs", "wall_s"},  # --hires adds single_view_accuracy(_std)
}

# verb -> (field holding records, the fields of each record): by text length for train, by variant for accuracy.
BENCH_RECORD_FIELDS: dict[str, tuple[str, set[str]]] = {
    "train": ("by_text_length", {
        "text_length", "victor_step_s", "baseline_step_s", "speedup", "flop_bound", "ratio_to_bound",
        "victor_peak_mem_mb", "baseline_peak_mem_mb", "victor_start_mem_mb", "baseline_start_mem_mb", "victor_gflop",
        "baseline_gflop", "victor_tokens_per_s", "baseline_tokens_per_s", "paired_speedup", "cpu_time_speedup",
        "cpu_time_ratio_to_bound", "victor_step_times_s", "baseline_step_times_s", "victor_seq_length",
        "baseline_seq_length", "victor_short_length", "attention_backend", "victor_host_peak_mem_mb",
        "baseline_host_peak_mem_mb"}),
    "accuracy": ("results", {
        "name", "method", "enabled", "num_registers", "drop_layer", "accuracy", "accuracy_std", "accuracies", "seeds",
        "chance", "tokens_per_s", "eval_s", "flops", "train_speedup", "infer_speedup", "flop_bound",
        "ratio_to_bound", "questions", "train_samples", "minus_baseline", "infer_flops", "infer_flop_bound"}),
}


def assert_pinned_json(verb: str, out: dict) -> None:
    """`out` (a `bench <verb>` JSON object) has every pinned field, and so has each of its records."""
    missing = BENCH_JSON_FIELDS[verb] - set(out)
    assert not missing, f"bench {verb} no longer prints {sorted(missing)} (keep the old field beside the new)"
    if verb in BENCH_RECORD_FIELDS:
        field, pinned = BENCH_RECORD_FIELDS[verb]
        records = out[field].values() if isinstance(out[field], dict) else out[field]
        assert records, f"bench {verb}: no records in {field}"
        for record in records:
            missing = pinned - set(record)
            assert not missing, f"bench {verb}: the records of {field} no longer have {sorted(missing)}"


def test_bench_loader_json_and_seq_length(mix_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench loader --seq-length N` sets data.seq_length; trailing overrides apply on top of the verb's own
    settings; `unpacked_efficiency` (one sample per row padded to seq_length) is in the table and the JSON."""
    from megavictor.benchmarks.cli import main

    base = ["loader", "--data", str(mix_data), "--split", "train", "--steps", "2", "--global-batch-size", "8"]
    assert main([*base, "--seq-length", "1024"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert_pinned_json("loader", out)
    assert any(line.split()[:1] == ["unpacked_efficiency"] for line in lines[:-1]), "the human table"
    assert out["seq_length"] == 1024
    # Each sample alone in a 1024-slot row wastes most of it; packed rows are nearly full.
    assert 0 < out["unpacked_efficiency"] < out["packing_efficiency"] <= 1
    assert main([*base, "--seq-length", "1024", "data.seq_length=768", "data.pack_buffer=8"]) == 0
    override = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert override["seq_length"] == 768  # the overrides come last
    # the same samples' real slots over samples x seq_length: inversely proportional to seq_length (no truncation)
    assert override["truncated"] == out["truncated"] == 0
    assert override["unpacked_efficiency"] == pytest.approx(out["unpacked_efficiency"] * 1024 / 768, abs=2e-4)


def test_every_other_bench_verb_has_its_json_checked_by_a_real_run() -> None:
    """tests/test_bench.py runs train, infer, serve, pipeline and accuracy (tiny) and checks their JSON against the
    pins."""
    source = (ROOT / "tests" / "test_bench.py").read_text()
    for verb in set(BENCH_JSON_FIELDS) - {"loader"}:
        assert f'assert_pinned_json("{verb}", ' in source, f"bench {verb}'s JSON is no longer checked"
