"""What an export promises beyond the weights: the same loss as megavictor's, the tokenizer it was trained with, and
a model that runs where megavictor is not installed, with the newest transformers 5 and with 4.57; LLaVA-NeXT (anyres)
through `convert` both ways.

Tiny random models built here; nothing downloaded. The clean venvs (`tests.hf_clean_venvs`) are built by `.ci/run`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
)

from megavictor.checkpoint import resolve
from megavictor.checkpoint.hf_source import files_sha256, tokenizer_files
from megavictor.cli import main as megavictor_main
from megavictor.config import LLAVA_V1_SYSTEM_PROMPT
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample
from megavictor.data.tokenizer import render
from megavictor.hf.convert import (
    complete_state,
    config_from_sections,
    current_llava_name,
    from_hf_llava,
    read_safetensors,
    source_of,
    to_hf,
)
from megavictor.model.batch import KIND_REGISTER, KIND_VISUAL
from megavictor.model.reference import ReferenceVLM
from megavictor.vqa import Question, hf_prompt
from tests import hf_clean_venvs
from tests.fixtures import tiny_config
from tests.hf_fixtures import (
    ANYRES,
    ANYRES_PINPOINTS,
    CLIP_LAYERS,
    PROMPTS,
    anyres_pictures,
    check_next_export,
    image,
    next_text,
    png,
    randomise,
    save_llava_next,
)
from tests.runs import ROOT


@pytest.mark.parametrize("registers", [0, 1, 8])
def test_hf_loss_equals_megavictor_loss(registers: int, tmp_path: Path) -> None:
    """`labels=` on the exported model gives megavictor's training loss (per-token mean over the same targets).

    Every text token is a target, also the first one after each image: megavictor predicts it from the image's last
    register slot, or with R=0 from nothing (the last visual slot is dropped), never from the text before the image.
    """
    cfg = tiny_config([f"victor.num_registers={registers}"])
    reference = ReferenceVLM(cfg).eval()
    g = torch.Generator().manual_seed(registers)
    with torch.no_grad():
        for p in reference.parameters():  # weights that make every token's loss differ
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model = AutoModelForImageTextToText.from_pretrained(to_hf(cfg, reference.state_dict(), tmp_path / "hf"),
                                                        trust_remote_code=True).eval()
    images = [torch.randn(3, 32, 32, generator=g) for _ in range(2)]
    tokens = [5, 6, 7, IMAGE_PLACEHOLDER, 8, 9, 10, 11, IMAGE_PLACEHOLDER, 12, 13, 14]
    sample = Sample(tokens, [i > 0 for i in range(len(tokens))], images)
    laid = expand_sample(sample, cfg.vision.num_visual_tokens, cfg.victor.registers_per_image)
    batch = collate_rows([[laid]], len(laid))
    with torch.no_grad():
        expected = reference(batch).sum() / (batch.labels >= 0).sum()

    config = model.config
    ids = torch.tensor([[config.image_token_id if k == KIND_VISUAL else config.register_token_id
                         if k == KIND_REGISTER else t for t, k in zip(laid.tokens, laid.kinds)]])
    trainable_text = torch.tensor([[k not in (KIND_VISUAL, KIND_REGISTER) for k in laid.kinds]])
    labels = ids.masked_fill(~trainable_text, -100)
    labels[0, 0] = -100
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=torch.stack(images), labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The same targets: R > 0 scores the first token after each image, R = 0 cannot.
    assert int((batch.labels >= 0).sum()) == len(tokens) - 1 - 2 - 2 * (registers == 0)


def convert(*args: str | Path) -> int:
    """`megavictor convert ...` in this process, from the repository root (where `data/digits` may lie)."""
    return megavictor_main(["convert", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_llava(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock `LlavaForConditionalGeneration` dir in llava-hf's conventions (the whole 3-layer CLIP with
    `post_layernorm` and `projection_dim`, `vision_feature_layer=-2`, a 4096-token context), random weights, with
    its tokenizer and processor."""
    out = tmp_path_factory.mktemp("tiny_llava")
    tokenizer = AutoTokenizer.from_pretrained(str(sources["llm"]))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=CLIP_LAYERS,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=40)
    model = LlavaForConditionalGeneration(LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, image_seq_length=16, tie_word_embeddings=False))
    randomise(model, 3)
    model.save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(images, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(out)
    return out


def test_to_hf_ships_the_tokenizer_from_hf_recorded(tiny_llava: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A LLaVA dir with its tokenizer -> `from-hf --llava` -> `to-hf` without `--tokenizer`, run from the repo root:
    the export carries the source's tokenizer (same files, same `<image>` id), not one found in the working dir;
    and the source's conventions: the whole ViT, `vision_feature_layer`, context length, `projection_dim`. As a
    stock LLaVA (no registers) it computes the source's logits."""
    monkeypatch.chdir(ROOT)
    llava = tiny_llava
    assert convert("from-hf", "--llava", llava, "--out", tmp_path / "ckpt", "log.wandb=false",
                   "victor.enabled=false") == 0
    recorded = json.loads((resolve(tmp_path / "ckpt") / "hf_source" / "provenance.json").read_text())["tokenizer"]
    assert recorded == {"path": str(llava.resolve()), "sha256": files_sha256(tokenizer_files(llava))}

    assert convert("to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf") == 0
    source_vocab = json.loads((llava / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["vocab"] == source_vocab
    config, source = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", llava))
    assert config["image_token_index"] == source["image_token_index"]
    assert config["vision_feature_layer"] == -2 and config["text_config"]["max_position_embeddings"] == 4096
    assert config["vision_config"]["num_hidden_layers"] == CLIP_LAYERS
    assert config["vision_config"]["projection_dim"] == 40
    exported = read_safetensors(tmp_path / "hf")
    original = {current_llava_name(n): t for n, t in read_safetensors(llava).items()}  # 4.x saves legacy names
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())

    model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    inputs = processor(images=[image(4)], text=PROMPTS["one"], return_tensors="pt")
    with torch.no_grad():
        got = model.eval()(**inputs).logits
        expected = LlavaForConditionalGeneration.from_pretrained(llava).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_to_hf_without_a_recorded_tokenizer_stops_with_one_line(sources: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)
    bare = tmp_path / "llm"  # the LLM's weights and config, no tokenizer files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(sources["llm"] / name, bare / name)
    assert convert("from-hf", "--llm", bare, "--vision", sources["clip"], "--out", tmp_path / "ckpt",
                   "log.wandb=false") == 0
    capsys.readouterr()
    assert convert("to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no tokenizer" in err[0] and "--tokenizer" in err[0], err
    assert not (tmp_path / "hf").exists()


VENV_SCRIPT = """
import importlib.util, json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
assert importlib.util.find_spec("megavictor") is None, "megavictor must not be importable here"
results = []
for model_dir, image_paths, prompt in json.loads(sys.argv[1]):
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    inputs = processor(images=[Image.open(path) for path in image_paths], text=prompt, return_tensors="pt")
    sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    results.append({"class": type(model).__name__, "input_ids": inputs["input_ids"].tolist(),
                    "sequences": sequences.tolist(), "loss": float(loss)})
print(json.dumps(results))
"""


def victor_export(llava: Path, out: Path, registers: int = 8, overrides: tuple[str, ...] = ()) -> Path:
    """The LLaVA at `llava` converted to a Victor model (R registers, fresh; k=3; `overrides`, e.g. anyres images)
    and exported with its tokenizer and conventions."""
    sections, state = from_hf_llava(llava)
    cfg = config_from_sections(sections, None, ["log.wandb=false", f"victor.num_registers={registers}",
                                                *overrides])
    config, tail = source_of(llava_dir=llava)
    return to_hf(cfg, complete_state(cfg, state), out, tokenizer_dir=llava, source=config, vision_tail=tail)


@pytest.fixture(scope="module")
def victor_from_llava(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return victor_export(tiny_llava, tmp_path_factory.mktemp("victor_from_llava"))


@pytest.fixture(scope="module")
def victor_next_from_llava(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with anyres images: a Victor LLaVA-NeXT (`image_newline` fresh)."""
    return victor_export(tiny_llava, tmp_path_factory.mktemp("victor_next_from_llava"), overrides=tuple(ANYRES))


def test_victor_export_without_registers_loads_every_weight(tiny_llava: Path, tmp_path: Path) -> None:
    """R=0: no `model.registers` parameter to report as newly initialized."""
    _, info = AutoModelForImageTextToText.from_pretrained(victor_export(tiny_llava, tmp_path, registers=0),
                                                          trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info


def clean_python(version: str) -> Path:
    """The clean venv's python for transformers `version`; the test skips, saying how to build it, without one."""
    python = hf_clean_venvs.ready(version)
    if python is None:
        pytest.skip(f"no clean venv with transformers {version} under {hf_clean_venvs.cache_dir()}: build it with "
                    "`python -m tests.hf_clean_venvs` (.ci/run does)")
    return python


@pytest.mark.parametrize("version", hf_clean_venvs.TRANSFORMERS)
def test_export_runs_in_a_clean_venv(version: str, victor_from_llava: Path, victor_next_from_llava: Path,
                                     tmp_path: Path) -> None:
    """Processor, `generate` and `labels=` loss of the Victor LLaVA and Victor LLaVA-NeXT (images of three grids)
    exports in a venv with only torch + transformers `version`: the same ids, tokens and loss as here."""
    python = clean_python(version)
    jobs = []
    for export, pictures, prompt in ((victor_from_llava, [image(12)], PROMPTS["one"]),
                                     (victor_next_from_llava, anyres_pictures(90), PROMPTS["three"])):
        paths = [tmp_path / f"{export.name}_{i}.png" for i in range(len(pictures))]
        for path, picture in zip(paths, pictures):
            path.write_bytes(png(picture))
        jobs.append((str(export), list(map(str, paths)), prompt))
    run = subprocess.run([str(python), "-c", VENV_SCRIPT, json.dumps(jobs)], cwd=tmp_path,
                         env=hf_clean_venvs.clean_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [got["class"] for got in results] == ["VictorLlavaForConditionalGeneration",
                                                 "VictorLlavaNextForConditionalGeneration"]
    for (export, paths, prompt), got in zip(jobs, results):
        model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
        inputs = processor(images=[Image.open(path) for path in paths], text=prompt, return_tensors="pt")
        with torch.no_grad():
            sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            loss = float(model(**inputs, labels=inputs["input_ids"]).loss)
        assert got["input_ids"] == inputs["input_ids"].tolist()
        assert got["sequences"] == sequences.tolist() and sequences.shape[1] == inputs["input_ids"].shape[1] + 8
        assert got["loss"] == pytest.approx(loss, abs=1e-5)


def test_chat_template_renders_the_training_prompt(victor_from_llava: Path) -> None:
    """The exported processor's chat template gives exactly megavictor's v1 text (system prompt included), for a
    whole conversation and for a generation prompt, as `eval --hf` renders it."""
    processor = AutoProcessor.from_pretrained(victor_from_llava, trust_remote_code=True)
    eos = processor.tokenizer.eos_token
    turns = [{"from": "human", "value": "<image>\nwhat digit is this ?"}, {"from": "gpt", "value": "a seven"}]
    text, spans = render(turns, "v1", eos, LLAVA_V1_SYSTEM_PROMPT)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat digit is this ?"}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": "a seven"}]}
    assert processor.apply_chat_template([user, assistant]) == text
    question = Question("k", "", Sample([], [], []), "a seven", text[:spans[0][0]].rstrip(" "), turns[0]["value"], [])
    assert hf_prompt(processor, question) == question.prompt_text


# --------------------------------------------------------------------------- LLaVA-NeXT (anyres)


def test_llava_next_through_convert_keeps_every_tensor(sources: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A LLaVA-NeXT in llava-hf v1.6's layout (legacy names, a top-level `image_newline`; tokenizer and processor)
    -> `convert from-hf --llava` -> `convert to-hf`: a stock LLaVA-NeXT with the source's grids and every tensor of
    the source bit for bit, whose processor gives the source processor's ids and pixels and whose logits are the
    source's."""
    monkeypatch.chdir(ROOT)
    source_dir = tmp_path / "next"
    tokenizer = AutoTokenizer.from_pretrained(str(sources["llm"]))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    source = save_llava_next(source_dir, text, image_id, seed=5)
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=ANYRES_PINPOINTS)
    LlavaNextProcessor(images, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(source_dir)
    assert convert("from-hf", "--llava", source_dir, "--out", tmp_path / "ckpt", "log.wandb=false",
                   "victor.enabled=false") == 0
    assert convert("to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf") == 0

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == ANYRES_PINPOINTS and config["vision_feature_layer"] == -2
    exported = read_safetensors(tmp_path / "hf")
    original = {current_llava_name(n): t for n, t in read_safetensors(source_dir).items()}
    assert "model.image_newline" in original and exported.keys() == original.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())

    model, info = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    pictures = anyres_pictures(50)
    inputs, expected = (AutoProcessor.from_pretrained(d)(images=pictures, text=PROMPTS["three"], return_tensors="pt")
                        for d in (tmp_path / "hf", source_dir))
    assert all(torch.equal(inputs[key], expected[key]) for key in ("input_ids", "pixel_values", "image_sizes"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, source(**inputs).logits, atol=1e-5, rtol=0)


def test_from_hf_refuses_a_mistral_sliding_window_with_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """A window shorter than the context changes attention past it, which megavictor does not implement: the
    config alone is refused, before any weight is read."""
    text = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         sliding_window=1024)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=CLIP_LAYERS,
                              num_attention_heads=4, image_size=32, patch_size=8)
    LlavaNextConfig(text_config=text, vision_config=vision, image_grid_pinpoints=ANYRES_PINPOINTS).save_pretrained(
        tmp_path / "next")
    assert convert("from-hf", "--llava", tmp_path / "next", "--out", tmp_path / "ckpt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sliding_window=1024" in err[0] and "max_position_embeddings=4096" in err[0], err
    assert not (tmp_path / "ckpt").exists()


NEXT_VENV_SCRIPT = """
import importlib.util, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
assert importlib.util.find_spec("megavictor") is None, "megavictor must not be importable here"
model_dir, text, out, *images = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
processor = AutoProcessor.from_pretrained(model_dir)
inputs = processor(images=[Image.open(path) for path in images], text=text, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({**{key: inputs[key] for key in ("input_ids", "pixel_values", "image_sizes")}, "logits": logits}, out)
print(type(model).__name__)
"""


@pytest.fixture(scope="module")
def next_from_llava(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stock LLaVA-1.5 at `tiny_llava` imported into an anyres baseline (`image_newline` fresh) and exported
    with its tokenizer and conventions, and the ReferenceVLM twin of what was exported."""
    sections, state = from_hf_llava(tiny_llava)
    cfg = config_from_sections(sections, None, ["log.wandb=false", "victor.enabled=false", *ANYRES])
    state = complete_state(cfg, state)
    config, tail = source_of(llava_dir=tiny_llava)
    out = to_hf(cfg, state, tmp_path_factory.mktemp("next_from_llava"), tokenizer_dir=tiny_llava, source=config,
                vision_tail=tail)
    reference = ReferenceVLM(cfg).eval()
    reference.load_state_dict(state)
    return {"cfg": cfg, "dir": out, "reference": reference}


# A stock export has no code of its own, so the transformers here (5.25) runs it as a clean venv's would.
@pytest.mark.parametrize("version", [v for v in hf_clean_venvs.TRANSFORMERS if v != "5.25.0"])
def test_next_export_runs_in_a_clean_venv(version: str, next_from_llava: dict, tmp_path: Path) -> None:
    """The stock LLaVA-NeXT export's processor and model in a venv with only torch + transformers `version`:
    training's ids, pixels and sizes, and ReferenceVLM's logits (`check_next_export`, 1e-5)."""
    python = clean_python(version)
    pictures = anyres_pictures(60)
    paths = [tmp_path / f"image{i}.png" for i in range(len(pictures))]
    for path, picture in zip(paths, pictures):
        path.write_bytes(png(picture))
    model_dir = next_from_llava["dir"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    run = subprocess.run([str(python), "-c", NEXT_VENV_SCRIPT, str(model_dir), next_text(tokenizer),
                          str(tmp_path / "out.pt"), *map(str, paths)],
                         cwd=tmp_path, env=hf_clean_venvs.clean_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["LlavaNextForConditionalGeneration"]
    outputs = torch.load(tmp_path / "out.pt")
    image_id = json.loads((model_dir / "config.json").read_text())["image_token_index"]
    check_next_export(next_from_llava["cfg"], next_from_llava["reference"], tokenizer, pictures, outputs, image_id)
