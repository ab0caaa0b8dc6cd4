"""Victor LLaVA for transformers (standalone: imports only torch and transformers, so it ships with exports).

The stock LLaVA parts are reused as they are (CLIP vision tower, projector, Llama decoder layers, masks, rotary
embedding); what differs is the decoder loop, one mixin (`VictorDecoderMixin`, `VictorGenerationMixin`) on top of
LLaVA-1.5 (`VictorLlava*`) and of LLaVA-NeXT (`VictorLlavaNext*`, anyres images: each image's visual tokens are its
base view, then its tile grid's rows each closed by the newline, `pack_image_features`' order, all `<image>` slots).
Each image's `<image>` slots are followed by `num_registers` `<register>` slots holding learned embeddings. Layers
< `drop_layer` see the whole sequence; then the visual slots are gathered out, and the remaining layers, and their
KV cache, see only registers and text. Every token keeps its original position id, so decoding continues from the
last original position.

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

import inspect
from dataclasses import dataclass, fields
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
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextPreTrainedModel,
    image_size_to_num_patches,
)
from transformers.utils import can_return_tuple

from .configuration_victor_llava import VictorLlavaConfig, VictorLlavaNextConfig
from .victor_drop import keep_index, runs_of, segment_ids

IGNORE_INDEX = -100
# transformers changed these APIs between the lines users bring (4.57, 5.19 which vLLM installs, the newest 5.x):
# 5.x sizes masks per cache layer (`create_causal_mask(..., layer_idx=)`) and drops `cache_position`; 5.x renamed
# `input_embeds` to `inputs_embeds`; later 5.x renamed the cache argument and output field `past_key_values` to
# `cache` and moved image features out of the output. Each is detected by what the installed version accepts, not
# by its version number, because the changes did not land together.
CACHE = "cache" if "cache" in inspect.signature(LlavaModel.forward).parameters else "past_key_values"
MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
HAS_IMAGE_HIDDEN_STATES = "image_hidden_states" in {f.name for f in fields(LlavaModelOutputWithPast)}


class VictorCache(DynamicCache):
    """A dynamic cache whose layers >= drop_layer hold fewer tokens, plus the padding mask of those layers.

    `short_attention_mask` [B, tokens cached in the short layers] marks the real (non-padding, non-filler) slots.
    Beam search needs no reordering of it: every beam of a prompt has the same prefix and only ones after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.short_attention_mask: Optional[torch.Tensor] = None

    def crop(self, *args: Any) -> None:
        raise NotImplementedError("VictorCache cannot be cropped to one length: its layers hold different numbers "
                                  "of tokens (assisted decoding is not supported)")


