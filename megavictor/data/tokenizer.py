"""LLaVA chat templates: a conversation record becomes a `Sample` whose loss is on assistant tokens only.

`plain` (LLaVA stage 1): the images, then the first answer (the caption) and eos; the loss is on caption + eos.
`v1` (LLaVA stage 2, Vicuna v1): `[system ]USER: <question> ASSISTANT: <answer></s>USER: ...`, multi-turn; the
loss is on every answer and its eos. The text is rendered once and tokenized with offsets, so the assistant
spans are found exactly for any fast HF tokenizer (no per-piece re-tokenization drift).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from megavictor.config import PromptFormat
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample
from megavictor.data.manifest import DataError

IMAGE_TOKEN = "<image>"
PROMPT_FORMATS = tuple(f.value for f in PromptFormat)
# LLaVA's conv_vicuna_v1 system prompt; pass it as `system` to match a LLaVA-1.5 checkpoint exactly.
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class TemplateError(ValueError):
    """A record's conversation cannot be rendered; the message says which turn is wrong."""


def conversation_problem(conversations: Any) -> str | None:
    """Why `conversations` is not a LLaVA conversation (human/gpt turns alternating from human), or None."""
    if not isinstance(conversations, list) or not conversations:
        return "has no conversations"
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"conversations[{i}] is not a {{'from': ..., 'value': str}} turn"
        if turn.get("from") != expected:
            return f"conversations[{i}] is from {turn.get('from')!r}, expected {expected!r} (turns alternate)"
    if len(conversations) % 2:
        return f"conversations end with a human turn ({len(conversations)} turns); the last turn must be 'gpt'"
    return None


def count_image_tokens(conversations: list[dict[str, str]]) -> int:
    return sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)


def render(conversations: list[dict[str, str]], prompt_format: str, eos: str,
           system: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The prompt text (with `<image>` markers) and the character spans that are training targets."""
    problem = conversation_problem(conversations)
    if problem is not None:
        raise TemplateError(problem)
    if prompt_format == PromptFormat.PLAIN:
        text = IMAGE_TOKEN * count_image_tokens(conversations)
        start = len(text)
        text += conversations[1]["value"] + eos
        return text, [(start, len(text))]
    if prompt_format != PromptFormat.V1:
        raise TemplateError(f"prompt format {prompt_format!r} is not one of {PROMPT_FORMATS}")
    text, spans = (system + " " if system else ""), []
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        text += f"USER: {human['value']} ASSISTANT: "
        start = len(text)
        text += gpt["value"] + eos
        spans.append((start, len(text)))
    return text, spans


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A local HF tokenizer dir (the LLM's, or the one prep built); it must be fast (offsets) and have eos."""
    if not Path(path).is_dir():
        raise DataError(f"tokenizer dir {path} does not exist (pass data.tokenizer=<your LLM's tokenizer "
                                "dir>, or prep a data set that stores one)")
    try:
        # No remote code: a Victor export's tokenizer_config names the processor's class (auto_map), for which
        # transformers would otherwise ask "run the custom code? [y/N]" and wait 15 s; the tokenizer is a stock one.
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no tokenizer files, unreadable or foreign ones
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path} is not a Hugging Face tokenizer folder ({first}); pass the folder holding your "
                        "LLM's tokenizer.json / tokenizer_config.json") from None
    if not tokenizer.is_fast:
        raise DataError(f"tokenizer at {path} is a slow tokenizer; the chat template needs a fast one "
                         "(offset mapping): save it with tokenizer.json")
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer at {path} has no eos token; the chat templates end every answer with it")
    return tokenizer


class ChatTokenizer:
    """Turns conversation records into `Sample`s for one prompt format."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str, system: str = "") -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format {prompt_format!r} is not one of {PROMPT_FORMATS}")
        self.tokenizer, self.prompt_format, self.system = tokenizer, prompt_format, system
        # Prepend bos only where the tokenizer itself would (LLaMA does, GPT-2/Qwen-style tokenizers do not).
        specials = tokenizer("", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and bos in specials else []

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, conversations: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """(token ids with IMAGE_PLACEHOLDER per `<image>`, trainable flag per token); what the length index
        stores the shape of and what `sample` builds a `Sample` from."""
        text, spans = render(conversations, self.prompt_format, self.tokenizer.eos_token, self.system)
        tokens, trainable = list(self.prefix), [False] * len(self.prefix)
        base = 0
        for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                tokens.append(IMAGE_PLACEHOLDER)
                trainable.append(False)
                base += len(IMAGE_TOKEN)
            enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                last = base + max(start, end - 1)  # a token is a target when it ends inside an answer span
                tokens.append(tok)
                trainable.append(any(a <= last < b for a, b in spans))
            base += len(chunk)
        return tokens, trainable

    def sample(self, conversations: list[dict[str, str]], images: list[torch.Tensor]) -> Sample:
        tokens, trainable = self.encode(conversations)
        return Sample(tokens=tokens, trainable=trainable, images=images)
