"""Serving Victor exports with stock vLLM through megavictor's plugin (megavictor/serving), on vLLM's CPU build.

Tiny random LLaVAs (Llama, Mistral and Qwen2 decoders; 32-dim heads, the CPU attention's smallest) are converted
here to Victor exports and a baseline export; vLLM runs them in the serving venv (`python -m
megavictor.serving.venv`, built by .ci/run; these tests skip with the reason when it is absent), in its
multi-process engine, and its greedy tokens must equal HF `generate`'s on the same export, for a batch of mixed
requests (one image, two images, text only, image first, image last). Nothing is mocked: the engines, the scheduler
and `vllm serve` are vLLM's own.
"""

from __future__ import annotations

import base64
import json
import math
import random
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from launch.rendezvous import PORT_RANGE
from megavictor.hf.convert import complete_state, config_from_sections, from_hf_llava, source_of, to_hf
from megavictor.serving import venv as serving_venv
from tests.hf_fixtures import CLIP_LAYERS, build_sources, image, png, randomise

PAYLOAD = Path(__file__).with_name("serving_payload.py")
TEXT = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=4096, tie_word_embeddings=False)
FAMILIES: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
# name -> (family, registers, drop layer); R=None is the baseline export (stock LLaVA).
EXPORTS: dict[str, tuple[str, int | None, int]] = {
    "llama": ("llama", 4, 2), "llama_r0": ("llama", 0, 2), "mistral": ("mistral", 4, 1), "qwen2": ("qwen2", 4, 3),
    "baseline": ("llama", None, 0)}


def serving_python() -> Path:
    python = serving_venv.ready()
    if python is None:
        pytest.skip(f"no serving venv at {serving_venv.venv_root()}: build it with `python -m megavictor.serving.venv`"
                    " (.ci/run does)")
    return python


def llava(family: str, tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A tiny random llava-hf model dir (its tokenizer and processor beside it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text = FAMILIES[family](vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **TEXT)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=CLIP_LAYERS,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=40)
    model = LlavaForConditionalGeneration(LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, image_seq_length=16, tie_word_embeddings=False))
    randomise(model, seed)
    model.save_pretrained(out)
    LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer,
                   patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(out)
    return out


def export(source: Path, out: Path, registers: int | None, drop_layer: int) -> Path:
    """`convert from-hf --llava` then `convert to-hf` (as functions): a Victor export with random registers (large
    enough to matter), or the baseline."""
    overrides = ["log.wandb=false"] + (["victor.enabled=false"] if registers is None else
                                       [f"victor.num_registers={registers}", f"victor.drop_layer={drop_layer}"])
    sections, state = from_hf_llava(source)
    cfg = config_from_sections(sections, None, overrides)
    state = complete_state(cfg, state)
    generator = torch.Generator().manual_seed(11)
    for name in [n for n in state if "registers" in n]:
        state[name] = torch.randn(state[name].shape, generator=generator) * 0.5
    config, tail = source_of(llava_dir=source)
    return to_hf(cfg, state, out, tokenizer_dir=source, source=config, vision_tail=tail)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    serving_python()
    root = tmp_path_factory.mktemp("serving")
    tokenizer_dir = build_sources(root / "sources")["llm"]
    sources = {family: llava(family, tokenizer_dir, root / f"llava_{family}", seed)
               for seed, family in enumerate(FAMILIES)}
    return {name: export(sources[family], root / name, registers, k)
            for name, (family, registers, k) in EXPORTS.items()}


def payload(*args: str, **env: str) -> Any:
    """Run tests/serving_payload.py in the serving venv; its RESULT line, parsed."""
    run = subprocess.run([str(serving_python()), str(PAYLOAD), *args], capture_output=True, text=True, timeout=600,
                         env=serving_venv.clean_env(**env))
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and result, (run.stdout + run.stderr)[-4000:]
    return json.loads(result[-1][len("RESULT "):])


