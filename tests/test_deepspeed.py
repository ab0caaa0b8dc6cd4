"""The DeepSpeed engine (`train.engine=deepspeed`) end to end.

The HF Victor model on packed rows against ReferenceVLM (loss and every gradient); the per-step losses of ZeRO-2 and
ZeRO-3 on 2 ranks against megatron tp1 pp1 dp2 from the same initial weights and batches (12 steps, the schedule of
the resume test, every one compared); SIGTERM at step >= 6 of 12 + restart under ZeRO-3 reproducing the
uninterrupted run; a ZeRO-3 checkpoint exported to HF giving the same eval JSON; a `convert from-hf` checkpoint
initialising a ZeRO-3 run and coming back out bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megavictor.config import ConfigError, load_config
from megavictor.data.collate import collate_rows, expand_sample
from megavictor.model.reference import ReferenceVLM
from tests.fixtures import packed_batches, samples, tiny_config
from tests.hf_fixtures import assert_keeps_source_tensors
from tests.runs import ROOT, STAGE2, assert_close, losses, megavictor, run, sigterm_after, train_cmd

HAS_FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def deepspeed_cmd(world: int, data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return train_cmd(world, data, run_dir, "train.engine=deepspeed", *overrides)


# --------------------------------------------------------------------------- the HF model on packed rows


def hf_twin(cfg, attention: str = "sdpa"):
    """ReferenceVLM with the layout-independent initial weights, and the engine's HF model built from them."""
    from megavictor.checkpoint.initial_weights import InitialWeights, WeightOrigin, fresh_state
    from megavictor.engines.deepspeed import build_model

    reference = ReferenceVLM(cfg)
    state = fresh_state(cfg, InitialWeights(WeightOrigin.FRESH))
    for name, param in reference.named_parameters():
        assert torch.equal(param, state[name]), name  # the engine starts where megatron's VictorVLM does
    cfg.train.attention_backend = "flash" if attention == "flash_attention_2" else "local"
    return reference, build_model(cfg, state)


def test_packed_hf_model_matches_reference_loss_and_gradients() -> None:
    """Rows packing 1-3 samples with 0-2 images each (so rows drop different numbers of slots), and a micro-batch
    without any image: per-token loss sum and every gradient of the HF model equal ReferenceVLM's."""
    from megavictor.engines.deepspeed import hf_inputs
    from megavictor.hf.convert import full_state_of, hf_named_parameters

    cfg = tiny_config(["vision.freeze=false"])  # gradients for the ViT too
    reference, model = hf_twin(cfg)
    s, v, r = samples(), cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    lay = lambda name: expand_sample(s[name], v, r)  # noqa: E731
    batches = packed_batches(cfg) + [
        collate_rows([[lay("one_image"), lay("text_only")], [lay("two_images")], [lay("text_only")]], 128),
        collate_rows([[lay("text_only"), lay("text_only")]], 128),
    ]
    trainable = [name for name, p in hf_named_parameters(model) if p.requires_grad]
    assert "model.vision_tower.vision_model.post_layernorm.weight" not in trainable  # unused by LLaVA: frozen
    for batch in batches:
        expected = reference(batch).sum()
        out = model(**hf_inputs(batch, model.config, torch.device("cpu")), num_items_in_batch=1)
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
        expected.backward()
        out.loss.backward()
        # Every trainable parameter takes part, also without images (zero gradients): ZeRO needs that.
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        grads = full_state_of(cfg, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                    for n, p in model.named_parameters()})
        for name, param in reference.named_parameters():
            ref_grad = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(grads[name], ref_grad, rtol=0, atol=1e-5 * max(ref_grad.abs().max(), 1e-3),
                                       msg=name)
        reference.zero_grad()
        model.zero_grad()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASH, reason="needs a CUDA GPU with flash-attn installed")
def test_flash_varlen_matches_sdpa_on_packed_rows() -> None:
    from megavictor.engines.deepspeed import hf_inputs

    cfg = tiny_config()
    _, sdpa = hf_twin(cfg)
    _, flash = hf_twin(tiny_config(), attention="flash_attention_2")
    device = torch.device("cuda")
    for batch in packed_batches(cfg):
        expected = sdpa.to(device, torch.bfloat16)(**hf_inputs(batch, sdpa.config, device), num_items_in_batch=1).loss
        got = flash.to(device, torch.bfloat16)(**hf_inputs(batch, flash.config, device), num_items_in_batch=1).loss
        assert float(got) == pytest.approx(float(expected), rel=2e-2)


