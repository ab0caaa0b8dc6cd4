"""`megavictor eval`: greedy answers to a VQA split and their exact-match accuracy.

Each record's first question is rendered with the training chat template up to where the answer starts; the
model answers greedily (until eos or `--max-new-tokens`) and the answer must match the reference exactly
(case and surrounding space ignored). `chance` is the accuracy of always giving the most common answer to each
question text of the split, the floor a model that ignores the image can reach. With LLaVA-NeXT anyres images
(`vision.image_grid_pinpoints`) each image is tiled as training tiles it (`load_anyres`) and takes its own number of
visual slots.

Decoding uses a KV cache (`megavictor.kv_cache`, on the plain-PyTorch twin of the model); `--no-kv-cache`
re-runs the whole prefix through the megatron model at every token instead, which gives the same answers.
Overrides after the arguments change the checkpoint's config for inference, e.g. `peer.fastv_layer=1` to apply
FastV training-free to a baseline checkpoint.

`--hf DIR` answers the same questions with an exported model (`megavictor convert to-hf`: LLaVA or LLaVA-NeXT, Victor
or stock) through transformers alone: its processor on the rendered prompt text and the encoded images, then
`generate()` greedily.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megavictor.config import Config, PipelineSplit, with_overrides
from megavictor.data.collate import Sample, collate_rows, expand_sample
from megavictor.data.images import load_anyres, load_image
from megavictor.data.manifest import load_manifest
from megavictor.data.reader import ShardReader
from megavictor.data.tokenizer import IMAGE_TOKEN, ChatTokenizer, load_tokenizer, render
from megavictor.errors import UserError
from megavictor.model.batch import VictorBatch
from megavictor.model.drop_plan import DropPlan, build_drop_plan, uses_packed_attention


@dataclass
class Question:
    key: str
    text: str  # the human turn, for the chance baseline
    prompt: Sample  # tokens up to where the answer starts
    answer: str
    prompt_text: str  # the same prompt as text, with `<image>` markers (for an HF processor)
    turn: str  # the human turn as the record has it, with `<image>` markers (for a chat template)
    image_bytes: list[bytes]  # the encoded images (for an HF processor)


def load_questions(cfg: Config, data_path: str | Path, split: str, limit: int | None = None) -> tuple[list[Question], ChatTokenizer]:
    manifest = load_manifest(data_path)
    tokenizer_dir = cfg.data.tokenizer or Path(data_path) / manifest.tokenizer
    chat = ChatTokenizer(load_tokenizer(tokenizer_dir), cfg.data.prompt_format, cfg.data.system_prompt)
    reader = ShardReader(data_path, manifest.split_shards(split))
    n = len(reader) if limit is None else min(limit, len(reader))
    questions = []
    anyres = cfg.vision.anyres()
    for _, raw in reader.read(range(n)):
        record = json.loads(raw["json"])
        first_turns = record["conversations"][:2]
        if anyres is None:
            sample = chat.sample(first_turns, [load_image(raw[member], cfg.vision.image_size,
                                                          cfg.data.image_aspect_ratio) for member in record["images"]])
        else:  # LLaVA-NeXT: each image's views, and its size and visual slots for the feature gather
            tiled = [load_anyres(raw[member], anyres) for member in record["images"]]
            sample = replace(chat.sample(first_turns, [views for views, _ in tiled]),
                             image_sizes=[size for _, size in tiled],
                             image_tokens=[anyres.layout(*size).tokens for _, size in tiled])
        start = sample.trainable.index(True)
        text, spans = render(first_turns, chat.prompt_format, chat.tokenizer.eos_token, chat.system)
        questions.append(Question(
            key=raw["__key__"], text=first_turns[0]["value"].replace("<image>", "").strip(),
            prompt=replace(sample, tokens=sample.tokens[:start], trainable=[False] * start),
            answer=first_turns[1]["value"].strip(),
            # without the space before the answer: it belongs to the answer's first token (SentencePiece, BPE)
            prompt_text=text[:spans[0][0]].rstrip(" "), turn=first_turns[0]["value"],
            image_bytes=[raw[member] for member in record["images"]]))
    return questions, chat


LogitsFn = Callable[[VictorBatch, DropPlan], torch.Tensor]
# prompts, max_new_tokens, eos id, pad id -> the generated token ids of each prompt (without eos)
Generate = Callable[[list[Sample], int, int, int], list[list[int]]]


@torch.no_grad()
def greedy_generate(logits_fn: LogitsFn, cfg: Config, prompts: list[Sample], max_new_tokens: int,
                    eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy decoding without a KV cache: each step re-runs the packed batch (one prompt per row).

    The tokens generated so far are marked as targets: that changes no logit, but it names the last prompt slot
    as FastV's ranking query (the slot that predicts the first target), as the cached prefill does."""
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    longest = max(p.num_slots(v, r) for p in prompts)
    seq_length = longest + max_new_tokens
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        rows = [[expand_sample(replace(p, tokens=p.tokens + g, trainable=p.trainable + [True] * len(g)), v, r,
                               pad_id)] for p, g in zip(prompts, generated)]
        batch = collate_rows(rows, seq_length, pad_id)
        plan = build_drop_plan(batch, cfg, packed=uses_packed_attention(cfg))
        logits = logits_fn(batch, plan)
        for i, row in enumerate(rows):
            if done[i]:
                continue
            last = len(row[0]) - 1
            column = int((plan.keep_index[i] == last).nonzero()[0])
            token = int(logits[i, column].argmax())
            if token == eos_id:
                done[i] = True
            else:
                generated[i].append(token)
        if all(done):
            break
    return generated


