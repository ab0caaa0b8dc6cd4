"""Conversion between megavictor's full state dict and Hugging Face checkpoints (pure functions, no megatron).

The full state dict is `ReferenceVLM`'s: megatron names, fused `linear_qkv` (rows per query group: [q heads of
the group, k, v]) and SwiGLU `linear_fc1` ([gate; up]). HF Llama and megatron both use the rotate-half RoPE
convention, so q/k rows need no permutation within a head. One table of (megavictor name, HF names, join, split)
drives both directions, so import and export cannot drift apart.

The ViT hands the LLM its last layer's patch outputs. A CLIP checkpoint is imported without the layers past
LLaVA's feature layer (-2: CLIP's last layer is dropped) and without `post_layernorm`; on export the HF ViT has
exactly megavictor's layers and `vision_feature_layer=-1` (`post_layernorm`, unused by LLaVA, is written as
identity so the checkpoint is complete).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessor,
    LlavaImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from megavictor.config import Config, ImageAspectRatio, ModelConfig, VictorMask, VisionActivation, VisionConfig, \
    load_config
from megavictor.data.images import CLIP_MEAN, CLIP_STD
from megavictor.hf.configuration_victor_llava import VictorLlavaConfig
from megavictor.hf.processing_victor_llava import VictorLlavaProcessor
from megavictor.model.reference import check_full_state, full_shapes

Tensor = torch.Tensor
IMAGE_TOKEN = "<image>"
REGISTER_TOKEN = "<register>"
LLAVA_FEATURE_LAYER = -2  # LLaVA-1.5 reads CLIP's penultimate layer
REMOTE_CODE = ("configuration_victor_llava.py", "modeling_victor_llava.py", "processing_victor_llava.py",
               "victor_drop.py")
LLAVA_LM, LLAVA_VISION, LLAVA_HEAD = "model.language_model.", "model.vision_tower.vision_model.", "lm_head.weight"


@dataclass(frozen=True)
class _Param:
    """One megavictor tensor and the HF tensors it is made of."""

    ref: str
    hf: tuple[str, ...]
    join: Callable[[list[Tensor]], Tensor]
    split: Callable[[Tensor], list[Tensor]]


def _copy(ref: str, hf: str) -> _Param:
    return _Param(ref, (hf,), lambda ts: ts[0], lambda t: [t])


def _stack(ref: str, hf: list[str]) -> _Param:
    """Row-wise concatenation of equal parts (SwiGLU's [gate; up])."""
    return _Param(ref, tuple(hf), lambda ts: torch.cat(ts, dim=0),
                  lambda t: [part.clone() for part in t.chunk(len(hf), dim=0)])


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int) -> Tensor:
    """HF q/k/v projections (weights or biases) -> megatron's fused rows: per query group [its q heads, k, v]."""
    per_group = lambda t: t.reshape(groups, t.shape[0] // groups, *t.shape[1:])  # noqa: E731
    return torch.cat([per_group(q), per_group(k), per_group(v)], dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: Tensor, heads: int, groups: int) -> list[Tensor]:
    """Inverse of `fuse_qkv`."""
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    grouped = qkv.reshape(groups, (heads // groups + 2) * head_dim, *qkv.shape[1:])
    q, k, v = grouped.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *qkv.shape[1:]).clone() for t in (q, k, v)]


def _qkv(ref: str, hf: list[str], heads: int, groups: int) -> _Param:
    return _Param(ref, tuple(hf), lambda ts: fuse_qkv(*ts, groups=groups), lambda t: split_qkv(t, heads, groups))


def _llm_params(m: ModelConfig, prefix: str, head: str) -> list[_Param]:
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    params = [_copy("embedding.word_embeddings.weight", f"{prefix}embed_tokens.weight"),
              _copy("decoder.final_layernorm.weight", f"{prefix}norm.weight"),
              _copy("output_layer.weight", head)]
    for i in range(m.num_layers):
        ref, hf = f"decoder.layers.{i}.", f"{prefix}layers.{i}."
        params += [
            _copy(ref + "input_layernorm.weight", hf + "input_layernorm.weight"),
            _qkv(ref + "self_attention.linear_qkv.weight", [hf + f"self_attn.{x}_proj.weight" for x in "qkv"],
                 heads, groups),
            _copy(ref + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight"),
            _copy(ref + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
            _stack(ref + "mlp.linear_fc1.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]),
            _copy(ref + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight"),
        ]
    return params


def _vision_params(v: VisionConfig, prefix: str) -> list[_Param]:
    emb = prefix + "embeddings."
    params = [_copy("vision.conv1.weight", emb + "patch_embedding.weight"),
              _Param("vision.class_token", (emb + "class_embedding",), lambda ts: ts[0].view(1, 1, -1),
                     lambda t: [t.flatten()]),
              _copy("vision.position_embeddings.weight", emb + "position_embedding.weight")]
    params += [_copy(f"vision.ln_pre.{p}", f"{prefix}pre_layrnorm.{p}") for p in ("weight", "bias")]
    for i in range(v.num_layers):
        ref, hf = f"vision.decoder.layers.{i}.", f"{prefix}encoder.layers.{i}."
        for p in ("weight", "bias"):
            params += [
                _copy(ref + f"input_layernorm.{p}", hf + f"layer_norm1.{p}"),
                _qkv(ref + f"self_attention.linear_qkv.{p}", [hf + f"self_attn.{x}_proj.{p}" for x in "qkv"],
                     v.num_attention_heads, v.num_attention_heads),
                _copy(ref + f"self_attention.linear_proj.{p}", hf + f"self_attn.out_proj.{p}"),
                _copy(ref + f"pre_mlp_layernorm.{p}", hf + f"layer_norm2.{p}"),
                _copy(ref + f"mlp.linear_fc1.{p}", hf + f"mlp.fc1.{p}"),
                _copy(ref + f"mlp.linear_fc2.{p}", hf + f"mlp.fc2.{p}"),
            ]
    return params


def _llava_params(m: ModelConfig, v: VisionConfig, registers: bool) -> list[_Param]:
    """The table for a (Victor) LLaVA checkpoint in transformers' current naming."""
    params = _llm_params(m, LLAVA_LM, LLAVA_HEAD) + _vision_params(v, LLAVA_VISION)
    params += [_copy(f"projector.encoder.linear_fc{i}.{p}", f"model.multi_modal_projector.linear_{i}.{p}")
               for i in (1, 2) for p in ("weight", "bias")]
    return params + ([_copy("registers", "model.registers")] if registers else [])


def _gather(params: list[_Param], tensors: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    missing = [name for p in params for name in p.hf if name not in tensors]
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return {p.ref: p.join([tensors[name] for name in p.hf]) for p in params}


def _scatter(params: list[_Param], state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.contiguous() for p in params for name, t in zip(p.hf, p.split(state[p.ref]))}


# --------------------------------------------------------------------------- HF configs <-> config sections


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _model_section(tc: LlamaConfig) -> dict:
    """megavictor `model:` keys for a Llama config; refuses what ReferenceVLM does not implement."""
    _require(tc.model_type == "llama", f"the LLM is a {tc.model_type!r} model; only llama is supported")
    _require(tc.hidden_act == "silu", f"LLM hidden_act={tc.hidden_act!r}; only silu (SwiGLU) is supported")
    _require(not tc.attention_bias and not tc.mlp_bias, "LLM biases (attention_bias/mlp_bias) are not supported")
    _require(not tc.rope_scaling, f"LLM rope_scaling={tc.rope_scaling!r} is not supported")
    _require(getattr(tc, "head_dim", None) in (None, tc.hidden_size // tc.num_attention_heads),
             f"LLM head_dim={tc.head_dim} differs from hidden_size / num_attention_heads")
    kv = tc.num_key_value_heads or tc.num_attention_heads
    return {"num_layers": tc.num_hidden_layers, "hidden_size": tc.hidden_size,
            "ffn_hidden_size": tc.intermediate_size, "num_attention_heads": tc.num_attention_heads,
            "num_query_groups": None if kv == tc.num_attention_heads else kv, "vocab_size": tc.vocab_size,
            "rotary_base": float(tc.rope_theta), "norm_epsilon": tc.rms_norm_eps,
            "init_method_std": tc.initializer_range}


def _vision_section(vc: CLIPVisionConfig, feature_layer: int) -> dict:
    """megavictor `vision:` keys; the ViT keeps the layers up to LLaVA's `vision_feature_layer`."""
    _require(isinstance(feature_layer, int), f"vision_feature_layer={feature_layer!r}: only one layer is supported")
    used = feature_layer if feature_layer >= 0 else vc.num_hidden_layers + 1 + feature_layer
    _require(1 <= used <= vc.num_hidden_layers,
             f"vision_feature_layer={feature_layer} selects no layer of a {vc.num_hidden_layers}-layer ViT")
    _require(vc.hidden_act in set(VisionActivation), f"ViT hidden_act={vc.hidden_act!r} is not supported")
    return {"image_size": vc.image_size, "patch_size": vc.patch_size, "num_layers": used,
            "hidden_size": vc.hidden_size, "ffn_hidden_size": vc.intermediate_size,
            "num_attention_heads": vc.num_attention_heads, "activation": vc.hidden_act,
            "norm_epsilon": vc.layer_norm_eps}


def read_safetensors(model_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF checkpoint dir (single file or sharded with an index)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    if not (root / files[0]).exists():
        raise FileNotFoundError(f"{root} has no model.safetensors (or index); convert .bin checkpoints first")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(root / name))
    return tensors


# --------------------------------------------------------------------------- import


def from_hf(llm_dir: str | Path, vision_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """A `LlamaForCausalLM` dir and a CLIP (vision) dir -> (config sections, full state without projector/registers).

    The ViT keeps the layers up to LLaVA's feature layer (-2). Run `complete_state` once the config is final:
    the projector and registers are trained from scratch.
    """
    tc = AutoConfig.from_pretrained(llm_dir)
    vc = CLIPVisionConfig.from_pretrained(vision_dir)
    sections = {"model": _model_section(tc), "vision": _vision_section(vc, LLAVA_FEATURE_LAYER)}
    llm = read_safetensors(llm_dir)
    if "lm_head.weight" not in llm:  # tied embeddings: megavictor's output layer is its own tensor
        llm["lm_head.weight"] = llm["model.embed_tokens.weight"].clone()
    state = _gather(_llm_params(ModelConfig(**sections["model"]), "model.", "lm_head.weight"), llm, str(llm_dir))
    state |= _gather(_vision_params(VisionConfig(**sections["vision"]), "vision_model."),
                     read_safetensors(vision_dir), str(vision_dir))
    return sections, state


def from_hf_llava(llava_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """A `LlavaForConditionalGeneration` (or exported Victor LLaVA) dir -> (config sections, full state).

    A Victor export brings its registers and a `victor:` section; a stock LLaVA has none (`complete_state`
    initialises them).
    """
    model_type = json.loads((Path(llava_dir) / "config.json").read_text())["model_type"]
    config = (VictorLlavaConfig if model_type == "victor_llava" else LlavaConfig).from_pretrained(llava_dir)
    _require(config.vision_feature_select_strategy == "default",
             "vision_feature_select_strategy must be 'default' (class token dropped)")
    _require(config.projector_hidden_act == "gelu" and config.multimodal_projector_bias,
             "the projector must be LLaVA-1.5's (gelu, with biases)")
    sections = {"model": _model_section(config.text_config),
                "vision": _vision_section(config.vision_config, config.vision_feature_layer)}
    victor = isinstance(config, VictorLlavaConfig)
    if victor:
        sections["victor"] = {"enabled": True, "num_registers": config.num_registers,
                              "drop_layer": config.drop_layer}
    tensors = {_current_llava_name(name): t for name, t in read_safetensors(llava_dir).items()}
    params = _llava_params(ModelConfig(**sections["model"]), VisionConfig(**sections["vision"]),
                           victor and config.num_registers > 0)
    return sections, _gather(params, tensors, str(llava_dir))


# Older llava-hf checkpoints name tensors `language_model.model.*`: transformers' own renaming (4.5x's
# `_checkpoint_conversion_mapping`; 5.x moved it into its weight-conversion machinery).
LEGACY_LLAVA_NAMES = {r"^language_model.model": "model.language_model", r"^vision_tower": "model.vision_tower",
                      r"^multi_modal_projector": "model.multi_modal_projector", r"^language_model.lm_head": "lm_head"}


def _current_llava_name(name: str) -> str:
    """A tensor name of any llava-hf checkpoint in transformers' current naming."""
    for pattern, replacement in LEGACY_LLAVA_NAMES.items():
        renamed, n = re.subn(pattern, replacement, name)
        if n:
            return renamed
    return name


def complete_state(cfg: Config, state: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Add what an HF checkpoint cannot hold for `cfg` (projector, registers: N(0, init_method_std), zero biases),
    drop registers the config has none for, then `check_full_state`."""
    expected = full_shapes(cfg)
    dtype = state["embedding.word_embeddings.weight"].dtype
    generator = torch.Generator().manual_seed(seed)
    out = {n: t for n, t in state.items() if n != "registers" or "registers" in expected}
    for name, shape in expected.items():
        if name in out or not (name == "registers" or name.startswith("projector.")):
            continue
        fresh = torch.zeros(shape) if name.endswith("bias") else \
            torch.randn(shape, generator=generator) * cfg.model.init_method_std
        out[name] = fresh.to(dtype)
    check_full_state(cfg, out)
    return out


def config_from_sections(sections: dict, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The run config: the YAML recipe at `path` (or the defaults), then the checkpoint's sections (the weights
    fix the shapes), then dotted `overrides`."""
    from_checkpoint = [f"{section}.{key}={json.dumps(value)}" for section, values in sections.items()
                       for key, value in values.items()]
    return load_config(path, from_checkpoint + list(overrides or []))


# --------------------------------------------------------------------------- export


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase | None, tokens: list[str], vocab_size: int) -> list[int]:
    """Ids of `tokens`, added to the tokenizer where missing (after its vocabulary) or, without one, after the
    model's vocabulary. A tokenizer without a pad token pads with eos."""
    if tokenizer is None:
        return [vocab_size + i for i in range(len(tokens))]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(tokens)


def _hf_config(cfg: Config, vocab_size: int, token_ids: list[int],
               tokenizer: PreTrainedTokenizerBase | None, dtype: torch.dtype) -> LlavaConfig:
    m, v, vi = cfg.model, cfg.vision, cfg.victor
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                       num_key_value_heads=m.num_query_groups or m.num_attention_heads, rms_norm_eps=m.norm_epsilon,
                       rope_theta=m.rotary_base, initializer_range=m.init_method_std,
                       max_position_embeddings=cfg.data.seq_length, tie_word_embeddings=False, **ids)
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
                              image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.activation,
                              layer_norm_eps=v.norm_epsilon)
    common = {"vision_config": vision, "text_config": text, "image_token_index": token_ids[0],
              "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
              "image_seq_length": v.num_visual_tokens, "projector_hidden_act": "gelu",
              "tie_word_embeddings": False, "dtype": dtype}
    if not vi.enabled:
        return LlavaConfig(architectures=["LlavaForConditionalGeneration"], **common)
    config = VictorLlavaConfig(num_registers=vi.num_registers, drop_layer=vi.drop_layer,
                               register_token_id=token_ids[1] if vi.num_registers else None,
                               architectures=["VictorLlavaForConditionalGeneration"], **common)
    config.auto_map = {"AutoConfig": "configuration_victor_llava.VictorLlavaConfig",
                       "AutoModelForImageTextToText": "modeling_victor_llava.VictorLlavaForConditionalGeneration"}
    return config


def _has_registers(cfg: Config) -> bool:
    return cfg.victor.enabled and cfg.victor.num_registers > 0


def hf_state(cfg: Config, full_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The (Victor) LLaVA tensors of a full state, in transformers' names; the ViT's `post_layernorm` (unused by
    LLaVA) as identity."""
    tensors = _scatter(_llava_params(cfg.model, cfg.vision, _has_registers(cfg)), full_state)
    dtype = full_state["embedding.word_embeddings.weight"].dtype
    hidden = cfg.vision.hidden_size
    tensors[LLAVA_VISION + "post_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    tensors[LLAVA_VISION + "post_layernorm.bias"] = torch.zeros(hidden, dtype=dtype)
    return tensors


def full_state_of(cfg: Config, tensors: dict[str, Tensor], source: str = "HF state") -> dict[str, Tensor]:
    """Inverse of `hf_state`: megavictor's full state from (Victor) LLaVA tensors in transformers' names."""
    return _gather(_llava_params(cfg.model, cfg.vision, _has_registers(cfg)), tensors, source)


def hf_reference_names(cfg: Config) -> dict[str, str]:
    """transformers name -> the megavictor (reference) parameter it is part of, for every mapped tensor."""
    return {hf: p.ref for p in _llava_params(cfg.model, cfg.vision, _has_registers(cfg)) for hf in p.hf}


def victor_hf_config(cfg: Config, dtype: torch.dtype = torch.float32) -> LlavaConfig:
    """The HF config of `cfg`'s model without a tokenizer: `<image>` and `<register>` ids after the vocabulary
    (never looked up). What the DeepSpeed engine trains."""
    tokens = [IMAGE_TOKEN] + [REGISTER_TOKEN] * _has_registers(cfg)
    return _hf_config(cfg, cfg.model.vocab_size, _prepare_tokenizer(None, tokens, cfg.model.vocab_size), None, dtype)


def image_processor(cfg: Config) -> CLIPImageProcessor | LlavaImageProcessor:
    """What megavictor's loader does (`megavictor.data.images.load_image`): RGB, then with
    `data.image_aspect_ratio: pad` (LLaVA-1.5) pad to square with the mean colour, or with `crop` shortest side to
    image_size (bicubic) and centre crop; CLIP mean/std."""
    size = cfg.vision.image_size
    common = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                  do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    if cfg.data.image_aspect_ratio == ImageAspectRatio.PAD:
        return LlavaImageProcessor(do_pad=True, **common)
    return CLIPImageProcessor(**common)


def to_hf(cfg: Config, full_state: dict[str, Tensor], out_dir: str | Path, tokenizer_dir: str | Path | None = None,
          max_shard_size: str | int = "5GB") -> Path:
    """Write an HF model dir: safetensors (sharded past `max_shard_size`), config, generation config, image
    processor, and with `tokenizer_dir` the tokenizer (plus `<image>`/`<register>` tokens) and processor.

    A baseline (`victor.enabled=false`) becomes a stock `LlavaForConditionalGeneration`; its `<image>` token must
    be embeddable, so when it lies past the vocabulary the embedding and output rows are padded with zeros (and the
    token is suppressed in generation). A Victor model ships its remote code (`trust_remote_code=True`) and needs
    no padding: its image and register ids are never looked up.
    """
    check_full_state(cfg, full_state)
    vi = cfg.victor
    if vi.enabled and vi.mask != VictorMask.CAUSAL:
        raise NotImplementedError(f"victor.mask={vi.mask!r} has no HF implementation (only causal)")
    for key, value in (("peer.fastv_layer", cfg.peer.fastv_layer), ("peer.avg_pool_to", cfg.peer.avg_pool_to)):
        if value is not None:
            raise NotImplementedError(f"{key}={value} has no HF implementation (megatron engine and eval only)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Set up for `generate(**processor(...))` (init arguments, so they are saved): left padding for batches, and
    # only the inputs the model takes.
    tokenizer = None if tokenizer_dir is None else AutoTokenizer.from_pretrained(
        str(tokenizer_dir), padding_side="left", model_input_names=["input_ids", "attention_mask"])
    token_ids = _prepare_tokenizer(tokenizer, [IMAGE_TOKEN] + [REGISTER_TOKEN] * _has_registers(cfg),
                                   cfg.model.vocab_size)

    tensors = hf_state(cfg, full_state)
    dtype = full_state["embedding.word_embeddings.weight"].dtype
    vocab_size = cfg.model.vocab_size
    if not vi.enabled and token_ids[0] >= vocab_size:
        extra = token_ids[0] + 1 - vocab_size
        for name in (LLAVA_LM + "embed_tokens.weight", LLAVA_HEAD):
            tensors[name] = torch.cat([tensors[name], tensors[name].new_zeros(extra, cfg.model.hidden_size)])
        vocab_size += extra
    save_torch_state_dict(tensors, str(out), max_shard_size=max_shard_size)

    config = _hf_config(cfg, vocab_size, token_ids, tokenizer, dtype)
    config.save_pretrained(out)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                     suppress_tokens=[i for i in token_ids if i < vocab_size] or None).save_pretrained(out)
    images = image_processor(cfg)
    if tokenizer is None:
        images.save_pretrained(out)
    else:
        llava = {"patch_size": cfg.vision.patch_size, "vision_feature_select_strategy": "default",
                 "num_additional_image_tokens": 1}  # CLIP's class token, dropped by the "default" strategy
        if vi.enabled:
            processor = VictorLlavaProcessor(images, tokenizer, num_registers=vi.num_registers,
                                             register_token=REGISTER_TOKEN, **llava)
            processor.auto_map = {"AutoProcessor": "processing_victor_llava.VictorLlavaProcessor"}
        else:
            processor = LlavaProcessor(images, tokenizer, **llava)
        processor.save_pretrained(out)
    if vi.enabled:
        for name in REMOTE_CODE:
            shutil.copy(Path(__file__).with_name(name), out / name)
    return out
