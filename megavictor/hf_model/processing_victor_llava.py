"""Processor of a Victor LLaVA model (standalone: imports only transformers, so it ships with exports).

A `LlavaProcessor` (or for anyres images a `LlavaNextProcessor`) whose `<image>` expands to the image's visual
tokens (under anyres its whole run: base view, tile rows and their newlines) followed by `num_registers` register
tokens: the slot order megavictor trains on (`megavictor.model.batch.expand_sample`), so its output goes straight
into `model.generate(**inputs)`.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import LlavaNextProcessor, LlavaProcessor
from transformers.feature_extraction_utils import BatchFeature


class VictorProcessorMixin:
    """The registers after each `<image>`, on top of the stock processor that follows this mixin in the bases."""

    # The stock processors' arguments are spelled out: ProcessorMixin saves exactly the `__init__` parameters.
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, patch_size: Optional[int] = None,
                 vision_feature_select_strategy: Optional[str] = None, chat_template: Optional[str] = None,
                 image_token: str = "<image>", num_additional_image_tokens: int = 0, num_registers: int = 0,
                 register_token: str = "<register>", **kwargs: Any) -> None:
        self.num_registers = num_registers
        self.register_token = register_token
        super().__init__(image_processor, tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs)

    def __call__(self, images: Any = None, text: Optional[str | list[str]] = None, audio: Any = None,
                 videos: Any = None, **kwargs: Any) -> BatchFeature:
        if images is not None and text is not None and self.num_registers:
            # The stock processor then expands each `<image>` in place, so the registers land right after its tokens.
            registers = self.register_token * self.num_registers
            texts = [text] if isinstance(text, str) else text
            text = [t.replace(self.image_token, self.image_token + registers) for t in texts]
        return super().__call__(images=images, text=text, audio=audio, videos=videos, **kwargs)


class VictorLlavaProcessor(VictorProcessorMixin, LlavaProcessor):
    """LLaVA-1.5's: each image V visual tokens, then the registers."""


class VictorLlavaNextProcessor(VictorProcessorMixin, LlavaNextProcessor):
    """LLaVA-NeXT's (anyres): each image its own count of visual tokens, then the registers."""


__all__ = ["VictorLlavaNextProcessor", "VictorLlavaProcessor"]