def accuracy(questions: list[Question], answers: list[str]) -> dict:
    hits = [a.strip().lower() == q.answer.lower() for q, a in zip(questions, answers)]
    by_text: dict[str, Counter] = defaultdict(Counter)
    per_question: dict[str, list[bool]] = defaultdict(list)
    for q, hit in zip(questions, hits):
        by_text[q.text][q.answer.lower()] += 1
        per_question[q.text].append(hit)
    n = max(len(questions), 1)
    return {"accuracy": sum(hits) / n, "n": len(questions),
            "chance": sum(c.most_common(1)[0][1] for c in by_text.values()) / n,
            "by_question": {text: round(sum(h) / len(h), 4) for text, h in sorted(per_question.items())}}


def evaluate(generate: Generate, cfg: Config, data_path: str | Path, split: str, limit: int | None = None,
             batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    questions, chat = load_questions(cfg, data_path, split, limit)
    eos = chat.tokenizer.eos_token_id
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        for ids in generate([q.prompt for q in chunk], max_new_tokens, eos, chat.pad_id):
            answers.append(chat.tokenizer.decode(ids, skip_special_tokens=True))
    return accuracy(questions, answers)


def hf_answers(model_dir: str | Path, questions: list[Question], batch_size: int = 32,
               max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of an exported HF model (with its processor and `generate()`, KV cache, left padding)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        images = [Image.open(io.BytesIO(data)) for q in chunk for data in q.image_bytes]
        inputs = processor(images=images or None, text=[hf_prompt(processor, q) for q in chunk], padding=True,
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def hf_prompt(processor: Any, question: Question) -> str:
    """The question rendered by the processor's chat template (exports made before they carried one: the v1
    template's text)."""
    if not getattr(processor, "chat_template", None):
        return question.prompt_text
    parts = question.turn.split(IMAGE_TOKEN)
    content = [{"type": "text", "text": parts[0]}] if parts[0] else []
    for part in parts[1:]:
        content += [{"type": "image"}] + ([{"type": "text", "text": part}] if part else [])
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def check_hf_export(model_dir: str | Path) -> None:
    """`--hf` names a LLaVA or LLaVA-NeXT export (stock or Victor) whose weight files are whole: one line otherwise, before
    transformers (whose errors name neither the flag nor the fix) loads anything."""
    from safetensors import SafetensorError, safe_open

    from megavictor.hf.convert import hf_config_dict

    config = hf_config_dict(model_dir, "--hf", ("model_type",))
    if config["model_type"] not in ("llava", "victor_llava", "llava_next", "victor_llava_next"):
        raise UserError(f"--hf {model_dir} holds a {config['model_type']!r} model, not a LLaVA export; export one "
                        "with `megavictor convert to-hf`")
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"--hf {model_dir} has no .safetensors weights")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except (OSError, SafetensorError) as exc:
            raise UserError(f"--hf {file} cannot be read ({exc}); export the model again") from None
    if len(files) > 1 and not (Path(model_dir) / "model.safetensors.index.json").is_file():
        raise UserError(f"--hf {model_dir} has several .safetensors files but no model.safetensors.index.json")


def hf_config(model_dir: str | Path, data_path: str | Path) -> Config:
    """What `load_questions` needs for an exported model: its tokenizer and image size (prompt format: v1). A
    LLaVA-NeXT export's images are loaded at one tile's size: only the prompt text and the encoded images reach its
    processor."""
    from transformers import AutoConfig

    cfg = Config()
    cfg.data.path, cfg.data.tokenizer, cfg.data.system_prompt = str(data_path), str(model_dir), ""
    cfg.vision.image_size = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True).vision_config.image_size
    return cfg


def _inference_state(checkpoint_path: str | Path, data_path: str | Path,
                     overrides: Sequence[str]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The checkpoint's config (single process, `overrides` applied) and full weights."""
    from megavictor.checkpoint import load_full_state

    cfg, full = load_full_state(checkpoint_path)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.pp_split = 1, 1, PipelineSplit.EVEN
    cfg.parallel.sequence_parallel, cfg.parallel.pipeline_length_buckets = False, None
    cfg.data.path = str(data_path)
    return (with_overrides(cfg, list(overrides)) if overrides else cfg), full


def megatron_logits_fn(checkpoint_path: str | Path, data_path: str | Path,
                       overrides: Sequence[str] = ()) -> tuple[LogitsFn, Config]:
    """A single-process (tp=1, pp=1) VictorVLM with the checkpoint's weights, whatever layout (or engine: megatron,
    DeepSpeed) saved them."""
    from megavictor.distributed import init_distributed
    from megavictor.model.sharding import shard_into
    from megavictor.model.vlm import VictorVLM

    cfg, full = _inference_state(checkpoint_path, data_path, overrides)
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    model = VictorVLM(cfg, [cfg.model.num_layers])
    shard_into(model, full, tp_rank=0, tp=1, layer_offset=0)
    model.eval()
    return (lambda batch, plan: model(batch, plan, return_logits=True)), cfg


def checkpoint_generator(checkpoint_path: str | Path, data_path: str | Path, kv_cache: bool = True,
                         overrides: Sequence[str] = ()) -> tuple[Generate, Config]:
    """Greedy decoding for a checkpoint: with the KV cache (the plain-PyTorch twin, `ReferenceVLM`, holding the
    checkpoint's weights), or recomputing the prefix through the megatron model."""
    if not kv_cache:
        logits_fn, cfg = megatron_logits_fn(checkpoint_path, data_path, overrides)
        return partial(greedy_generate, logits_fn, cfg), cfg
    from megavictor.kv_cache import greedy_generate_cached
    from megavictor.model.reference import ReferenceVLM

    cfg, full = _inference_state(checkpoint_path, data_path, overrides)
    model = ReferenceVLM(cfg)
    model.load_state_dict(full)
    return partial(greedy_generate_cached, model.eval(), cfg), cfg


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor eval", description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="megavictor checkpoint of either engine (step, checkpoints or run dir)")
    model.add_argument("--hf", help="exported HF dir (`megavictor convert to-hf`), run with transformers")
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("--split", default="test", help="split name, or test/val for the config's data.*_split")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="recompute the whole prefix at every token (megatron model) instead of the KV cache")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for inference, e.g. peer.fastv_layer=1")
    args = parser.parse_args(argv)
    if args.hf:
        check_hf_export(args.hf)
        cfg = hf_config(args.hf, args.data)
        split = {"test": cfg.data.test_split, "val": cfg.data.val_split}.get(args.split, args.split)
        questions, _ = load_questions(cfg, args.data, split, args.limit)
        result = accuracy(questions, hf_answers(args.hf, questions, max_new_tokens=args.max_new_tokens))
    else:
        generate, cfg = checkpoint_generator(args.checkpoint, args.data, not args.no_kv_cache, args.overrides)
        split = {"test": cfg.data.test_split, "val": cfg.data.val_split}.get(args.split, args.split)
        result = evaluate(generate, cfg, args.data, split, args.limit, max_new_tokens=args.max_new_tokens)
    result["split"] = split
    print(f"{split}: accuracy {result['accuracy']:.3f} on {result['n']} questions (chance {result['chance']:.3f})")
    print(json.dumps(result))
    return 0
