"""How megatron-core builds our layers: TransformerConfigs from our Config, and the layer specs (local or TE).

The Victor drop lives in `VictorTransformerLayer`, a megatron `TransformerLayer` subclass selected by the spec, so
the same drop works with the local layers (CPU) and the Transformer Engine layers (GPU).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.activations import quick_gelu
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megavictor.compat import SequenceParallelTorchNorm
from megavictor.config import (AttentionBackend, Config, ConfigError, Precision, Recompute, RecomputeMethod,
                               VisionActivation)
from megavictor.model.drop_plan import DropPlan, SequenceView, uses_packed_attention
from megavictor.model.peers import run_layer

def _apex_grad_accum_fusion() -> bool:
    """APEX's `fused_weight_gradient_mlp_cuda`, which megatron's local (tensor-parallel) linear layers need for
    gradient-accumulation fusion; Transformer Engine's layers bring their own (`fuse_wgrad_accumulation`)."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available


def softmax_kernels_available() -> bool:
    """The fused softmax kernels megatron's local attention imports for `masked_softmax_fusion` (APEX or Megatron-LM's
    fused_kernels build them: `scaled_masked_softmax_cuda` for our explicit masks, `scaled_softmax_cuda` for the
    ViT's unmasked attention). Without them megatron would fail at the first attention of 17-4096 keys."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("scaled_masked_softmax_cuda", "scaled_softmax_cuda"))


def fusions(cfg: Config, te_layers: bool) -> dict[str, bool]:
    """megatron's CUDA fusions: on where CUDA is present (as Megatron-LM's defaults), off on the CPU, where only the
    unfused paths run. The local attention's fused softmax only where its kernels are importable
    (`softmax_kernels_available`). Gradient-accumulation fusion (fp32 weight gradients accumulated straight into
    megatron DDP's `main_grad`) is on where a kernel exists for every linear layer of the config: APEX's for
    megatron's local layers, Transformer Engine's for TE layers (`te_layers`: the config builds only TE linear
    layers).

    RoPE fusion stays off: our layers take per-slot angles (positions restart at every packed sample and survive the
    Victor drop), while megatron's fused RoPE applies one position table to every row. `persist_layer_norm` is APEX's
    persistent LayerNorm kernel, which none of our norms is (RMSNorm, torch or TE norms; megatron's torch norm
    refuses the flag)."""
    cuda = torch.cuda.is_available()
    return dict(masked_softmax_fusion=cuda and softmax_kernels_available(), bias_dropout_fusion=cuda,
                persist_layer_norm=False,
                gradient_accumulation_fusion=cuda and (_apex_grad_accum_fusion() or
                                                      (te_layers and cfg.train.attention_backend == AttentionBackend.TE)),
                apply_rope_fusion=False)


def local_layer_config(config: TransformerConfig) -> TransformerConfig:
    """`config` for a megatron local linear layer next to TE layers (the LM's output layer): gradient-accumulation
    fusion only where APEX provides it (megatron's local layers refuse the flag otherwise)."""
    if not config.gradient_accumulation_fusion or _apex_grad_accum_fusion():
        return config
    return dataclasses.replace(config, gradient_accumulation_fusion=False)


@dataclass
class DropPlanParams(PackedSeqParams):
    """A micro-batch's `DropPlan`, carried to every decoder layer as megatron's `packed_seq_params`.

    `TransformerBlock` hands that one argument to each layer untouched, also through full-layer recompute, whose
    checkpoint function keeps only tensor positional arguments (a plan in `attention_mask` would not survive it).
    """

    plan: DropPlan | None = None


@dataclass
class ThdParams(PackedSeqParams):
    """megatron's THD `PackedSeqParams` of a packed view, with the view's per-token RoPE angles [T, 1, 1, head_dim].

    The layer hands megatron no `rotary_pos_emb` on this path: megatron's unfused THD RoPE splits the tokens per
    packed sequence with `.tolist()` and one `.item()` per sequence, in every layer, for queries and keys (a host
    sync each). The angles already hold one row per token, so the core attention (`RotaryCoreAttention`) rotates
    queries and keys with one elementwise RoPE instead: the same values, no sync."""

    rope: torch.Tensor | None = None


def thd_params(view: SequenceView) -> ThdParams:
    """The THD parameters of a packed view: real lengths, and padded offsets that put its ghost slots (row padding,
    fillers) outside every sequence; and its per-token RoPE angles."""
    packed = view.packed
    return ThdParams(qkv_format="thd", cu_seqlens_q=packed.cu_seqlens, cu_seqlens_kv=packed.cu_seqlens,
                     cu_seqlens_q_padded=packed.cu_seqlens_padded, cu_seqlens_kv_padded=packed.cu_seqlens_padded,
                     max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen, rope=packed.rope)


def rotate_thd(t: torch.Tensor, rope: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """RoPE on THD tokens [T, heads, head_dim] with one angle row per token ([T, 1, 1, head_dim]): what megatron's
    `_apply_rotary_pos_emb_thd` computes when the angles cover every token, without its per-sequence split."""
    return _apply_rotary_pos_emb_bshd(t.unsqueeze(1), rope, rotary_interleaved=config.rotary_interleaved).squeeze(1)


def rotary_core_attention(core_attention: type) -> type:
    """`core_attention` (Transformer Engine's DotProductAttention wrapper) rotating queries and keys by the
    `ThdParams` angles before it attends."""

    class RotaryCoreAttention(core_attention):  # type: ignore[misc, valid-type]
        def forward(self, query, key, value, attention_mask, *args, packed_seq_params=None,
                    **kwargs):  # type: ignore[override]
            if isinstance(packed_seq_params, ThdParams) and packed_seq_params.rope is not None:
                query = rotate_thd(query, packed_seq_params.rope, self.config)
                key = rotate_thd(key, packed_seq_params.rope, self.config)
            return super().forward(query, key, value, attention_mask, *args, packed_seq_params=packed_seq_params,
                                   **kwargs)

    return RotaryCoreAttention


class VictorTransformerLayer(TransformerLayer):
    """A decoder layer that performs the Victor drop and attends with its side of the plan.

    Layer k (and each PyramidDrop layer) gathers the surviving slots before attending; every layer takes its view's
    attention inputs from the plan (`DropPlanParams`) instead of the block's arguments: the mask and RoPE angles, or
    for a packed plan the THD parameters and per-token angles (the original, gapped positions). Under sequence
    parallelism a dropping layer gathers the ranks' slices of the sequence, drops, and keeps its slice of the shorter
    one. Under FastV and PyramidDrop, the layer K-1 before each drop also ranks the visual slots by its attention
    probabilities (`megavictor.model.peers`), which closes the plan's view for layer K.
    """

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, packed_seq_params=None,
                **kwargs):  # type: ignore[override]
        if not isinstance(packed_seq_params, DropPlanParams):
            raise TypeError("VictorTransformerLayer needs the micro-batch's DropPlanParams as packed_seq_params")
        plan = packed_seq_params.plan
        index = self.layer_number - 1  # layer_number is global and 1-based
        if plan.drops_in(index):
            hidden_states = self._drop(plan, hidden_states, index)
        view = plan.view_for_layer(index)
        if view.packed is not None:  # THD on Transformer Engine (FastV, which reads probabilities, is local-only)
            # RoPE is applied by the core attention (`ThdParams`), not by megatron's attention.
            return super().forward(hidden_states, attention_mask=None, rotary_pos_emb=None,
                                   packed_seq_params=thd_params(view), **kwargs)
        forward = lambda: super(VictorTransformerLayer, self).forward(  # noqa: E731
            hidden_states, attention_mask=view.mask, rotary_pos_emb=view.rope, packed_seq_params=None, **kwargs)
        return run_layer(plan, index, getattr(self.self_attention.core_attention, "scale_mask_softmax", None),
                         forward, _mean_over_tensor_parallel)

    def _drop(self, plan: DropPlan, hidden_states: torch.Tensor, index: int) -> torch.Tensor:
        if not self.config.sequence_parallel:
            return plan.drop(hidden_states, layer_index=index)
        # Every rank gathers the whole sequence and drops the same slots, so the backward of the gather is each
        # rank's own slice of the gradient (no reduction: tensor_parallel_output_grad=False).
        whole = tensor_parallel.gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return tensor_parallel.scatter_to_sequence_parallel_region(plan.drop(whole, layer_index=index)).clone()


def _mean_over_tensor_parallel(head_mean: torch.Tensor) -> torch.Tensor:
    """A mean over this rank's attention heads -> the mean over all heads (tensor-parallel ranks hold equal
    shares)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        head_mean = head_mean.clone()
        torch.distributed.all_reduce(head_mean, group=parallel_state.get_tensor_model_parallel_group())
        head_mean /= tp
    return head_mean


def _with_mask_type(spec: ModuleSpec, mask_type: AttnMaskType) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params, "attn_mask_type": mask_type}
    return spec


def _require_te() -> None:
    if importlib.util.find_spec("transformer_engine") is None:
        raise RuntimeError(
            "train.attention_backend=te (or train.fp8) needs Transformer Engine: pip install -e '.[gpu]' on a "
            "CUDA machine, or set train.attention_backend=local train.fp8=null"
        )
    if not torch.cuda.is_available():
        raise RuntimeError("train.attention_backend=te needs a CUDA GPU; use train.attention_backend=local on CPU")


def decoder_layer_spec(backend: AttentionBackend, packed: bool) -> ModuleSpec:
    """LLaMA-style layer (RMSNorm, SwiGLU, RoPE) that performs the Victor drop.

    `packed` (Transformer Engine): THD attention over per-sample sequences, `padding_causal` (the survivors of a
    sample stay one contiguous causal block after the drop), so FlashAttention/FusedAttention run and no [S, S]
    mask exists. Otherwise attention takes an explicit mask (block-diagonal causal over packed samples; text_blind),
    hence `arbitrary` rather than megatron's implicit causal mask.
    """
    if backend == AttentionBackend.TE:
        _require_te()
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = _with_mask_type(spec, AttnMaskType.padding_causal if packed else AttnMaskType.arbitrary)
    if packed:
        attention = spec.submodules.self_attention.submodules
        attention.core_attention = rotary_core_attention(attention.core_attention)
    spec.module = VictorTransformerLayer
    return spec


def decoder_block_spec(cfg: Config, config: TransformerConfig) -> ModuleSpec | TransformerBlockSubmodules:
    """This stage's decoder layers. With the local layers under sequence parallelism, the norms (each layer's and
    the final one) are the sequence-parallel torch norm (`compat.SequenceParallelTorchNorm`): megatron's own torch
    norm refuses sequence parallelism."""
    backend = cfg.train.attention_backend
    spec = decoder_layer_spec(backend, uses_packed_attention(cfg))
    if not (config.sequence_parallel and backend != AttentionBackend.TE):
        return spec
    norm = SequenceParallelTorchNorm
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=norm)


def vision_layer_spec(backend: AttentionBackend) -> ModuleSpec:
    """CLIP ViT layer; bidirectional attention (megatron's local ViT spec says causal, which CLIP is not)."""
    if backend == AttentionBackend.TE:
        _require_te()
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        spec = get_vit_layer_with_transformer_engine_spec()
    else:
        spec = get_vit_layer_with_local_spec()
    return _with_mask_type(spec, AttnMaskType.no_mask)


def vision_norm(backend: AttentionBackend) -> type:
    """The ViT's ln_pre (CLIPViTModel's default is a bare torch LayerNorm, which megatron cannot build)."""
    if backend == AttentionBackend.TE:
        _require_te()
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def _common(cfg: Config, te_layers: bool = True) -> dict:
    """What every megatron config of the model shares: the training precision (megatron builds the parameters in
    bf16 under bf16; `Float16Module` casts what megatron builds with plain torch layers), the CUDA fusions, and the
    initialisation device: on the GPU where there is one (Megatron-LM's default), on the CPU only without CUDA."""
    bf16 = cfg.train.precision == Precision.BF16
    dtype = torch.bfloat16 if bf16 else torch.float32
    return dict(bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
                use_cpu_initialization=not torch.cuda.is_available(), **fusions(cfg, te_layers))


def stage_modules(layers_per_stage: list[int]) -> list[list[str]]:
    """megatron's `pipeline_model_parallel_layout` for an arbitrary per-stage decoder layer split."""
    stages = [["decoder"] * n for n in layers_per_stage]
    stages[0].insert(0, "embedding")
    stages[-1].append("loss")
    return stages


def language_config(cfg: Config, layers_per_stage: list[int]) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias, hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        pipeline_model_parallel_layout=stage_modules(layers_per_stage) if p.pp > 1 else None,
        sequence_parallel=p.sequence_parallel,
        # Stages after the drop receive shorter sequences, and how much shorter depends on the images packed
        # into each micro-batch: shapes are exchanged per send, unless pipeline length buckets make them static
        # (known to every rank in advance). megatron requires the alltoall dispatcher setting for the exchange even
        # in dense models.
        variable_seq_lengths=not p.pipeline_length_buckets, moe_token_dispatcher_type="alltoall",
        calculate_per_token_loss=True,
        fp8=None if t.fp8 is None else str(t.fp8), fp8_recipe=str(t.fp8_recipe), fp8_margin=t.fp8_margin,
        fp8_amax_history_len=t.fp8_amax_history_len, fp8_amax_compute_algo=str(t.fp8_amax_compute_algo),
        # SwiGLU without biases: megatron's fused bias-SwiGLU (its default on GPU) applies.
        bias_activation_fusion=torch.cuda.is_available(),
        **_recompute(cfg, layers_per_stage), **_common(cfg),
    )
    if uses_packed_attention(cfg):
        # THD keeps the original, gapped positions as per-token RoPE angles, which only the unfused THD RoPE
        # (`_apply_rotary_pos_emb_thd`) takes; the fused kernel would restart positions at each sequence.
        config.apply_rope_fusion = False
    return config


def _recompute(cfg: Config, layers_per_stage: list[int]) -> dict:
    """megatron's activation recompute settings. Full recompute re-runs whole layers in backward; the drop plan
    reaches them through `packed_seq_params`, which megatron's checkpointed forward keeps in its closure."""
    t = cfg.train
    if t.recompute != Recompute.FULL:
        return dict(recompute_granularity=None if t.recompute is None else str(t.recompute))
    if t.recompute_method == RecomputeMethod.UNIFORM:
        uneven = [n for n in layers_per_stage if n % t.recompute_num_layers]
        if uneven:
            raise ConfigError(f"train.recompute_num_layers={t.recompute_num_layers} must divide every pipeline "
                              f"stage's layer count {layers_per_stage} with train.recompute_method=uniform")
    return dict(recompute_granularity="full", recompute_method=str(t.recompute_method),
                recompute_num_layers=t.recompute_num_layers)


def vision_config(cfg: Config) -> TransformerConfig:
    v, p = cfg.vision, cfg.parallel
    return TransformerConfig(
        num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads, normalization="LayerNorm", layernorm_epsilon=v.norm_epsilon,
        gated_linear_unit=False, add_bias_linear=True, add_qkv_bias=True,
        activation_func=quick_gelu if v.activation == VisionActivation.QUICK_GELU else F.gelu,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.model.init_method_std,
        # The ViT runs whole on the first pipeline stage: no pipeline split of its own.
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=1,
        # megatron fuses bias + GELU, but not the bias + quick_gelu of an ungated MLP (CLIP's).
        bias_activation_fusion=torch.cuda.is_available() and v.activation == VisionActivation.GELU,
        **_common(cfg),
    )


def projector_config(cfg: Config) -> TransformerConfig:
    """LLaVA-1.5's projector: Linear(vision -> hidden), GELU, Linear(hidden -> hidden), with biases."""
    m, p = cfg.model, cfg.parallel
    return TransformerConfig(
        num_layers=1, hidden_size=m.hidden_size, ffn_hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, gated_linear_unit=False, add_bias_linear=True,
        activation_func=F.gelu, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=1,
        bias_activation_fusion=torch.cuda.is_available(), **_common(cfg, te_layers=False),
    )
