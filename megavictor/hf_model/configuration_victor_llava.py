"""Configuration of a Victor LLaVA model (standalone: imports only transformers, so it ships with exports).

A `LlavaConfig` (CLIP vision tower, Llama text model, `image_token_id`), or for anyres images a `LlavaNextConfig`
(its `image_grid_pinpoints`), plus the Victor fields: `num_registers` learnable register embeddings follow each
image's visual tokens (their slots hold `register_token_id`), and from decoder layer `drop_layer` on the visual
tokens are dropped, so those layers and their KV cache see only registers and text.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig, LlavaNextConfig


class VictorConfigMixin:
    """The Victor fields, checked, on top of the stock config that follows this mixin in the bases."""

    def __init__(self, num_registers: int = 8, drop_layer: int = 3, register_token_id: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        layers = self.text_config.num_hidden_layers
        if not 1 <= drop_layer < layers:
            # Dropping before layer 1 would leave the registers nothing to read the image from.
            raise ValueError(f"drop_layer={drop_layer} must be in [1, text_config.num_hidden_layers={layers})")
        if num_registers < 0:
            raise ValueError(f"num_registers={num_registers} must be >= 0")
        self.num_registers = num_registers
        self.drop_layer = drop_layer
        self.register_token_id = register_token_id


class VictorLlavaConfig(VictorConfigMixin, LlavaConfig):
    model_type = "victor_llava"


class VictorLlavaNextConfig(VictorConfigMixin, LlavaNextConfig):
    model_type = "victor_llava_next"


__all__ = ["VictorLlavaConfig", "VictorLlavaNextConfig"]
