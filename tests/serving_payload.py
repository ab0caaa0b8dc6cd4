"""Run inside the serving venv (`megavictor.serving.venv`) by tests/test_serving.py: vLLM and HF `generate` on the
same exports, results as one JSON line on stdout, after "RESULT ".

    python serving_payload.py generate CASE_JSON    # HF's and vLLM's greedy tokens for the mixed prompts
    python serving_payload.py blocks EXPORT          # KV blocks per request and group, in an in-process engine
    python serving_payload.py chat EXPORT IMAGE TEXT STEPS   # HF's greedy tokens for one chat turn

Imports only what the venv has (vLLM, its transformers, torch, PIL): megavictor's plugin reaches vLLM through its
entry point, as for a user.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from PIL import Image

STEPS = 12


def image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


# One image, two images, text only, image first, image last; the last repeats the first with another image, so that
# the comparison shows the images reach the output.
PROMPTS: list[tuple[str, list[Image.Image]]] = [
    ("USER: <image>\nwhat digit is this ? ASSISTANT:", [image(1)]),
    ("USER: <image> and <image>\nwhich one is bigger ? ASSISTANT:", [image(2), image(3, (60, 30))]),
    ("USER: hello there ASSISTANT:", []),
    ("<image>\nUSER: what is this ? ASSISTANT:", [image(4, (30, 70))]),
    ("USER: what is this ? ASSISTANT: <image>", [image(5)]),
    ("USER: <image>\nwhat digit is this ? ASSISTANT:", [image(6)]),
]


def hf_tokens(export: str) -> list[list[int]]:
    """HF `generate`'s greedy tokens for every prompt (the export's remote code, or transformers' LLaVA)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    tokens = []
    for text, images in PROMPTS:
        inputs = processor(images=images or None, text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        tokens.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return tokens


def vllm_tokens(export: str, engine: dict[str, Any], rounds: int, stock: bool) -> dict[str, Any]:
    """vLLM's greedy tokens for every prompt, all in one batch (`rounds` batches one after another: the later ones
    could hit the prefix cache), the engine's preemptions and its prefix cache hits (in tokens)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=export, trust_remote_code=True, **{"max_model_len": 512, "block_size": 32, "dtype": "float32",
                                                        "disable_log_stats": False, **engine})
    allowed = None
    if stock:  # stock LLaVA in vLLM does not apply the export's suppressed image token; HF's `generate` does
        config = llm.llm_engine.model_config.hf_config
        allowed = [t for t in range(config.text_config.vocab_size) if t != config.image_token_index]
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, ignore_eos=True,
                            allowed_token_ids=allowed)
    requests = [{"prompt": t, "multi_modal_data": {"image": i}} if i else {"prompt": t} for t, i in PROMPTS]
    results = [[list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
               for _ in range(rounds)]
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return {"rounds": results, "preemptions": metrics["vllm:num_preemptions"],
            "prefix_cache_hits": metrics.get("vllm:prefix_cache_hits", 0)}


def generate(case: dict[str, Any]) -> dict[str, Any]:
    """One engine per process: vLLM does not start a second engine reliably in a process that ran one."""
    return {"hf": hf_tokens(case["export"]),
            **vllm_tokens(case["export"], case.get("engine", {}), case.get("rounds", 1), case.get("stock", False))}


def blocks(export: str) -> list[dict[str, Any]]:
    """Prefill and decode the prompts (48 new tokens each) in an in-process engine
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`); after every step, each running request's computed and visual tokens and
    the blocks each KV cache group holds for it."""
    from vllm import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs(model=export, trust_remote_code=True, max_model_len=512,
                                                   block_size=32, dtype="float32"))
    params = SamplingParams(temperature=0, max_tokens=48, min_tokens=48, ignore_eos=True)
    for i, (text, images) in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt": text, "multi_modal_data": {"image": images}} if images
                           else {"prompt": text}, params)
    scheduler = engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    image_token = engine.model_config.hf_config.image_token_index
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        for request in scheduler.running:
            tokens = request.all_token_ids[:request.num_computed_tokens]
            seen.append({"tokens": len(tokens), "visual": sum(t == image_token for t in tokens),
                         "blocks": {type(m).__name__: len(m.req_to_blocks.get(request.request_id, ())) for m in managers},
                         "block_size": managers[0].block_size})
    return seen


def chat(export: str, picture: str, text: str, steps: int) -> list[int]:
    """HF `generate`'s greedy tokens for one user turn (an image, then `text`) through the export's chat template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    inputs = processor(images=[Image.open(picture)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def main(argv: list[str]) -> int:
    verb = argv[0]
    if verb == "generate":
        result: Any = generate(json.loads(argv[1]))
    elif verb == "blocks":
        result = blocks(argv[1])
    elif verb == "chat":
        result = chat(argv[1], argv[2], argv[3], int(argv[4]))
    else:
        raise SystemExit(f"unknown verb {verb!r}")
    print("RESULT " + json.dumps(result))  # vLLM logs to stdout too
    return 0


if __name__ == "__main__":  # vLLM spawns processes that import __main__
    sys.exit(main(sys.argv[1:]))