class _LayerView:
    """One cache layer's mask sizes, for transformers 4's `create_causal_mask`, which otherwise reads layer 0's."""

    def __init__(self, cache: Cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self.cache.get_mask_sizes(cache_position, self.layer_idx)


def causal_mask(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, cache: Optional[Cache],
                first_layer: int, past: int) -> Any:
    """The causal + padding mask of layers from `first_layer` on, sized by that layer's cache (`past` tokens).
    No position ids: the packed-sequence detection must not see the gaps the drop leaves in them."""
    embeds = "inputs_embeds" if "inputs_embeds" in MASK_PARAMETERS else "input_embeds"
    cache_argument = "cache" if "cache" in MASK_PARAMETERS else "past_key_values"
    if "layer_idx" in MASK_PARAMETERS:
        return create_causal_mask(config=config, attention_mask=attention_mask, layer_idx=first_layer,
                                  **{embeds: hidden, cache_argument: cache})
    cache_position = torch.arange(past, past + hidden.shape[1], device=hidden.device)
    return create_causal_mask(config=config, attention_mask=attention_mask, cache_position=cache_position,
                              **{embeds: hidden,
                                 cache_argument: _LayerView(cache, first_layer) if cache is not None else None})


def concatenated(features: Any) -> torch.Tensor:
    """What a stock `get_image_features` returns, one tensor per image (transformers 5 wraps them in an output's
    `pooler_output`), as [all images' tokens, hidden]."""
    return torch.cat(list(getattr(features, "pooler_output", features)), dim=0)


def with_cache(output_class: type, cache: Optional[Cache], features: Optional[torch.Tensor], **fields: Any) -> Any:
    """An output with the cache under this transformers' field name, and the image features where it has
    `image_hidden_states` (later 5.x replaced it by an `image_outputs` that Victor has no use for)."""
    if HAS_IMAGE_HIDDEN_STATES:
        fields["image_hidden_states"] = features
    return output_class(**fields, **{CACHE: cache})


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


class VictorDecoderMixin:
    """The Victor model on top of the stock LLaVA model that follows this mixin in the bases: registers scattered
    into their slots, the drop at `drop_layer`, the short cache, packed rows. The subclass gives its stock image
    path (`image_features`) and a blank image for it (`blank_image`)."""

    def __init__(self, config: VictorLlavaConfig | VictorLlavaNextConfig) -> None:
        if config.num_registers and config.register_token_id is None:
            raise ValueError(f"{type(config).__name__}.register_token_id is required when num_registers > 0")
        super().__init__(config)
        text = config.text_config
        # None without registers: a parameter of size 0 would be reported as "newly initialized" on every load.
        self.registers = nn.Parameter(torch.randn(config.num_registers, text.hidden_size) * text.initializer_range) \
            if config.num_registers else None

    def image_features(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor],
                       layer: Optional[Union[int, list[int]]], strategy: Optional[str]) -> torch.Tensor:
        """The projected features of all images in their `<image>` slots' order, [image tokens, hidden]."""
        raise NotImplementedError

    def blank_image(self, like: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`image_features`' inputs (pixel values, image sizes) for one blank image, in `like`'s dtype and device."""
        raise NotImplementedError

    def embed(self, input_ids: torch.LongTensor, pixel_values: Optional[torch.FloatTensor],
              image_sizes: Optional[torch.Tensor], vision_feature_layer: Optional[Union[int, list[int]]],
              vision_feature_select_strategy: Optional[str],
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
            features = self.image_features(pixel_values, image_sizes, vision_feature_layer,
                                           vision_feature_select_strategy)
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
            unused = self.image_features(*self.blank_image(embeds), vision_feature_layer,
                                         vision_feature_select_strategy)
            embeds = embeds + 0.0 * unused.sum().to(embeds.dtype)
        if use_every_parameter and not n and cfg.num_registers:
            embeds = embeds + 0.0 * self.registers.sum().to(embeds.dtype)
        return embeds, features

    def run_layers(self, start: int, stop: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
                   cache: Optional[VictorCache], past: int, position_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run decoder layers [start, stop), which share one cache length (`past` tokens); position ids only feed
        RoPE."""
        lm = self.language_model
        mask = causal_mask(lm.config, hidden, attention_mask, cache, start, past)
        rope = lm.rotary_emb(hidden, position_ids)
        for layer in lm.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, **{CACHE: cache}, **kwargs)
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
                       vision_feature_select_strategy: Optional[str] = None, image_sizes: Optional[torch.Tensor] = None,
                       **kwargs: Any) -> VictorLlavaModelOutputWithPast:
        """Packed rows (training): samples separated by `cu_seqlens` [segments + 1] over the flattened B*S slots,
        `position_ids` restarting at 0 for each sample. No cache. The drop keeps each row's registers and text
        (right-aligned as in `forward`); the fillers become one-slot samples of their own."""
        embeds, features = self.embed(input_ids, pixel_values, image_sizes, vision_feature_layer,
                                      vision_feature_select_strategy, use_every_parameter=True)
        segments = segment_ids(cu_seqlens, input_ids.shape)
        k = self.config.drop_layer
        hidden = self.run_packed_layers(0, k, embeds, segments, position_ids, **kwargs)
        index, filler = keep_index(input_ids == self.config.image_token_id)
        hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        alone = -1 - torch.arange(filler.numel(), device=filler.device).view_as(filler)
        short_segments = torch.where(filler, alone, segments.gather(1, index))
        hidden = self.run_packed_layers(k, len(self.language_model.layers), hidden, short_segments,
                                        position_ids.gather(1, index), **kwargs)
        return with_cache(VictorLlavaModelOutputWithPast, None, features,
                          last_hidden_state=self.language_model.norm(hidden), kept_index=index)

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
        cu_seqlens: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        image_sizes: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> VictorLlavaModelOutputWithPast:
        """`cache` (transformers 5) and `past_key_values` (4) are the same argument; a `cache_position` from
        transformers 4's `generate` is not needed (the cache knows its lengths). `image_sizes` [images, 2]: each
        image's (height, width), LLaVA-NeXT's only."""
        past_key_values = cache if cache is not None else past_key_values
        kwargs.pop("cache_position", None)
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("VictorLlava needs input_ids (not inputs_embeds): image and register slots are found "
                             "by their token ids")
        if cu_seqlens is not None:
            if position_ids is None or attention_mask is not None or past_key_values is not None or use_cache:
                raise ValueError("packed rows (cu_seqlens) take position_ids restarting per sample, and no "
                                 "attention_mask or cache")
            return self.forward_packed(input_ids, pixel_values, position_ids, cu_seqlens, vision_feature_layer,
                                       vision_feature_select_strategy, image_sizes, **kwargs)
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        cache = victor_cache(past_key_values, use_cache)
        embeds, features = self.embed(input_ids, pixel_values, image_sizes, vision_feature_layer,
                                      vision_feature_select_strategy)
        b, q = input_ids.shape
        k = self.config.drop_layer
        device = input_ids.device

        # Layers < k: the whole sequence, in the original (long) coordinates.
        past = cache.get_seq_length(0) if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + q, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
        hidden = self.run_layers(0, k, embeds, attention_mask, cache, past, position_ids, **kwargs)

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
        hidden = self.run_layers(k, len(self.language_model.layers), hidden, short_mask, cache, short_past,
                                 short_positions, **kwargs)
        return with_cache(VictorLlavaModelOutputWithPast, cache, features,
                          last_hidden_state=self.language_model.norm(hidden), kept_index=index)