def test_flash_backend_without_flash_attn_or_cuda_is_a_clear_error() -> None:
    if HAS_FLASH:
        pytest.skip("flash-attn and CUDA are available here")
    with pytest.raises(RuntimeError, match="train.attention_backend=flash"):
        hf_twin(tiny_config(), attention="flash_attention_2")


@pytest.mark.parametrize("overrides,key", [
    (["parallel.tp=2"], "parallel.tp"),
    (["train.zero_stage=4"], "train.zero_stage"),
    (["train.recompute=selective"], "train.recompute"),
    (["victor.enabled=false"], "victor.enabled"),
    (["train.attention_backend=te"], "train.attention_backend"),
    (["train.engine=megatron", "train.gradient_checkpointing=true"], "train.gradient_checkpointing"),
])
def test_engine_settings_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(STAGE2, ["train.engine=deepspeed", *overrides])


def test_flash_attention_needs_bf16() -> None:
    """flash-attn has no fp32 kernels: refused at validation, in one line naming the keys and the way out; bf16 and
    the null backend (chosen at start-up: SDPA on this engine) pass."""
    from megavictor.config import validate

    with pytest.raises(ConfigError) as err:
        load_config(STAGE2, ["train.engine=deepspeed", "train.attention_backend=flash", "train.precision=fp32"])
    message = str(err.value)
    assert "\n" not in message
    for part in ("train.attention_backend=flash", "train.precision=fp32", "train.engine=deepspeed",
                 "train.precision=bf16", "train.attention_backend=local"):
        assert part in message, (part, message)
    load_config(STAGE2, ["train.engine=deepspeed", "train.attention_backend=flash", "train.precision=bf16"])
    cfg = load_config(STAGE2, ["train.engine=deepspeed"])
    cfg.train.attention_backend = None
    validate(cfg)


def test_bf16_config_asks_for_fp32_gradient_accumulation_and_reduction() -> None:
    """The DeepSpeed config of a bf16 run holds fp32 gradient accumulation and fp32 communication, as DeepSpeed's
    own parser reads them; an fp32 run leaves both at DeepSpeed's defaults (they follow the fp32 model)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from megavictor.engines.deepspeed import deepspeed_config

    for stage in (2, 3):
        config = deepspeed_config(tiny_config(["train.engine=deepspeed", "train.precision=bf16",
                                               f"train.zero_stage={stage}"]), 1)
        assert config["bf16"]["enabled"] and config["zero_optimization"]["stage"] == stage
        assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
        parsed = DeepSpeedConfig(config)  # no process group here: world size 1
        assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
        assert parsed.communication_data_type == torch.float32
    fp32 = deepspeed_config(tiny_config(["train.engine=deepspeed"]), 1)
    assert not fp32["bf16"]["enabled"] and "data_types" not in fp32 and "communication_data_type" not in fp32
    # ZeRO-1 keeps DeepSpeed's bf16 gradients (fp32 ones need its BF16 optimizer, whose checkpoints zero_to_fp32
    # cannot read) and says so on building the config.
    zero1 = deepspeed_config(tiny_config(["train.engine=deepspeed", "train.precision=bf16", "train.zero_stage=1"]), 1)
    assert zero1["bf16"]["enabled"] and "data_types" not in zero1


BF16_PROBE = """
import json, sys
from megavictor.checkpoint.initial_weights import InitialWeights, WeightOrigin
from megavictor.distributed import init_distributed
from megavictor.engines.deepspeed import DeepSpeedEngine
from tests.fixtures import packed_batches, tiny_config

