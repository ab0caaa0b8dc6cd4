"""`megavictor bench serve`: vLLM serving throughput and KV memory, a Victor export vs the same weights as a stock
LLaVA (batch 16, one image and 64 text tokens per prompt, 2 and 128 generated tokens), against the FLOP bound.

The two exports are `bench infer`'s (random-weight `ReferenceVLM`s of LLaVA-1.5-7B's token shape at CPU width: 32
layers, 576 visual tokens, R=8, k=3; the same weights apart from the registers), with a word tokenizer so that vLLM's
processor runs. vLLM serves them where it is installed: this environment if it imports vLLM, else the serving venv
(`python -m megavictor.serving.venv`); `megavictor.serving.bench` does the serving, in one in-process engine per
export, eager for both (the drop has data-dependent shapes; stock models could use CUDA graphs on a GPU).

Reported: requests/s and generated tokens/s of each, `speedup` (2 tokens) and `speedup_128` (baseline / Victor wall
time), KV layer-blocks per request (`megavictor.serving.bench`) and `kv_blocks_ratio` (baseline / Victor), `bound`
(baseline / Victor FLOPs of the 2-token setting, `megavictor.model.flops.generate_flops`), `ratio_to_bound` =
`speedup` / `bound`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megavictor.benchmarks.common import CPU_LLAVA15, bench_config, print_table, variant
from megavictor.benchmarks.infer import add_serving_options, export_pair, export_shape
from megavictor.data.word_tokenizer import build_word_tokenizer
from megavictor.errors import UserError
from megavictor.model.flops import generate_flops
from megavictor.serving import venv as serving_venv


def serving_python() -> tuple[str, dict[str, str]]:
    """The python that imports vLLM, and its environment: this one, else the serving venv's."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, dict(os.environ)
    python = serving_venv.ready()
    if python is None:
        raise UserError("bench serve needs vLLM: install it here (`pip install -e .[vllm]` on a GPU machine) or build "
                        "the serving venv with `python -m megavictor.serving.venv`")
    return str(python), serving_venv.clean_env(VLLM_CPU_KVCACHE_SPACE="4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench serve", description=__doc__.splitlines()[0])
    add_serving_options(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the exported models")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    python, env = serving_python()
    env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one process: the bench reads the scheduler's blocks
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")
    cfg = bench_config(args.config, [f"data.text_length={args.prompt_tokens}"] + args.overrides, CPU_LLAVA15)
    with tempfile.TemporaryDirectory() as tmp:
        # Words w0, w1, ... fill the vocabulary but for room for <image> and <register> (the prompts use them).
        build_word_tokenizer([" ".join(f"w{i}" for i in range(cfg.model.vocab_size - 8))], Path(tmp) / "tokenizer",
                             cfg.model.vocab_size - 2)
        seq = cfg.vision.num_visual_tokens + cfg.victor.num_registers + args.prompt_tokens + args.long_tokens
        seq = -(-seq // 32) * 32  # whole blocks
        dirs = export_pair(cfg, Path(tmp), tokenizer_dir=Path(tmp) / "tokenizer", max_positions=seq)
        cmd = [python, "-m", "megavictor.serving.bench", "--victor", str(dirs["victor"]),
               "--baseline", str(dirs["baseline"]), "--batch", str(args.batch),
               "--prompt-tokens", str(args.prompt_tokens), "--long-tokens", str(args.long_tokens),
               "--repeats", str(args.repeats), "--long-repeats", str(args.long_repeats),
               "--max-model-len", str(seq)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not result:
            sys.stderr.write((run.stdout + run.stderr)[-6000:])
            raise UserError(f"the vLLM side of bench serve failed ({python} -m megavictor.serving.bench): its output "
                            "is above")
        served = json.loads(result[-1][len("RESULT "):])
        from transformers import AutoConfig

        shape = export_shape(AutoConfig.from_pretrained(dirs["victor"], trust_remote_code=True))
    visual = shape.vision.num_visual_tokens
    prompt_slots = {"victor": visual + shape.victor.num_registers + args.prompt_tokens,
                    "baseline": visual + args.prompt_tokens}
    flops = {name: {n: generate_flops(variant(shape, name == "victor", args.prompt_tokens), [visual] * args.batch,
                                      prompt_slots[name], n) for n in (2, args.long_tokens)} for name in served}
    v, b = served["victor"], served["baseline"]
    speedup = b["seconds_2"] / v["seconds_2"]
    bound = flops["baseline"][2] / flops["victor"][2]
    out = {
        "speedup": round(speedup, 4), "speedup_128": round(b["seconds_long"] / v["seconds_long"], 4),
        "kv_blocks_ratio": round(b["kv_layer_blocks_per_request"] / v["kv_layer_blocks_per_request"], 4),
        "bound": round(bound, 4), "ratio_to_bound": round(speedup / bound, 4),
        "bound_128": round(flops["baseline"][args.long_tokens] / flops["victor"][args.long_tokens], 4),
        **{f"{n}_{key}": value for n, r in served.items() for key, value in (
            ("requests_per_s", round(args.batch / r["seconds_2"], 3)),
            ("requests_per_s_128", round(args.batch / r["seconds_long"], 3)),
            ("tokens_per_s", round(args.batch * 2 / r["seconds_2"], 2)),
            ("tokens_per_s_128", round(args.batch * args.long_tokens / r["seconds_long"], 2)),
            ("kv_layer_blocks_per_request", r["kv_layer_blocks_per_request"]))},
        "batch": args.batch, "prompt_text_tokens": args.prompt_tokens, "long_tokens": args.long_tokens,
        "repeats": args.repeats, "long_repeats": args.long_repeats, "threads": args.threads,
        "kv_cache_groups": {n: {"managers": r["groups"], "layers": r["layers_per_group"]} for n, r in served.items()},
        "seconds": {n: {"2": round(r["seconds_2"], 4), str(args.long_tokens): round(r["seconds_long"], 4)}
                    for n, r in served.items()},
    }
    print(f"vLLM serving ({python}): batch {args.batch}, {visual} visual + {args.prompt_tokens} text tokens per "
          f"prompt, {shape.model.num_layers} layers, hidden {shape.model.hidden_size}, R={shape.victor.num_registers}, "
          f"k={shape.victor.drop_layer}; eager, block size 32")
    print_table("", ["", "2-token s", f"{args.long_tokens}-token s", "requests/s (2)", "tokens/s (2)",
                     f"tokens/s ({args.long_tokens})", "KV layer-blocks/request"],
                [[n, served[n]["seconds_2"], served[n]["seconds_long"], out[f"{n}_requests_per_s"],
                  out[f"{n}_tokens_per_s"], out[f"{n}_tokens_per_s_128"], out[f"{n}_kv_layer_blocks_per_request"]]
                 for n in ("victor", "baseline")])
    print(f"  speedup {out['speedup']}x (2 tokens), {out['speedup_128']}x ({args.long_tokens} tokens); KV blocks "
          f"{out['kv_blocks_ratio']}x fewer; FLOP bound {out['bound']}x, ratio {out['ratio_to_bound']}")
    print(json.dumps(out))
    return 0