# Engine options per case; every case also runs in vLLM's default multi-process engine.
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    # vLLM's defaults: prefix caching on, chunked prefill on. The batch runs twice, so the second could hit the cache.
    "llama_defaults_prefix_caching": ("llama", {}, 2),
    # A token budget smaller than one image (16 visual tokens), and 8 KV blocks where a request needs 6: preemption.
    "chunked_prefill_preemption": ("llama", {"enable_chunked_prefill": True, "max_num_batched_tokens": 8,
                                             "num_gpu_blocks_override": 8, "max_num_seqs": 4, "max_model_len": 96},
                                   1),
    # Async scheduling (VictorAsyncScheduler) too.
    "no_registers": ("llama_r0", {"async_scheduling": True}, 1),
    "mistral": ("mistral", {}, 1),
    "qwen2": ("qwen2", {}, 1),
    # Stock LLaVA compiles with torch.compile by default on CPU (a minute here); eager like Victor.
    "baseline_as_stock_llava": ("baseline", {"enable_prefix_caching": True, "enforce_eager": True}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_tokens_equal_hf_generate(case: str, exports: dict[str, Path]) -> None:
    name, engine, rounds = CASES[case]
    got = payload("generate", json.dumps({"export": str(exports[name]), "engine": engine, "rounds": rounds,
                                          "stock": name == "baseline"}))
    for tokens in got["rounds"]:
        assert tokens == got["hf"]
    assert got["hf"][0] != got["hf"][5]  # the same text with another image: the images reach the output
    if case == "chunked_prefill_preemption":
        assert got["preemptions"] >= 1
    if case == "llama_defaults_prefix_caching":
        assert got["prefix_cache_hits"] == 0  # a Victor model never starts from cached blocks (short_cache.py)
    if case == "baseline_as_stock_llava":
        assert got["prefix_cache_hits"] > 0  # the same prompts do hit in a stock model: the check above can fail


def test_short_group_allocates_blocks_for_short_tokens_only(exports: dict[str, Path]) -> None:
    """After every engine step, each running request holds ceil(tokens / block) blocks in the full group (layers < k)
    and ceil(non-visual tokens / block) in the short group (layers >= k)."""
    seen = payload("blocks", str(exports["llama"]), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert len(seen) > 100
    for state in seen:
        size = state["block_size"]
        assert state["blocks"] == {"FullAttentionManager": math.ceil(state["tokens"] / size),
                                   "VictorShortManager": math.ceil((state["tokens"] - state["visual"]) / size)}
    assert any(s["blocks"]["VictorShortManager"] < s["blocks"]["FullAttentionManager"] for s in seen)
    assert max(s["blocks"]["VictorShortManager"] for s in seen) > 1


def unused_port() -> int:
    """A free port in the launcher's rendezvous range, below Linux's ephemeral range (32768-60999), where no
    process's client socket (the parallel tests' gloo connections make many) can take it between this check and the
    server's bind."""
    while True:
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def test_vllm_serve_chat_completion_over_http(exports: dict[str, Path], tmp_path: Path) -> None:
    """`vllm serve EXPORT --trust-remote-code` on 127.0.0.1; an OpenAI chat completion with an image gives HF
    `generate`'s tokens for the same turn through the export's chat template."""
    python = serving_python()
    picture = tmp_path / "image.png"
    picture.write_bytes(png(image(21)))
    port = unused_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(python.parent / "vllm"), "serve", str(exports["llama"]), "--trust-remote-code",
                               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
                               "--block-size", "32", "--dtype", "float32"],
                              stdout=log, stderr=subprocess.STDOUT, env=serving_venv.clean_env())
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(1)
        url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        body = {"model": str(exports["llama"]), "temperature": 0, "max_tokens": 12, "min_tokens": 12,
                "ignore_eos": True, "return_token_ids": True,
                # The chat template leaves BOS to the tokenizer, as llava-hf's do; vLLM's chat path adds none.
                "add_special_tokens": True,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what digit is this ?"}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    expected = payload("chat", str(exports["llama"]), str(picture), "what digit is this ?", "12")
    assert reply["choices"][0]["token_ids"] == expected


def test_refuses_what_it_cannot_serve(exports: dict[str, Path]) -> None:
    """The hybrid KV cache manager switched off (layers >= k would share the long cache): no engine, and the error
    (vLLM's config validation error) names the flag to remove."""
    run = subprocess.run([str(serving_python()), "-c",
                          "from vllm import LLM; LLM(model=__import__('sys').argv[1], trust_remote_code=True, "
                          "disable_hybrid_kv_cache_manager=True)", str(exports["llama"])],
                         capture_output=True, text=True, timeout=600, env=serving_venv.clean_env())
    assert run.returncode != 0
    assert "Victor models need vLLM's hybrid KV cache manager" in run.stderr


def test_refuses_a_victor_llava_next_export(tmp_path: Path) -> None:
    """A Victor LLaVA-NeXT export (anyres images), which the plugin does not serve: no engine, and the error names the
    export class and what to run instead. Without the plugin's refusal vLLM would take it to its Transformers backend
    (measured: "Resolved architecture: TransformersMultiModalForCausalLM"), which knows nothing of the drop."""
    from megavictor.model.reference import ReferenceVLM
    from tests.fixtures import ANYRES, tiny_config

    cfg = tiny_config(ANYRES)
    out = to_hf(cfg, ReferenceVLM(cfg).state_dict(), tmp_path / "victor_next")
    run = subprocess.run([str(serving_python()), "-c", "from vllm import LLM; LLM(model=__import__('sys').argv[1], "
                          "trust_remote_code=True)", str(out)],
                         capture_output=True, text=True, timeout=600, env=serving_venv.clean_env())
    assert run.returncode != 0
    assert "Resolved architecture: VictorLlavaNextForConditionalGeneration" in run.stdout + run.stderr  # vLLM's log
    assert ("megavictor's vLLM plugin does not serve VictorLlavaNextForConditionalGeneration (LLaVA-NeXT anyres images)"
            in run.stderr)