out = {}
for stage in (2, 3):
    cfg = tiny_config(["train.engine=deepspeed", "train.precision=bf16", f"train.zero_stage={stage}",
                       "data.micro_batch_size=1", "train.global_batch_size=2", f"train.run_dir={sys.argv[1]}/{stage}"])
    engine = DeepSpeedEngine(cfg, init_distributed(1, 1, cfg.train.seed), InitialWeights(WeightOrigin.FRESH))
    batches = packed_batches(cfg)  # two micro-batches: one accumulation
    step = engine.train_step(batches, sum(b.num_loss_tokens() for b in batches))
    out[stage] = {"params": str(next(engine.engine.module.parameters()).dtype),
                  "data_types": [str(d) for d in engine.engine.get_data_types()],
                  "communication": str(engine.engine.communication_data_type),
                  "accumulation": str(engine.optimizer.gradient_accumulation_dtype),
                  "skipped": step.skipped, "grad_norm": step.grad_norm}
print(json.dumps(out))
"""


def test_bf16_engine_accumulates_and_reduces_gradients_in_fp32(tmp_path: Path) -> None:
    """What DeepSpeed built from that config (in a fresh process: DeepSpeed's state is per process): bf16 weights,
    fp32 gradient accumulation in the ZeRO-2 and ZeRO-3 optimizers, fp32 communication; a step over two
    micro-batches applies. (Without the keys DeepSpeed 0.19 chose bf16 for both.)"""
    proc = subprocess.run([sys.executable, "-c", BF16_PROBE, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert got["params"] == "torch.bfloat16", (stage, got)
        assert got["data_types"] == ["torch.bfloat16", "torch.float32"], (stage, got)
        assert got["communication"] == got["accumulation"] == "torch.float32", (stage, got)
        assert not got["skipped"] and got["grad_norm"] > 0, (stage, got)


# --------------------------------------------------------------------------- training on 2 ranks


STEPS = ["train.max_steps=12"]  # the schedule of the resume test; the parity tests compare all 12 steps


@pytest.fixture(scope="module")
def megatron_dp2(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("megatron_dp2")
    run(train_cmd(2, digits_data, run_dir, *STEPS))
    return run_dir


@pytest.fixture(scope="module")
def zero3_run(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 uninterrupted ZeRO-3 steps on 2 ranks, with gradient checkpointing."""
    run_dir = tmp_path_factory.mktemp("zero3")
    run(deepspeed_cmd(2, digits_data, run_dir, "train.zero_stage=3", "train.gradient_checkpointing=true", *STEPS))
    return run_dir


def assert_matches_megatron(run_dir: Path, megatron_dp2: Path) -> None:
    """Same initial weights (layout-independent init), same global batches, AdamW, clipping and lr schedule: every
    per-step loss within 1e-4 relative (fp32 on CPU), every step's lr equal."""
    reference = losses(megatron_dp2)
    assert len(reference) == 12 and reference[-1] < reference[0]
    assert_close(losses(run_dir), reference, rel=1e-4)
    lrs = [[json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()]
           for d in (run_dir, megatron_dp2)]
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12) and lrs[0][-1] == pytest.approx(1e-4)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000012"


