"""`megavictor bench infer`: HF serving throughput, Victor LLaVA vs the plain LLaVA baseline (the paper's setting:
batch 16, 64-token prompts after one image each, 2 and 128 generated tokens).

Both models are transformers models: the Victor one is `megavictor/hf_model/modeling_victor_llava.py` (its KV cache
holds only registers + text from layer k on), the baseline the stock `LlavaForConditionalGeneration`. Without `--hf` they
are exported by `megavictor.hf.convert.to_hf` from a random-weight `ReferenceVLM` of LLaVA-1.5-7B's token shape at
CPU width (32 layers, 576 visual tokens, R=8, k=3). With `--hf DIR` (a Victor export), the baseline is the same
weights loaded as a stock LLaVA (the registers unused).

`--anyres`: LLaVA-NeXT-7B's token shape at CPU width instead (`VictorLlavaNextForConditionalGeneration` against the
stock `LlavaNextForConditionalGeneration`; a LLaVA-NeXT export given to `--hf` is served the same way). The prompts'
images cycle through `ANYRES_IMAGE_MIX`'s five aspect ratios (2328-2928 visual tokens at v1.6's grids), so the
prompts differ in length and are left-padded to the longest, as `generate()` pads a batch; the padding is computed
(and counted in the FLOPs) by both models, and after Victor's drop every row keeps as many slots as the one with the
fewest visual tokens (its registers, text and padding).

Serving is greedy decoding with the KV cache, timed in two parts: the prefill (one forward over the prompts, ViT
included, logits of the last slot only) and the decode steps (one forward per new token). The 2-token setting is
the prefill plus one decode step, the 128-token setting the prefill plus 127; Victor and the baseline alternate
per repeat and the medians are reported. `flop_bound` is baseline / Victor FLOPs of the 2-token setting
(`megavictor.model.flops.generate_flops`), `ratio_to_bound` = `speedup` / `flop_bound`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from megavictor.benchmarks.common import (
    CPU_LLAVA15,
    CPU_LLAVA_NEXT,
    add_threads_option,
    anyres_image_sizes,
    bench_config,
    median,
    print_table,
    variant,
)
from megavictor.config import Config, load_config, with_overrides
from megavictor.errors import UserError
from megavictor.model.flops import generate_flops


def export_pair(cfg: Config, out: Path, seed: int = 0, tokenizer_dir: Path | None = None,
                max_positions: int | None = None) -> dict[str, Path]:
    """Random-weight ReferenceVLMs (the same weights apart from the registers) exported as HF dirs (with
    `tokenizer_dir`'s tokenizer and a processor; `max_positions`: the context they declare, else one sample's)."""
    from megavictor.hf.convert import to_hf
    from megavictor.model.reference import ReferenceVLM

    dirs = {}
    for name in ("victor", "baseline"):
        c = variant(cfg, name == "victor")
        if max_positions is not None:
            c = with_overrides(c, [f"data.seq_length={max_positions}"])
        torch.manual_seed(seed)
        state = ReferenceVLM(c).state_dict()
        dirs[name] = to_hf(c, state, out / name, tokenizer_dir=tokenizer_dir)
    return dirs


def export_shape(config: Any) -> Config:
    """A Victor export's HF config (`config.json`, as transformers loads it) as megavictor's config, for FLOPs (and a
    LLaVA-NeXT export's grids, for its prompts' visual counts)."""
    text, vision = config.text_config, config.vision_config
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    anyres = [] if pinpoints is None else [f"vision.image_grid_pinpoints={json.dumps(pinpoints)}",
                                           "data.image_aspect_ratio=anyres"]
    return load_config(None, [
        f"model.num_layers={text.num_hidden_layers}", f"model.hidden_size={text.hidden_size}",
        f"model.ffn_hidden_size={text.intermediate_size}", f"model.num_attention_heads={text.num_attention_heads}",
        f"model.num_query_groups={text.num_key_value_heads}", f"model.vocab_size={text.vocab_size}",
        f"vision.image_size={vision.image_size}", f"vision.patch_size={vision.patch_size}",
        f"vision.num_layers={vision.num_hidden_layers}", f"vision.hidden_size={vision.hidden_size}",
        f"vision.ffn_hidden_size={vision.intermediate_size}", f"vision.num_attention_heads={vision.num_attention_heads}",
        "vision.freeze=true", f"victor.num_registers={config.num_registers}", f"victor.drop_layer={config.drop_layer}",
        "data.seq_length=100000", "log.wandb=false", *anyres])


def load_models(dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The Victor export through its remote code, the baseline as the stock class its config names."""
    from transformers import AutoModelForImageTextToText

    return {"victor": AutoModelForImageTextToText.from_pretrained(dirs["victor"], trust_remote_code=True).eval(),
            "baseline": AutoModelForImageTextToText.from_pretrained(dirs["baseline"]).eval()}


