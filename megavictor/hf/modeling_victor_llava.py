"""Victor LLaVA for transformers (standalone: imports only torch and transformers, so it ships with exports).

The stock LLaVA parts are reused as they are (CLIP vision tower, projector, Llama decoder layers, masks, rotary
embedding); what differs is the decoder loop. Each image's `<image>` slots are followed by `num_registers`
`<register>` slots holding learned embeddings. Layers < `drop_layer` see the whole sequence; then the visual slots
are gathered out, and the remaining layers, and their KV cache, see only registers and text. Every token keeps its
original position id, so decoding continues from the last original position.

Batches with different numbers of images per row stay rectangular after the drop: each row's surviving slots are
right-aligned and the rows with fewer survivors are filled on the left with some of their own dropped visual slots,
masked out ("fillers"). The last slot of every row is therefore its last input token, as `generate` expects. The
padding mask of the short layers is not derivable from `generate`'s 2-D mask, so it lives in `VictorCache`.

Training takes packed rows instead (`cu_seqlens`, as megavictor's data loader and flash-attn varlen write them):
several samples back to back in a row, each attending causally only within itself, position ids restarting per
sample, the drop applied per sample. SDPA gets a block-diagonal mask; flash-attention 2 gets the flattened rows and
their boundaries (`flash_attn_varlen_func`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaPreTrainedModel,
)
from transformers.utils import can_return_tuple

from .configuration_victor_llava import VictorLlavaConfig
from .victor_drop import keep_index, runs_of, segment_ids

IGNORE_INDEX = -100


class VictorCache(DynamicCache):
    """A dynamic cache whose layers >= drop_layer hold fewer tokens, plus the padding mask of those layers.

    `short_attention_mask` [B, tokens cached in the short layers] marks the real (non-padding, non-filler) slots.
    Beam search needs no reordering of it: every beam of a prompt has the same prefix and only ones after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.short_attention_mask: Optional[torch.Tensor] = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("VictorCache cannot be cropped to one length: its layers hold different numbers "
                                  "of tokens (assisted decoding is not supported)")