def test_zero2_losses_match_megatron_dp2(megatron_dp2: Path, digits_data: Path, tmp_path: Path) -> None:
    from megavictor.checkpoint import load_full_state
    from megavictor.commands.convert import main as convert
    from megavictor.hf.convert import full_state_of, read_safetensors

    summary = run(deepspeed_cmd(2, digits_data, tmp_path, "train.zero_stage=2", *STEPS))
    assert summary["final_step"] == 12 and summary["val_loss"] is not None
    assert_matches_megatron(tmp_path, megatron_dp2)
    # ZeRO-2 shards are views into flat buffers: the export must still write every tensor, as gathered.
    assert convert(["to-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 0
    cfg, gathered = load_full_state(tmp_path)
    exported = full_state_of(cfg, read_safetensors(tmp_path / "hf"))
    assert all(torch.equal(exported[name], tensor) for name, tensor in gathered.items())


def test_zero3_losses_match_megatron_dp2(megatron_dp2: Path, zero3_run: Path) -> None:
    assert_matches_megatron(zero3_run, megatron_dp2)


def test_zero3_sigterm_then_restart_resumes_exactly(zero3_run: Path, digits_data: Path, tmp_path: Path) -> None:
    """The run starts from its own step-0 checkpoint (`train.max_steps=0` first), is stopped at step 6 and restarted:
    the uninterrupted run's losses. (A step-0 checkpoint's lr schedule decays over 0 steps; the resumed run took it
    over, and its losses left the fresh run's from step 4. It keeps the config's schedule now.)"""
    zero3 = ("train.zero_stage=3", "train.gradient_checkpointing=true")
    assert run(deepspeed_cmd(2, digits_data, tmp_path, *zero3, "train.max_steps=0"))["final_step"] == 0
    cmd = deepspeed_cmd(2, digits_data, tmp_path, *zero3, *STEPS)
    # Every rank gets the signal, as from SLURM (`megavictor launch`). (torchrun, signalled itself, forwards it to
    # the ranks, which save the same way, but then exits 1 from its agent's SignalException.)
    sigterm_after(cmd, tmp_path, 6, 12, ranks=True)

    resumed = run(cmd)
    assert resumed["final_step"] == 12
    assert_close(losses(tmp_path), losses(zero3_run), rel=1e-6)


def test_zero3_checkpoint_exports_to_hf_with_the_same_accuracy(zero3_run: Path, digits_data: Path,
                                                              tmp_path: Path) -> None:
    """ZeRO-3 shards gathered by `convert to-hf`; `eval --checkpoint` (the DeepSpeed run) and `eval --hf` (the
    export, through transformers' generate with the KV cache) give the same JSON."""
    megavictor("convert", "to-hf", "--checkpoint", zero3_run, "--out", tmp_path / "hf")
    common = ["--data", digits_data, "--split", "test", "--limit", "64"]
    before = json.loads(megavictor("eval", "--checkpoint", zero3_run, *common).strip().splitlines()[-1])
    after = json.loads(megavictor("eval", "--hf", tmp_path / "hf", *common).strip().splitlines()[-1])
    assert before["n"] == 64 and before["accuracy"] > 0
    assert after == before


def test_from_hf_initialises_a_zero3_run(sources: dict[str, Path], digits_data: Path,
                                         tmp_path: Path) -> None:
    """HF Llama + CLIP -> `convert from-hf` (a megatron checkpoint) -> `train.init_from` of a ZeRO-3 run (frozen
    ViT, nothing trained) -> `convert to-hf`: every source tensor comes back bit for bit."""
    from megavictor.checkpoint import engine_of, read_config, resolve
    from megavictor.commands.convert import main as convert
    from megavictor.hf.convert import read_safetensors

    imported = tmp_path / "imported"
    assert convert(["from-hf", "--llm", str(sources["llm"]), "--vision", str(sources["clip"]),
                    "--out", str(imported)]) == 0
    shapes = {k: v for k, v in read_config(imported).to_dict().items() if k in ("model", "vision", "victor")}
    recipe = tmp_path / "tiny_hf.yaml"
    shapes["data"] = {k: v for k, v in yaml.safe_load(Path(STAGE2).read_text())["data"].items()
                      if k in ("prompt_format", "system_prompt")}  # what the data set's length index was built for
    recipe.write_text(yaml.safe_dump(shapes))
    run_dir = tmp_path / "zero3"
    cmd = deepspeed_cmd(1, digits_data, run_dir, f"train.init_from={imported}", "train.max_steps=0",
                        "train.zero_stage=3")
    cmd[cmd.index(STAGE2)] = str(recipe)
    run(cmd)
    assert engine_of(resolve(run_dir)) == "deepspeed"
    assert convert(["to-hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"),
                    "--tokenizer", str(sources["llm"])]) == 0  # gathers the ZeRO-3 shards without a process group
    assert_keeps_source_tensors(read_safetensors(tmp_path / "hf"), sources, victor_on=True, whole_vit=True)


def test_deepspeed_run_refuses_to_resume_a_megatron_run(megatron_dp2: Path, digits_data: Path) -> None:
    """Checked before any model is built: the checkpoints of the two engines are not interchangeable for resuming."""
    cmd = [sys.executable, "-m", "megavictor", "train", "--config", STAGE2, f"data.path={digits_data}",
           f"train.run_dir={megatron_dp2}", "train.engine=deepspeed", "data.seq_length=128", "log.wandb=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "train.engine" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