class VictorLlavaModel(VictorDecoderMixin, LlavaModel):
    config_class = VictorLlavaConfig

    def image_features(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor],
                       layer: Optional[Union[int, list[int]]], strategy: Optional[str]) -> torch.Tensor:
        """LLaVA-1.5's: every image V tokens (`image_sizes` plays no part)."""
        return concatenated(self.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                    vision_feature_select_strategy=strategy))

    def blank_image(self, like: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        vision = self.config.vision_config
        return like.new_zeros(1, vision.num_channels, vision.image_size, vision.image_size), None


class VictorLlavaNextModel(VictorDecoderMixin, LlavaNextModel):
    config_class = VictorLlavaNextConfig

    def image_features(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor],
                       layer: Optional[Union[int, list[int]]], strategy: Optional[str]) -> torch.Tensor:
        """LLaVA-NeXT's: the views of each image ([images, most views, C, H, W] as the processor pads them, or the
        views concatenated) through the ViT and projector, then per image its base view's features and its unpadded
        grid row by row, each row closed by `image_newline`."""
        if image_sizes is None:
            raise ValueError("VictorLlavaNext needs image_sizes with pixel_values (the processor gives both)")
        return concatenated(self.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                                    vision_feature_layer=layer,
                                                    vision_feature_select_strategy=strategy))

    def blank_image(self, like: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A blank square image of one tile's size, with its base view and grid tiles."""
        vision = self.config.vision_config
        size = vision.image_size
        views = image_size_to_num_patches((size, size), self.config.image_grid_pinpoints, size)
        return (like.new_zeros(views, vision.num_channels, size, size),
                torch.tensor([[size, size]], device=like.device))


def targets_of(labels: torch.Tensor, input_ids: torch.Tensor,
               config: VictorLlavaConfig | VictorLlavaNextConfig) -> torch.Tensor:
    """HF `labels` (input positions, unshifted) -> the target of each input slot, shifted in the input's own
    coordinates, before the drop: a slot followed by an image or register slot predicts nothing, as in megavictor's
    training. (Shifting after the drop would make, with no registers, the last text token before an image predict
    the first one after it.)"""
    special = input_ids == config.image_token_id
    if config.num_registers:
        special |= input_ids == config.register_token_id
    labels = labels.masked_fill(special, IGNORE_INDEX)
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


class VictorGenerationMixin:
    """LLaVA with Victor registers, on top of the stock `*ForConditionalGeneration` that follows this mixin in the
    bases; `generate()` works as for llava-hf models, with the processor's inputs.

    Logits (and the loss) cover the slots that survive the drop: `kept_index` maps them to input positions.
    Labels follow the HF convention (input positions, unshifted); image and register slots never carry a loss.
    Packed rows (`cu_seqlens`, see `VictorDecoderMixin.forward_packed`) take `shift_labels` instead: the target of
    each input slot (already shifted, -100 where none, always at image slots), so that no sample predicts the next
    one's first token.
    """

    pretrained_class: type  # the stock class's base, whose `__init__` builds no model
    model_class: type  # the Victor model

    def __init__(self, config: VictorLlavaConfig | VictorLlavaNextConfig) -> None:
        self.pretrained_class.__init__(self, config)
        self.model = self.model_class(config)
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
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cu_seqlens: Optional[torch.Tensor] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        image_sizes: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> VictorLlavaCausalLMOutputWithPast:
        kwargs.pop("cache_position", None)  # transformers 4's `generate` passes it; the cache knows its lengths
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache if cache is not None else past_key_values,
                         inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=vision_feature_select_strategy, use_cache=use_cache,
                         cu_seqlens=cu_seqlens, image_sizes=image_sizes, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            shift_labels = targets_of(labels, input_ids, self.config)
        if shift_labels is not None:  # the last register slot of an image predicts the text after it
            loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels.gather(1, out.kept_index),
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        features = out.image_hidden_states if HAS_IMAGE_HIDDEN_STATES else None
        return with_cache(VictorLlavaCausalLMOutputWithPast, getattr(out, CACHE), features, loss=loss, logits=logits,
                          kept_index=out.kept_index)


class VictorLlavaForConditionalGeneration(VictorGenerationMixin, LlavaForConditionalGeneration):
    config_class = VictorLlavaConfig
    pretrained_class = LlavaPreTrainedModel
    model_class = VictorLlavaModel


class VictorLlavaNextForConditionalGeneration(VictorGenerationMixin, LlavaNextForConditionalGeneration):
    config_class = VictorLlavaNextConfig
    pretrained_class = LlavaNextPreTrainedModel
    model_class = VictorLlavaNextModel


__all__ = ["VictorCache", "VictorLlavaForConditionalGeneration", "VictorLlavaModel",
           "VictorLlavaNextForConditionalGeneration", "VictorLlavaNextModel"]
