"""Victor LLaVA in vLLM: the stock LLaVA parts (vision tower, projector, the Llama / Mistral / Qwen2 decoder) with
the drop in the decoder loop.

Each image's placeholder is its visual tokens followed by R register tokens; `embed_multimodal` returns the
image's projected features followed by the learned registers, so chunked prefill may split an image anywhere.
Layers < k run on every scheduled token. Then the visual tokens are dropped: layers >= k run on the others, at
their original positions, with attention metadata rebuilt in short coordinates (`ShortBatch`), and write their KV
into the short group's blocks (`short_cache`). The final hidden states are scattered back to the scheduled tokens
for the sampler.

What the rebuild needs per request is how many of its tokens before this step were visual. vLLM hands models the
prompt tokens before each request's first scheduled token (`token_lookback_depth`), so the model stays stateless
under continuous batching, chunked prefill and preemption.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec

from .short_cache import VictorShortSpec


class VictorShortAttention(Attention):
    """The attention of a layer >= k: the same computation, its KV cache in the short group."""

    image_token_id: int

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> VictorShortSpec:
        spec = super().get_kv_cache_spec(vllm_config)
        return VictorShortSpec(**{f.name: getattr(spec, f.name) for f in fields(AttentionSpec)},
                               image_token_id=self.image_token_id)


class VictorLlavaProcessor(LlavaMultiModalProcessor):
    """Each `<image>` becomes the image's visual tokens followed by its register tokens (the HF processor's layout)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        registers = [config.register_token_id] * config.num_registers

        def replacement(item: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                raise ValueError("Victor models take images, not image embeddings (the registers read the image)")
            size = images.get_image_size(item)
            visual = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            return [config.image_token_index] * visual + registers

        return [PromptReplacement(modality="image", target=[config.image_token_index], replacement=replacement)]


@dataclass
class ShortBatch:
    """The scheduled tokens that layers >= k see, and their attention metadata in short coordinates."""

    kept: torch.Tensor  # [kept tokens] indices into the scheduled tokens
    source: torch.Tensor  # [scheduled tokens] the kept token whose final hidden state each scheduled token takes
    metadata: dict[str, Any]  # short layer name -> attention metadata
    slots: dict[str, torch.Tensor]  # short layer name -> KV slot of each kept token

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The short metadata in vLLM's forward context while layers >= k run (the runner built long ones)."""
        context = get_forward_context()
        saved = {name: (context.attn_metadata[name], context.slot_mapping.get(name)) for name in self.metadata}
        context.attn_metadata.update(self.metadata)
        context.slot_mapping.update(self.slots)
        try:
            yield
        finally:
            for name, (metadata, slots) in saved.items():
                context.attn_metadata[name] = metadata
                context.slot_mapping[name] = slots


@MULTIMODAL_REGISTRY.register_processor(VictorLlavaProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VictorLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with Victor's registers and drop (the HF export's `VictorLlavaForConditionalGeneration`)."""

    requires_raw_input_tokens = True  # the drop finds visual tokens by their id
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        **LlavaForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix, "model.registers": "registers"})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        special = [config.image_token_index] + ([config.register_token_id] if config.num_registers else [])
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size, mm_token_ids=special)
        self.image_token_id = config.image_token_index
        self.drop_layer = config.drop_layer
        self.registers = nn.Parameter(torch.empty(config.num_registers, config.text_config.hidden_size,
                                                  dtype=vllm_config.model_config.dtype)) \
            if config.num_registers else None
        # The prompt tokens before each request's first scheduled token, as deep as a request can be long.
        self.token_lookback_depth = vllm_config.model_config.max_model_len
        self.vllm_config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.short_layers: list[str] = []
        for layer in self.language_model.model.layers[self.drop_layer:]:
            attention = layer.self_attn.attn
            if type(attention) is not Attention:
                raise ValueError(f"Victor serving supports decoder layers with vLLM's Attention, not "
                                 f"{type(attention).__name__}")
            attention.__class__ = VictorShortAttention
            attention.image_token_id = self.image_token_id
            self.short_layers.append(attention.layer_name)
        self._builder: Any = None
        # The export's generation config suppresses the image token (it is not text); vLLM leaves that to models.
        generation = vllm_config.model_config.try_get_generation_config() or {}
        self.register_buffer("suppressed", torch.tensor(generation.get("suppress_tokens") or [], dtype=torch.long),
                             persistent=False)

    def embed_multimodal(self, **kwargs: object) -> Any:
        """Each image's projected features, then the registers: the embeddings of its whole placeholder."""
        features = super().embed_multimodal(**kwargs)
        if self.registers is None or len(features) == 0:
            return features
        return [torch.cat([f, self.registers.to(f.dtype)]) for f in features]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, lookback_token_ids: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise ValueError("Victor serving does not support pipeline parallelism (the drop changes the shapes "
                             "stages pass)")
        model = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = model.embed_input_ids(input_ids)
        hidden, residual = inputs_embeds, None
        for layer in model.layers[:self.drop_layer]:
            hidden, residual = layer(positions, hidden, residual)
        short = self.short_batch(input_ids, lookback_token_ids)
        if short.kept.numel() == 0:  # every scheduled token is visual: nothing to sample from
            return hidden.new_zeros(hidden.shape)
        hidden, residual, short_positions = hidden[short.kept], residual[short.kept], positions[short.kept]
        with short.installed():
            for layer in model.layers[self.drop_layer:]:
                hidden, residual = layer(short_positions, hidden, residual)
        hidden, _ = model.norm(hidden, residual)
        # A dropped token takes the hidden state of its request's last kept token before it (the HF export's
        # logits for a prompt that ends on an image); only a chunk's last token is ever sampled.
        out = hidden[short.source.clamp(min=0)]
        return out.masked_fill((short.source < 0)[:, None], 0.0)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        if logits is not None and self.suppressed.numel():
            logits = logits.index_fill(-1, self.suppressed, float("-inf"))
        return logits

    def short_batch(self, input_ids: torch.Tensor, lookback: torch.Tensor | None) -> ShortBatch:
        """Which scheduled tokens layers >= k see, and their attention metadata in short coordinates.

        A request's short index of a token is its number of non-visual tokens before it; its short sequence length
        is the long one minus its visual tokens. Requests with no kept token in this step are left out.
        """
        visual = input_ids == self.image_token_id
        kept_mask = ~visual
        context = get_forward_context()
        long_metadata = context.attn_metadata if isinstance(context.attn_metadata, dict) else None
        if not long_metadata:  # a profiling run: no KV cache yet
            kept = kept_mask.nonzero().flatten()
            source = torch.cumsum(kept_mask.long(), 0) - 1
            return ShortBatch(kept, source, {}, {})
        reference = long_metadata[self.short_layers[0]]
        query_start = reference.query_start_loc.long()
        num_reqs = query_start.numel() - 1
        n = int(query_start[-1])
        kept_mask[n:] = False  # padding after the scheduled tokens
        query_lengths = query_start.diff()
        request = torch.repeat_interleave(torch.arange(num_reqs, device=input_ids.device), query_lengths)
        if lookback is None:
            raise RuntimeError("Victor serving needs vLLM's lookback_token_ids (the V1 model runner gives them; the "
                               "plugin's config hook selects it)")
        visual_before = (lookback[:num_reqs] == self.image_token_id).sum(1)
        computed_short = reference.seq_lens.long() - query_lengths - visual_before
        kept_per_request = torch.zeros(num_reqs, dtype=torch.long, device=input_ids.device).index_add_(
            0, request, kept_mask[:n].long())
        seen = torch.cumsum(kept_mask[:n].long(), 0)  # kept tokens up to and including each token, over the batch
        first_kept = torch.cumsum(kept_per_request, 0) - kept_per_request  # kept tokens of earlier requests
        rank = seen - 1 - first_kept[request]  # a kept token's index among its request's kept tokens in this step
        source = torch.full_like(input_ids, -1, dtype=torch.long)
        source[:n] = torch.where(rank >= 0, seen - 1, -1)
        kept = kept_mask.nonzero().flatten()
        kept_request = request[kept]
        short_index = computed_short[kept_request] + rank[kept]
        rows = (kept_per_request > 0).nonzero().flatten()
        lengths = kept_per_request[rows]
        query_start_short = torch.zeros(rows.numel() + 1, dtype=torch.int32, device=input_ids.device)
        query_start_short[1:] = torch.cumsum(lengths, 0)
        seq_lens_short = (computed_short[rows] + lengths).to(torch.int32)
        metadata: dict[str, Any] = {}
        slots: dict[str, torch.Tensor] = {}
        built: dict[int, tuple[Any, torch.Tensor]] = {}
        first: Any = None
        for name in self.short_layers:
            group_metadata = long_metadata[name]
            if id(group_metadata) not in built:  # one block table per short KV cache group
                block_table = group_metadata.block_table[:num_reqs]
                slot = (block_table[kept_request, short_index // self.block_size].long() * self.block_size
                        + short_index % self.block_size)
                if first is not None and is_dataclass(first) and {"block_table", "slot_mapping"} <= {
                        f.name for f in fields(first)}:
                    # The groups differ only in their blocks: the first group's metadata with this group's.
                    built[id(group_metadata)] = (
                        replace(first, block_table=block_table[rows], slot_mapping=slot), slot)
                else:
                    common = CommonAttentionMetadata(
                        query_start_loc=query_start_short, query_start_loc_cpu=query_start_short.cpu(),
                        seq_lens=seq_lens_short, num_reqs=rows.numel(), num_actual_tokens=kept.numel(),
                        max_query_len=int(lengths.max()) if rows.numel() else 0,
                        max_seq_len=int(seq_lens_short.max()) if rows.numel() else 0,
                        block_table_tensor=block_table[rows], slot_mapping=slot, causal=True)
                    first = self.builder(name).build(0, common)
                    built[id(group_metadata)] = (first, slot)
            metadata[name], slots[name] = built[id(group_metadata)]
        return ShortBatch(kept, source, metadata, slots)

    def builder(self, layer_name: str) -> Any:
        """The attention backend's metadata builder for the short layers (their groups share one spec), made once."""
        if self._builder is None:
            layer = self.vllm_config.compilation_config.static_forward_context[layer_name]
            self._builder = layer.get_attn_backend().get_builder_cls()(
                layer.get_kv_cache_spec(self.vllm_config), self.short_layers, self.vllm_config,
                self.language_model.model.norm.weight.device)
        return self._builder
