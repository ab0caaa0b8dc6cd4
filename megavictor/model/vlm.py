"""`VictorVLM`: a LLaVA-style VLM with Victor registers, assembled from megatron-core parts.

Per pipeline stage it builds only what that stage runs: the first stage holds the CLIP ViT, the projector, the
word embedding and the registers; the last stage the output layer and loss; every stage its decoder layers.
The stage whose layers include k drops the visual slots (inside `VictorTransformerLayer`), so later stages
receive shorter sequences.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megavictor.config import Config
from megavictor.model import specs
from megavictor.model.batch import VictorBatch
from megavictor.model.drop_plan import (DropPlan, build_drop_plan, gather_visual, scatter_image_slots,
                                        uses_packed_attention)
from megavictor.model.peers import image_slot_fill, learned_registers
from megavictor.model.recipe import apply_freezing
from megavictor.model.sharding import first_layer
from megavictor.model.specs import DropPlanParams
from megavictor.model.visual_select import TowerOutputs, tower_readout
from megavictor.model.weight_init import initialize


def build_vision_tower(cfg: Config) -> CLIPViTModel:
    """The CLIP-style ViT of `cfg.vision` (also what `megavictor prep digits` pretrains as the demo's encoder)."""
    v, backend = cfg.vision, cfg.train.attention_backend
    return CLIPViTModel(specs.vision_config(cfg), specs.vision_layer_spec(backend),
                        ln_pre_impl=specs.vision_norm(backend), ln_post_impl=None,
                        add_class_token=True, class_token_len=1,
                        patch_dim=v.patch_size, img_h=v.image_size, img_w=v.image_size)


class VictorVLM(MegatronModule):
    """One pipeline stage (or the whole model) of the Victor VLM."""

    def __init__(self, cfg: Config, layers_per_stage: list[int], pre_process: bool = True,
                 post_process: bool = True) -> None:
        lm_config: TransformerConfig = specs.language_config(cfg, layers_per_stage)
        super().__init__(config=lm_config)
        self.cfg = cfg
        # Read by megatron's schedules and finalize_model_grads: untied output layer (LLaMA), no learned positions.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.vision = build_vision_tower(cfg)
            self.projector = MultimodalProjector(
                specs.projector_config(cfg),
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                projector_type="mlp", input_size=cfg.vision.hidden_size)
            # Scattered along the sequence (sequence parallelism) only after the image slots are filled.
            self.embedding = LanguageModelEmbedding(lm_config, vocab_size=cfg.model.vocab_size,
                                                    max_sequence_length=cfg.data.seq_length,
                                                    position_embedding_type="rope",
                                                    scatter_to_sequence_parallel=False)
            registers = learned_registers(cfg)
            self.registers = (torch.nn.Parameter(torch.empty(registers, cfg.model.hidden_size,
                                                             dtype=lm_config.params_dtype))
                              if registers else None)
            # LLaVA-NeXT's learned row end of each image's tile grid (anyres only); replicated like the registers.
            self.image_newline = (torch.nn.Parameter(torch.empty(cfg.model.hidden_size, dtype=lm_config.params_dtype))
                                  if cfg.vision.anyres() else None)
        self.packed = uses_packed_attention(cfg)
        self.decoder = TransformerBlock(lm_config, specs.decoder_block_spec(cfg, lm_config),
                                        pre_process=pre_process, post_process=post_process)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                cfg.model.hidden_size, cfg.model.vocab_size, config=specs.local_layer_config(lm_config),
                init_method=lm_config.init_method, bias=False, gather_output=False, skip_bias_add=False)
        self.layer_offset = first_layer(layers_per_stage, parallel_state.get_pipeline_model_parallel_rank())
        initialize(self, cfg.model.init_method_std, cfg.model.num_layers, cfg.train.seed,
                   tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp=cfg.parallel.tp,
                   layer_offset=self.layer_offset)
        apply_freezing(self, cfg)

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        """Called by megatron's pipeline schedule with the activation received from the previous stage."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, batch: VictorBatch, plan: DropPlan) -> torch.Tensor:
        """First stage: word embeddings with image and register slots filled in, in the decoder's dimension order ([S, B, H],
        or [B*S, 1, H] packed), this rank's slice of the sequence under sequence parallelism. The ViT and the
        projector run on whole images on every tensor-parallel rank (no sequence parallelism of their own)."""
        words = self.embedding(input_ids=batch.tokens, position_ids=None)  # [S, B, H]
        visual, tower = None, None
        if batch.images.shape[0]:
            with tower_readout(self.cfg, self.vision) as qkv:
                features = self.vision(batch.images.to(words.dtype))[:, 1:]  # drop the class token
            # The ViT's layers run sequence-first: the captured q/k/v is [1 + V, N, 3 * Hv].
            tower = TowerOutputs(batch.images, features, self.projector, qkv[0].transpose(0, 1) if qkv else None)
            visual = gather_visual(self.projector(features), self.image_newline, plan.image_slots)
        filled = scatter_image_slots(words.transpose(0, 1), plan.image_slots, visual,
                                     image_slot_fill(self.cfg, visual, self.registers, tower))
        if visual is None:
            filled = filled + self._image_path_at_zero()
        # Contiguous in sequence-first order: elementwise layers keep strides, and p2p sends need contiguous tensors.
        hidden = plan.sequence_first(filled).contiguous()
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden).clone()
        return hidden

    def _image_path_at_zero(self) -> torch.Tensor:
        """0 times what the trainable image path (ViT, projector, registers, image newline) makes of a blank image, for a
        micro-batch without images, so that each of their parameters still receives a gradient (zero), as LLaVA
        appends an empty slice of image features to text-only samples. megatron's DDP counts every parameter's
        gradient in every micro-batch: with `overlap_grad_reduce`, a bucket whose parameters get none in the step's
        last micro-batch is never reduced and the step fails ("Communication call has not been issued for this
        bucket"). The modules run their forward (one blank image through a trainable ViT, one zero feature
        through the projector) rather than touching parameters directly: with `overlap_param_gather` it is each
        module's forward that waits for its parameters' all-gather."""
        weight = self.embedding.word_embeddings.weight
        total = torch.zeros((), dtype=weight.dtype, device=weight.device)
        v = self.cfg.vision
        if any(p.requires_grad for p in self.vision.parameters()):
            blank = torch.zeros(1, 3, v.image_size, v.image_size, dtype=weight.dtype, device=weight.device)
            features = self.vision(blank)[:, 1:]
        else:
            features = torch.zeros(1, 1, v.hidden_size, dtype=weight.dtype, device=weight.device)
        if any(p.requires_grad for p in self.projector.parameters()):
            total = total + self.projector(features).sum()
        for extra in (self.registers, self.image_newline):
            if extra is not None and extra.requires_grad:
                total = total + extra.sum()
        return total * 0.0

    def forward(self, batch: VictorBatch, plan: DropPlan | None = None, return_logits: bool = False) -> torch.Tensor:
        """Hidden states to send on (inner stages), or on the last stage per-slot losses [B, S'] (masked by the
        plan's loss mask), or with `return_logits` the full-vocabulary logits [B, S', V]."""
        plan = plan if plan is not None else build_drop_plan(batch, self.cfg, packed=self.packed)
        hidden = self.embed(batch, plan) if self.pre_process else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, packed_seq_params=DropPlanParams(plan=plan))
        if not self.post_process:
            return hidden
        logits, _ = self.output_layer(hidden)  # [S', B, V / tp] (whole sequence: gathered under SP)
        if return_logits:
            return plan.batch_first(tensor_parallel.gather_from_tensor_model_parallel_region(logits))
        labels = plan.output_view.labels
        mask = labels >= 0
        targets = plan.sequence_first(torch.where(mask, labels, 0)).contiguous()
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
        return plan.batch_first(losses) * mask
