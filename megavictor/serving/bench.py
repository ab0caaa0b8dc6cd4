"""The vLLM side of `megavictor bench serve` (run where vLLM is installed; `megavictor.benchmarks.serve` starts it).

    python -m megavictor.serving.bench --victor DIR --baseline DIR [--batch 16 --prompt-tokens 64 ...]

For each export, one engine (in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so that the scheduler's block tables
can be read; no prefix caching, which would let the stock model skip repeated prompts' prefill) serves a batch of
prompts, each one image and `--prompt-tokens` text tokens, greedy, to 2 and to `--long-tokens` new tokens; the Victor
and baseline engines alternate per repeat, and the medians are reported. KV memory per request is counted in
layer-blocks: the blocks a request holds in each KV cache group times the layers in that group (a block of a group of
3 layers holds 3 layers' pages), at the request's largest, averaged over requests.
The result is one JSON line after "RESULT ".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
from PIL import Image


def prompts(batch: int, text_tokens: int, image_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """`batch` requests: a random image, then words w1 .. w{text_tokens - 1} (with BOS: `text_tokens` text tokens)."""
    rng = np.random.default_rng(seed)
    text = "<image>" + "".join(f" w{i}" for i in range(1, text_tokens))
    return [{"prompt": text, "multi_modal_data": {"image": Image.fromarray(
        rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))}} for _ in range(batch)]


class Engine:
    """One export in an in-process vLLM engine."""

    def __init__(self, export: str, max_model_len: int, batch: int) -> None:
        from vllm import EngineArgs, LLMEngine

        self.engine = LLMEngine.from_engine_args(EngineArgs(
            model=export, trust_remote_code=True, max_model_len=max_model_len, block_size=32, dtype="float32",
            max_num_seqs=batch, enforce_eager=True,
            # Repeats serve the same prompts: with prefix caching the stock model would skip their prefill.
            enable_prefix_caching=False))
        scheduler = self.engine.engine_core.engine_core.scheduler
        self.scheduler = scheduler
        self.managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        self.layers = [len(group.layer_names) for group in scheduler.kv_cache_config.kv_cache_groups]
        self.image_size = self.engine.model_config.hf_config.vision_config.image_size
        self.requests = 0

    def generate(self, requests: list[dict[str, Any]], new_tokens: int) -> tuple[float, list[int], int]:
        """Serve `requests` to `new_tokens` each: wall seconds, each request's largest KV layer-blocks, tokens out."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
        for request in requests:
            self.requests += 1
            self.engine.add_request(str(self.requests), request, params)
        largest: dict[str, int] = {}  # by the engine's request id (it suffixes ours)
        generated = 0
        start = time.perf_counter()
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                generated += len(output.outputs[0].token_ids) if output.finished else 0
            for request_id in self.scheduler.requests:
                blocks = sum(len(m.req_to_blocks.get(request_id, ())) * layers
                             for m, layers in zip(self.managers, self.layers))
                largest[request_id] = max(largest.get(request_id, 0), blocks)
        return time.perf_counter() - start, list(largest.values()), generated


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victor", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args(argv)
    engines = {name: Engine(path, args.max_model_len, args.batch)
               for name, path in (("victor", args.victor), ("baseline", args.baseline))}
    batch = prompts(args.batch, args.prompt_tokens, engines["victor"].image_size)
    for engine in engines.values():  # warm-up
        engine.generate(batch[:2], 2)
    runs: dict[str, dict[str, list[Any]]] = {n: {"short": [], "long": [], "blocks": []} for n in engines}
    for i in range(max(args.repeats, args.long_repeats)):
        for name in ("victor", "baseline") if i % 2 == 0 else ("baseline", "victor"):
            if i < args.repeats:
                runs[name]["short"].append(engines[name].generate(batch, 2)[0])
            if i < args.long_repeats:
                seconds, blocks, generated = engines[name].generate(batch, args.long_tokens)
                assert generated == args.batch * args.long_tokens, generated
                runs[name]["long"].append(seconds)
                runs[name]["blocks"].append(statistics.mean(blocks))
            print(f"  repeat {i} {name} done", file=sys.stderr, flush=True)
    result = {name: {"seconds_2": statistics.median(r["short"]), "seconds_long": statistics.median(r["long"]),
                     "kv_layer_blocks_per_request": statistics.median(r["blocks"]),
                     "groups": [type(m).__name__ for m in engines[name].managers],
                     "layers_per_group": engines[name].layers}
              for name, r in runs.items()}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
