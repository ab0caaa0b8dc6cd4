"""Config loading, overrides and validation: every invalid setting gives one line naming its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megavictor.config import ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
LLAVA = str(ROOT / "configs" / "llava15_7b.yaml")

INVALID = [
    # (overrides, key the message must name)
    (["parallel.tp=3"], "model.num_attention_heads"),  # 32 heads % 3
    (["parallel.tp=8", "model.num_attention_heads=64", "model.ffn_hidden_size=11004"], "model.ffn_hidden_size"),
    (["parallel.pp=33"], "parallel.pp"),
    (["victor.drop_layer=32"], "victor.drop_layer"),
    (["victor.num_registers=-1"], "victor.num_registers"),
    (["victor.numregisters=4"], "victor.numregisters"),
    (["trainer.lr=1"], "trainer"),
    (["parallel.pp=2", "parallel.pp_split=[10,10]"], "parallel.pp_split"),
    (["victor.mask=sideways"], "victor.mask"),
    (["parallel.tp=two"], "parallel.tp"),
    (["parallel.sequence_parallel=true"], "parallel.tp"),  # sequence parallelism needs tp > 1
    (["parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_length=1022"], "data.seq_length"),
    (["parallel.pipeline_length_buckets=[128,64]"], "parallel.pipeline_length_buckets"),
    (["parallel.tp=4", "parallel.sequence_parallel=true", "parallel.pipeline_length_buckets=[66]"],
     "parallel.pipeline_length_buckets"),
    (["train.recompute=full", "train.recompute_method=sideways"], "train.recompute_method"),
    (["train.recompute=full", "train.recompute_num_layers=0"], "train.recompute_num_layers"),
    (["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size"),
    (["train.lr=-1"], "train.lr"),
    (["train.lr=.nan"], "train.lr"),
    (["train.save_interval=-2"], "train.save_interval"),
    (["train.warmup_steps=-5"], "train.warmup_steps"),
    (["train.eval_batches=0"], "train.eval_batches"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
    (["train.fp8_amax_compute_algo=mean"], "train.fp8_amax_compute_algo"),
    (["train.fp8_amax_history_len=0"], "train.fp8_amax_history_len"),
    (["train.precision=fp32", "train.grad_reduce_dtype=bf16"], "train.grad_reduce_dtype"),
]


@pytest.mark.parametrize("overrides,key", INVALID, ids=[k for _, k in INVALID])
def test_invalid_setting_names_its_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(LLAVA, overrides)


@pytest.mark.parametrize("overrides,key", INVALID[:6], ids=[k for _, k in INVALID[:6]])
def test_cli_prints_one_line_error(overrides: list[str], key: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "megavictor", "split", "--config", LLAVA, *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr


def test_yaml_and_overrides_round_trip(tmp_path: Path) -> None:
    cfg = load_config(LLAVA, ["victor.num_registers=16", "parallel.tp=2", "parallel.pp_split=[4,28]",
                              "parallel.pp=2", "train.fp8=null", "train.lr=3e-4"])
    assert cfg.victor.num_registers == 16 and cfg.parallel.tp == 2 and cfg.parallel.pp_split == [4, 28]
    assert cfg.model.num_layers == 32 and cfg.vision.num_visual_tokens == 576
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.fp8 is None
    # The YAML mirrors the dataclass fields: dumping and reloading gives the same config.
    import yaml

    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path).to_dict() == cfg.to_dict()


def test_world_size_must_fit_tp_times_pp() -> None:
    from megavictor.config import validate

    cfg = load_config(LLAVA, ["parallel.tp=2", "parallel.pp=2"])
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="world size 6"):
        validate(cfg, world_size=6)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["victor.num_registers"])
    with pytest.raises(ConfigError, match="must be section.key"):
        parse_overrides(["num_registers=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_train_refuses_a_bad_value_in_one_line_before_building_anything(tmp_path: Path) -> None:
    """`megavictor train` checks every numeric value before any process group, data set or model exists."""
    proc = subprocess.run([sys.executable, "-m", "megavictor", "train", "--config", LLAVA, "train.lr=-1",
                           f"train.run_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "megavictor train: error: train.lr=-1.0 must be > 0"], proc.stderr


def test_precision_and_fp8_recipe_settings_reach_megatron() -> None:
    """bf16, the FP8 recipe (Megatron-LM's H100 defaults) and the initialisation device as megatron receives them."""
    import torch

    from megavictor.model import specs

    cfg = load_config(LLAVA, ["train.fp8_margin=1", "train.fp8_recipe=tensorwise"])
    assert cfg.train.distributed_optimizer
    config = specs.language_config(cfg, [cfg.model.num_layers])
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo, config.fp8_margin) == (1024, "max", 1)
    assert config.fp8_recipe == "tensorwise" and config.bf16 and config.params_dtype == torch.bfloat16
    cuda = torch.cuda.is_available()
    assert config.use_cpu_initialization == (not cuda) and config.masked_softmax_fusion == cuda


def test_deepspeed_flash_attention_with_fp32_is_refused_in_one_line(tmp_path: Path) -> None:
    """flash-attn rejects fp32 at the first forward on the GPU; validation says so before anything starts."""
    proc = subprocess.run([sys.executable, "-m", "megavictor", "train", "--config", str(ROOT / "configs" /
                           "demo_stage2.yaml"), "train.engine=deepspeed", "train.attention_backend=flash",
                           "train.precision=fp32", f"train.run_dir={tmp_path}"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "megavictor train: error: train.attention_backend=flash with train.precision=fp32 and train.engine=deepspeed: "
        "flash-attn has no fp32 kernels; set train.precision=bf16, or train.attention_backend=local (SDPA)"], \
        proc.stderr


def test_renamed_key_keeps_its_old_spelling(capsys: pytest.CaptureFixture) -> None:
    """`train.stage` (LLaVA's training stage) is now `train.llava_stage`; the old key still works, with a notice."""
    assert load_config(None, ["train.stage=1"]).train.llava_stage == 1
    assert "train.stage is deprecated: it is now train.llava_stage" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="give only train.llava_stage"):
        load_config(None, ["train.stage=1", "train.llava_stage=2"])