class _LayerView:
    """One cache layer's mask sizes, for `create_causal_mask`, which otherwise reads layer 0's."""

    def __init__(self, cache: Cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self.cache.get_mask_sizes(cache_position, self.layer_idx)


def victor_cache(past_key_values: Optional[Cache], use_cache: bool) -> Optional[VictorCache]:
    """The cache to use: `generate` hands over an empty `DynamicCache`, which is swapped for a `VictorCache`
    (`generate` takes the cache back from the model's output)."""
    if isinstance(past_key_values, VictorCache):
        return past_key_values
    if past_key_values is None:
        return VictorCache() if use_cache else None
    if type(past_key_values) is DynamicCache and past_key_values.get_seq_length() == 0:
        return VictorCache()
    raise TypeError(f"VictorLlava needs a VictorCache (or an empty DynamicCache), got {type(past_key_values).__name__}"
                    ": its layers >= drop_layer cache only registers and text")


@dataclass
class VictorLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    """`kept_index` [B, L]: the input position of each returned slot (after the drop); fillers are visual slots."""

    kept_index: Optional[torch.LongTensor] = None


@dataclass
class VictorLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    """`kept_index` [B, L]: the input position each logit row belongs to (image slots are dropped)."""

    kept_index: Optional[torch.LongTensor] = None


class VictorLlavaModel(LlavaModel):
    config_class = VictorLlavaConfig

    def __init__(self, config: VictorLlavaConfig) -> None:
        if config.num_registers and config.register_token_id is None:
            raise ValueError("VictorLlavaConfig.register_token_id is required when num_registers > 0")
        super().__init__(config)
        text = config.text_config
        self.registers = nn.Parameter(torch.randn(config.num_registers, text.hidden_size) * text.initializer_range)

    def embed(self, input_ids: torch.LongTensor, pixel_values: Optional[torch.FloatTensor],
              vision_feature_layer: Optional[Union[int, list[int]]], vision_feature_select_strategy: Optional[str],
              use_every_parameter: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Token embeddings with image features and registers scattered into their slots (and the features).

        `use_every_parameter` (packed rows, the training format): data-parallel training reduces gradients in
        buckets (DDP, ZeRO) and ZeRO-3 gathers each module's parameters collectively, in training and evaluation
        alike, so every rank must run every module in every micro-batch. One without images then runs the vision
        tower on a blank image and adds it, and the registers, times zero.
        """
        cfg = self.config
        image = input_ids == cfg.image_token_id
        register = input_ids == cfg.register_token_id if cfg.num_registers else torch.zeros_like(image)
        # The image and register ids may lie beyond the vocabulary: their rows are never looked up.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image | register, 0))
        features = None
        if pixel_values is not None:
            features = torch.cat(self.get_image_features(pixel_values, vision_feature_layer,
                                                         vision_feature_select_strategy), dim=0)
            if int(image.sum()) != features.shape[0]:
                raise ValueError(f"{int(image.sum())} image tokens for {features.shape[0]} image features")
            embeds = embeds.masked_scatter(image.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))
        elif bool(image.any()):
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        n = int(register.sum())
        if n:
            rows = self.registers[torch.arange(n, device=input_ids.device) % cfg.num_registers]
            embeds = embeds.masked_scatter(register.unsqueeze(-1).expand_as(embeds), rows.to(embeds.dtype))
        if use_every_parameter and features is None:
            size = cfg.vision_config.image_size
            blank = embeds.new_zeros(1, cfg.vision_config.num_channels, size, size)
            unused = torch.cat(self.get_image_features(blank, vision_feature_layer, vision_feature_select_strategy))
            embeds = embeds + 0.0 * unused.sum().to(embeds.dtype)
        if use_every_parameter and not n and cfg.num_registers:
            embeds = embeds + 0.0 * self.registers.sum().to(embeds.dtype)
        return embeds, features

    def run_layers(self, start: int, stop: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
                   cache: Optional[VictorCache], cache_position: torch.Tensor, position_ids: torch.Tensor,
                   **kwargs: Any) -> torch.Tensor:
        """Run decoder layers [start, stop), which share one cache length; position ids only feed RoPE (the
        layers' packed-sequence detection must not see the gaps the drop leaves in them)."""
        lm = self.language_model
        mask = create_causal_mask(config=lm.config, input_embeds=hidden, attention_mask=attention_mask,
                                  cache_position=cache_position, position_ids=position_ids,
                                  past_key_values=_LayerView(cache, start) if cache is not None else None)
        rope = lm.rotary_emb(hidden, position_ids)
        for layer in lm.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, past_key_values=cache, cache_position=cache_position,
                           position_embeddings=rope, **kwargs)
        return hidden

    def run_packed_layers(self, start: int, stop: int, hidden: torch.Tensor, segments: torch.Tensor,
                          position_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run decoder layers [start, stop) over packed rows: a slot attends to the slots of its own segment
        (`segments` [B, S]) up to itself. Flash-attention 2 gets the segments' boundaries over the flattened rows
        (its varlen kernel, `flash_attn_varlen_func`); the other implementations a block-diagonal causal mask."""
        lm = self.language_model
        rope = lm.rotary_emb(hidden, position_ids)
        s = hidden.shape[1]
        implementation = lm.config._attn_implementation
        if implementation == "flash_attention_2":
            cu, longest = runs_of(segments)
            attention = {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                         "max_length_k": longest}
        else:
            causal = torch.ones(s, s, dtype=torch.bool, device=hidden.device).tril()
            allowed = ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)
            if implementation != "sdpa":  # eager and others add the mask to the scores
                allowed = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                    ~allowed, torch.finfo(hidden.dtype).min)
            attention = {"attention_mask": allowed}
        for layer in lm.layers[start:stop]:
            hidden = layer(hidden, position_embeddings=rope, **attention, **kwargs)
        return hidden

    def forward_packed(self, input_ids: torch.LongTensor, pixel_values: Optional[torch.FloatTensor],
                       position_ids: torch.LongTensor, cu_seqlens: torch.Tensor,
                       vision_feature_layer: Optional[Union[int, list[int]]] = None,
                       vision_feature_select_strategy: Optional[str] = None,
                       **kwargs: Any) -> VictorLlavaModelOutputWithPast:
        """Packed rows (training): samples separated by `cu_seqlens` [segments + 1] over the flattened B*S slots,
        `position_ids` restarting at 0 for each sample. No cache. The drop keeps each row's registers and text
        (right-aligned as in `forward`); the fillers become one-slot samples of their own."""
        embeds, features = self.embed(input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                      use_every_parameter=True)
        segments = segment_ids(cu_seqlens, input_ids.shape)
        k = self.config.drop_layer
        hidden = self.run_packed_layers(0, k, embeds, segments, position_ids, **kwargs)
        index, filler = keep_index(input_ids == self.config.image_token_id)
        hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        alone = -1 - torch.arange(filler.numel(), device=filler.device).view_as(filler)
        short_segments = torch.where(filler, alone, segments.gather(1, index))
        hidden = self.run_packed_layers(k, len(self.language_model.layers), hidden, short_segments,
                                        position_ids.gather(1, index), **kwargs)
        return VictorLlavaModelOutputWithPast(last_hidden_state=self.language_model.norm(hidden),
                                              image_hidden_states=features, kept_index=index)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        vision_feature_layer: Optional[Union[int, list[int]]] = None,
        vision_feature_select_strategy: Optional[str] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> VictorLlavaModelOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("VictorLlava needs input_ids (not inputs_embeds): image and register slots are found "
                             "by their token ids")
        if cu_seqlens is not None:
            if position_ids is None or attention_mask is not None or past_key_values is not None or use_cache:
                raise ValueError("packed rows (cu_seqlens) take position_ids restarting per sample, and no "
                                 "attention_mask or cache")
            return self.forward_packed(input_ids, pixel_values, position_ids, cu_seqlens, vision_feature_layer,
                                       vision_feature_select_strategy, **kwargs)
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        cache = victor_cache(past_key_values, use_cache)
        embeds, features = self.embed(input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy)
        b, q = input_ids.shape
        k = self.config.drop_layer
        device = input_ids.device

        # Layers < k: the whole sequence, in the original (long) coordinates.
        past = cache.get_seq_length(0) if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + q, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(b, past + q, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
        hidden = self.run_layers(0, k, embeds, attention_mask, cache, cache_position, position_ids, **kwargs)

        # The drop, then layers >= k over registers and text only, in their own cache coordinates.
        index, filler = keep_index(input_ids == self.config.image_token_id)
        hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        short_positions = position_ids.gather(1, index)
        short_mask = attention_mask[:, -q:].bool().gather(1, index) & ~filler
        short_past = cache.get_seq_length(k) if cache is not None else 0
        if short_past:
            short_mask = torch.cat([cache.short_attention_mask, short_mask], dim=1)
        if cache is not None:
            cache.short_attention_mask = short_mask
        short_cache_position = torch.arange(short_past, short_past + index.shape[1], device=device)
        hidden = self.run_layers(k, len(self.language_model.layers), hidden, short_mask, cache, short_cache_position,
                                 short_positions, **kwargs)
        return VictorLlavaModelOutputWithPast(last_hidden_state=self.language_model.norm(hidden),
                                              past_key_values=cache, image_hidden_states=features, kept_index=index)


class VictorLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with Victor registers; `generate()` works as for llava-hf models, with the processor's inputs.

    Logits (and the loss) cover the slots that survive the drop: `kept_index` maps them to input positions.
    Labels follow the HF convention (input positions, unshifted); image and register slots never carry a loss.
    Packed rows (`cu_seqlens`, see `VictorLlavaModel.forward_packed`) take `shift_labels` instead: the target of
    each input slot (already shifted, -100 where none, always at image slots), so that no sample predicts the next
    one's first token.
    """

    config_class = VictorLlavaConfig

    def __init__(self, config: VictorLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = VictorLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        vision_feature_layer: Optional[Union[int, list[int]]] = None,
        vision_feature_select_strategy: Optional[str] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cu_seqlens: Optional[torch.Tensor] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        **kwargs: Any,
    ) -> VictorLlavaCausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=vision_feature_select_strategy, use_cache=use_cache,
                         cache_position=cache_position, cu_seqlens=cu_seqlens, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            cfg = self.config
            special = input_ids == cfg.image_token_id
            if cfg.num_registers:
                special |= input_ids == cfg.register_token_id
            labels = labels.masked_fill(special, IGNORE_INDEX).gather(1, out.kept_index)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.text_config.vocab_size, **kwargs)
        elif shift_labels is not None:  # the last register slot of an image predicts the text after it
            loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels.gather(1, out.kept_index),
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        return VictorLlavaCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                                 image_hidden_states=out.image_hidden_states,
                                                 kept_index=out.kept_index)


__all__ = ["VictorCache", "VictorLlavaForConditionalGeneration", "VictorLlavaModel"]