def baseline_from_victor(victor_dir: Path) -> torch.nn.Module:
    """A Victor export's weights as a stock LLaVA or LLaVA-NeXT (no registers, no drop)."""
    from transformers import (
        AutoConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    vcfg = AutoConfig.from_pretrained(victor_dir, trust_remote_code=True).to_dict()
    anyres = vcfg.get("image_grid_pinpoints") is not None
    for key in ("num_registers", "drop_layer", "register_token_id", "auto_map", "architectures", "model_type"):
        vcfg.pop(key, None)
    config = (LlavaNextConfig if anyres else LlavaConfig)(**vcfg)
    stock = LlavaNextForConditionalGeneration if anyres else LlavaForConditionalGeneration
    model = stock.from_pretrained(victor_dir, config=config)
    vocab = model.get_input_embeddings().weight.shape[0]
    if config.image_token_id >= vocab:  # the stock model looks the image id up before overwriting it
        model.resize_token_embeddings(config.image_token_id + 1)
    return model.eval()


def prompts(model: torch.nn.Module, shape: Config, batch: int, text: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` prompts of one image (its visual slots, then R register slots for Victor) and `text` text tokens.

    `shape` is the export's shape (`export_shape`). Under anyres prompt i's image has `anyres_image_sizes`' size
    i mod 5: its own visual count and tiles (pixel values [batch, most tiles, 3, S, S], zero past an image's own,
    and `image_sizes`); the prompts are left-padded to the longest."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    r = getattr(c, "num_registers", 0) if getattr(c, "drop_layer", None) is not None else 0
    size, spec = shape.vision.image_size, shape.vision.anyres()
    vocab = min(c.text_config.vocab_size, c.image_token_id)
    words = torch.randint(3, vocab, (batch, text), generator=g)
    registers = torch.full((r,), c.register_token_id if r else 0)
    if spec is None:
        ids = torch.cat([torch.full((batch, shape.vision.num_visual_tokens), c.image_token_id),
                         registers.expand(batch, r), words], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    mix = anyres_image_sizes(shape)
    sizes = [mix[i % len(mix)] for i in range(batch)]
    layouts = [spec.layout(h, w) for h, w in sizes]
    rows = [torch.cat([torch.full((layout.tokens,), c.image_token_id), registers, row_words])
            for layout, row_words in zip(layouts, words)]
    longest = max(len(row) for row in rows)
    ids = torch.stack([torch.cat([row.new_zeros(longest - len(row)), row]) for row in rows])
    mask = torch.stack([torch.arange(longest) >= longest - len(row) for row in rows]).long()
    pixels = torch.zeros(batch, max(layout.tiles for layout in layouts), 3, size, size)
    for i, layout in enumerate(layouts):
        pixels[i, :layout.tiles] = torch.randn(layout.tiles, 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


@torch.inference_mode()
def serve(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, float]:
    """Greedy decoding with the model's KV cache; seconds of the prefill, the first decode step, all decode steps."""
    start = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    cache, mask = out.past_key_values, inputs["attention_mask"]
    first = 0.0
    for step in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if step == 0:
            first = time.perf_counter() - start - prefill
    return {"prefill": prefill, "first_decode": first, "decode": time.perf_counter() - start - prefill}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavictor bench infer", description=__doc__.splitlines()[0])
    parser.add_argument("--hf", help="a Victor HF export (default: export random-weight models of the paper's shape)")
    parser.add_argument("--anyres", action="store_true",
                        help="without --config or --hf: LLaVA-NeXT-7B's anyres token shape at CPU width (up to 2928 "
                             "visual tokens per image, a mix of five aspect ratios)")
    add_serving_options(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the exported models (not with --hf)")
    return parser


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    """The flags `bench infer` and `bench serve` share: the exports' recipe and the paper's serving setting."""
    parser.add_argument("--config", help="YAML recipe for the exported models (default: CPU-width LLaVA-1.5 shape)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per prompt (besides the image)")
    parser.add_argument("--long-tokens", type=int, default=128, help="generated tokens of the long setting")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the 2-token setting (median)")
    parser.add_argument("--long-repeats", type=int, default=1, help="repeats of the long setting (median)")
    add_threads_option(parser)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.hf and args.overrides:  # the models are DIR's as exported: nothing for the overrides to change
        raise UserError(f"infer --hf serves {args.hf} as exported; the overrides "
                        f"({' '.join(args.overrides)}) only shape the random-weight exports made without --hf")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        if args.hf:
            from transformers import AutoModelForImageTextToText

            models = {"victor": AutoModelForImageTextToText.from_pretrained(args.hf, trust_remote_code=True).eval(),
                      "baseline": baseline_from_victor(Path(args.hf))}
            source = args.hf
        else:
            cfg = bench_config(args.config, [f"data.text_length={args.prompt_tokens}"] + args.overrides,
                               CPU_LLAVA_NEXT if args.anyres else CPU_LLAVA15)
            models = load_models(export_pair(cfg, Path(tmp)))
            source = "random-weight exports (to_hf of ReferenceVLM)"
    # The exported shape as megavictor's config sees it: the prompts' visual counts and the FLOPs.
    tc = models["victor"].config
    shape = export_shape(tc)
    spec = shape.vision.anyres()
    if args.anyres and spec is None:
        raise UserError(f"infer --anyres: {args.hf or args.config} has no anyres grids (vision.image_grid_pinpoints); "
                        "drop --anyres, or give a LLaVA-NeXT export or recipe")
    inputs = {name: prompts(m, shape, args.batch, args.prompt_tokens) for name, m in models.items()}
    visual = (inputs["victor"]["input_ids"] == tc.image_token_id).sum(dim=1).tolist()
    views = args.batch if spec is None else sum(spec.layout(h, w).tiles
                                                 for h, w in inputs["victor"]["image_sizes"].tolist())
    prompt_slots = {name: inputs[name]["input_ids"].shape[1] for name in models}
    flops = {name: {n: generate_flops(variant(shape, name == "victor", args.prompt_tokens), visual,
                                      prompt_slots[name], n, views) for n in (2, args.long_tokens)}
             for name in models}

    serve(models["victor"], prompts(models["victor"], shape, 2, 8), 2)  # warm-up, small
    serve(models["baseline"], prompts(models["baseline"], shape, 2, 8), 2)
    runs: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "first_decode": [], "decode": [], "long": []}
                                               for n in models}
    for i in range(max(args.repeats, args.long_repeats)):
        order = ("victor", "baseline") if i % 2 == 0 else ("baseline", "victor")
        for name in order:
            long = i < args.long_repeats
            t = serve(models[name], inputs[name], args.long_tokens if long else 2)
            print(f"  repeat {i} {name}: prefill {t['prefill']:.3f} s, decode {t['decode']:.3f} s",
                  file=sys.stderr, flush=True)
            if i < args.repeats:
                runs[name]["prefill"].append(t["prefill"])
                runs[name]["first_decode"].append(t["first_decode"])
            if long:
                runs[name]["decode"].append(t["decode"] / (args.long_tokens - 1))
                runs[name]["long"].append(t["prefill"] + t["decode"])
    res = {}
    for name in models:
        r = runs[name]
        res[name] = {"prefill_s": median(r["prefill"]), "first_decode_s": median(r["first_decode"]),
                     "two_token_s": median([p + d for p, d in zip(r["prefill"], r["first_decode"])]),
                     "decode_token_s": median(r["decode"]), "long_s": median(r["long"])}
    v, b = res["victor"], res["baseline"]
    speedup = b["two_token_s"] / v["two_token_s"]
    bound = flops["baseline"][2] / flops["victor"][2]
    tok2, tokl = args.batch * 2, args.batch * args.long_tokens
    out = {
        "speedup": round(speedup, 4), "speedup_128": round(b["long_s"] / v["long_s"], 4),
        "prefill_speedup": round(b["prefill_s"] / v["prefill_s"], 4),
        "decode_speedup": round(b["decode_token_s"] / v["decode_token_s"], 4),
        "flop_bound": round(bound, 4), "ratio_to_bound": round(speedup / bound, 4),
        "flop_bound_128": round(flops["baseline"][args.long_tokens] / flops["victor"][args.long_tokens], 4),
        "victor_tokens_per_s": round(tok2 / v["two_token_s"], 2),
        "baseline_tokens_per_s": round(tok2 / b["two_token_s"], 2),
        "victor_tokens_per_s_128": round(tokl / v["long_s"], 2),
        "baseline_tokens_per_s_128": round(tokl / b["long_s"], 2),
        "batch": args.batch, "prompt_text_tokens": args.prompt_tokens, "long_tokens": args.long_tokens,
        "repeats": args.repeats, "long_repeats": args.long_repeats, "threads": args.threads, "source": source,
        "seconds": {n: {k: round(x, 4) for k, x in r.items()} for n, r in res.items()},
        "anyres": spec is not None, "visual_per_image": visual, "prompt_slots": prompt_slots,
    }
    image = (f"anyres images of {min(visual)}-{max(visual)} visual tokens (left-padded to {prompt_slots['baseline']} "
             "slots)" if spec else f"{visual[0]} visual tokens")
    print(f"HF serving: batch {args.batch}, {image} + {args.prompt_tokens} text tokens per prompt, "
          f"{tc.text_config.num_hidden_layers} layers, hidden {tc.text_config.hidden_size}, R={tc.num_registers}, "
          f"k={tc.drop_layer}; {source}")
    print_table("", ["", "prefill s", "decode s/token", "2-token s", f"{args.long_tokens}-token s",
                     "tokens/s (2)", f"tokens/s ({args.long_tokens})"],
                [[n, res[n]["prefill_s"], res[n]["decode_token_s"], res[n]["two_token_s"], res[n]["long_s"],
                  out[f"{n}_tokens_per_s"], out[f"{n}_tokens_per_s_128"]] for n in ("victor", "baseline")])
    print(f"  speedup {out['speedup']}x (2 tokens), {out['speedup_128']}x ({args.long_tokens} tokens); prefill "
          f"{out['prefill_speedup']}x, decode {out['decode_speedup']}x; FLOP bound {out['flop_bound']}x, "
          f"ratio {out['ratio_to_bound']}")
    print(json.dumps(out))
    return 0
