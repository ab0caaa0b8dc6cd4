"""Conversion between megavictor's full state dict and Hugging Face checkpoints (pure functions, no megatron).

The full state dict is `ReferenceVLM`'s: megatron names, fused `linear_qkv` (rows per query group: [q heads of
the group, k, v]) and SwiGLU `linear_fc1` ([gate; up]). HF Llama and megatron both use the rotate-half RoPE
convention, so q/k rows need no permutation within a head. One table of (megavictor name, HF names, join, split)
drives both directions, so import and export cannot drift apart.

The ViT hands the LLM its last layer's patch outputs. A CLIP checkpoint is imported without the layers past
LLaVA's feature layer (-2: CLIP's last layer is dropped) and without `post_layernorm`; the checkpoint keeps them
aside (`source_of`, `megavictor.checkpoint.hf_source`) with the source's config, and the export puts them back:
the whole CLIP, the source's `vision_feature_layer` and config fields. Without a recorded source, the HF ViT has
exactly megavictor's layers and `vision_feature_layer=-1` (`post_layernorm`, unused by LLaVA, written as identity
so the checkpoint is complete).

The LLM may be a Llama (Vicuna, Llama 3 with its RoPE scaling), Mistral or Qwen2 (QKV biases) model.

With anyres images (`vision.image_grid_pinpoints`) the model is LLaVA-NeXT's: the same table plus `image_newline`,
a (Victor) `LlavaNextConfig` with the grids, and `LlavaNextImageProcessor`, which tiles as
`megavictor.data.images.load_anyres`.
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
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from megavictor import hf_model
from megavictor.config import (
    Config,
    ImageAspectRatio,
    ModelConfig,
    PromptFormat,
    RopeScaling,
    VictorMask,
    VisionActivation,
    VisionConfig,
    load_config,
)
from megavictor.data.images import CLIP_MEAN, CLIP_STD
from megavictor.errors import UserError
from megavictor.hf_model.configuration_victor_llava import VictorConfigMixin, VictorLlavaConfig, VictorLlavaNextConfig
from megavictor.hf_model.processing_victor_llava import VictorLlavaNextProcessor, VictorLlavaProcessor
from megavictor.model.reference import check_full_state, full_shapes
from megavictor.model.weight_init import initial_value

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
        if m.qkv_bias:
            params.append(_qkv(ref + "self_attention.linear_qkv.bias",
                               [hf + f"self_attn.{x}_proj.bias" for x in "qkv"], heads, groups))
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
    """The table for a (Victor) LLaVA checkpoint in transformers' current naming; with anyres grids, LLaVA-NeXT's,
    which adds the learned end of each grid row (`image_newline`)."""
    params = _llm_params(m, LLAVA_LM, LLAVA_HEAD) + _vision_params(v, LLAVA_VISION)
    params += [_copy(f"projector.encoder.linear_fc{i}.{p}", f"model.multi_modal_projector.linear_{i}.{p}")
               for i in (1, 2) for p in ("weight", "bias")]
    params += [_copy("image_newline", "model.image_newline")] if v.anyres() else []
    return params + ([_copy("registers", "model.registers")] if registers else [])


def _gather(params: list[_Param], tensors: dict[str, Tensor], origin: str,
            shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """megavictor's tensors from HF ones. With `shapes` (megavictor's full shapes under the config the HF config
    gives), every HF tensor is checked against the shape its config needs, before anything is joined or written:
    a pair split wrongly (gate/up rows 170 + 182 for 176 + 176) is named, in HF's names."""
    missing = [name for p in params for name in p.hf if name not in tensors]
    if missing:
        raise ConversionError(f"{origin} lacks {len(missing)} tensors its config needs, e.g. {missing[:3]}")
    for p in params if shapes else ():
        expected = p.split(torch.empty(shapes[p.ref], device="meta"))
        for name, want in zip(p.hf, expected):
            if tuple(tensors[name].shape) != tuple(want.shape):
                raise ConversionError(f"{origin}: tensor {name} has shape {tuple(tensors[name].shape)}, but its "
                                      f"config.json needs {tuple(want.shape)}")
    return {p.ref: p.join([tensors[name] for name in p.hf]) for p in params}


def _scatter(params: list[_Param], state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.contiguous() for p in params for name, t in zip(p.hf, p.split(state[p.ref]))}


# --------------------------------------------------------------------------- HF configs <-> config sections


class ConversionError(UserError, ValueError):
    """HF files that megavictor cannot convert (or a config they do not fit); the message names the file, key or
    tensor, in HF's names where the user gave HF files."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)


# What every HF config of an LLM, and of a CLIP vision tower, must state (transformers would fill in defaults for
# a missing one, and the weights would then not fit).
LLM_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                   "vocab_size")
VISION_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
                      "patch_size")


def hf_config_dict(model_dir: str | Path, flag: str, required: tuple[str, ...], section: str | None = None) -> dict:
    """`model_dir/config.json` (its `section` sub-dict, for a LLaVA's text/vision config), with every `required`
    key present; one line naming `flag`, the file and the key otherwise."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{flag} {model_dir}: no config.json there (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{flag} {path} cannot be read as JSON ({exc})") from None
    config = config.get(section, {}) if section else config
    missing = [key for key in required if key not in config]
    if missing:
        raise ConversionError(f"{flag} {path}{f' ({section})' if section else ''} has no {', '.join(missing)}; "
                              "it is not a complete config of that model")
    return config


# The decoder families of transformers' LLaVA that megavictor's LLM implements: all RMSNorm + SwiGLU + RoPE, Qwen2
# with biases on q/k/v only.
LLM_FAMILIES = ("llama", "mistral", "qwen2")
_LLAMA3_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_position_embeddings"}


def _rope_of(tc: PretrainedConfig) -> tuple[float, dict | None]:
    """RoPE base and scaling of an HF text config: transformers 5's `rope_parameters` or 4's `rope_theta` +
    `rope_scaling` (None: plain RoPE)."""
    params = getattr(tc, "rope_parameters", None)
    if params:
        scaling = None if params.get("rope_type", "default") == "default" else params
        return float(params["rope_theta"]), scaling
    scaling = getattr(tc, "rope_scaling", None)  # Mistral's config has none
    return float(tc.rope_theta), scaling if scaling and scaling.get("rope_type", scaling.get("type")) != "default" \
        else None


def _model_section(tc: PretrainedConfig) -> dict:
    """megavictor `model:` keys for a Llama, Mistral or Qwen2 config; refuses what megavictor does not implement."""
    _require(tc.model_type in LLM_FAMILIES,
             f"the LLM is a {tc.model_type!r} model; supported: {', '.join(LLM_FAMILIES)}")
    _require(tc.hidden_act == "silu", f"LLM hidden_act={tc.hidden_act!r}; only silu (SwiGLU) is supported")
    _require(not getattr(tc, "attention_bias", False) and not getattr(tc, "mlp_bias", False),
             "LLM biases (attention_bias/mlp_bias) are not supported")
    _require(not getattr(tc, "use_sliding_window", False), "LLM use_sliding_window=true is not supported")
    # Mistral has no switch: a window shorter than the context changes attention past it (Qwen2's needs the flag).
    window = getattr(tc, "sliding_window", None) if tc.model_type == "mistral" else None
    _require(window is None or window >= tc.max_position_embeddings,
             f"the Mistral LLM's sliding_window={window} is shorter than its max_position_embeddings="
             f"{tc.max_position_embeddings}; sliding-window attention is not supported (megavictor attends to the "
             "whole sequence)")
    _require(getattr(tc, "head_dim", None) in (None, tc.hidden_size // tc.num_attention_heads),
             f"LLM head_dim={getattr(tc, 'head_dim', None)} differs from hidden_size / num_attention_heads")
    base, scaling = _rope_of(tc)
    rope: dict = {}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        _require(kind == RopeScaling.LLAMA3, f"LLM rope scaling {kind!r} is not supported (only llama3)")
        rope = {"rope_scaling": str(RopeScaling.LLAMA3)} | {key: scaling[hf] for hf, key in _LLAMA3_KEYS.items()}
    kv = tc.num_key_value_heads or tc.num_attention_heads
    return {"num_layers": tc.num_hidden_layers, "hidden_size": tc.hidden_size,
            "ffn_hidden_size": tc.intermediate_size, "num_attention_heads": tc.num_attention_heads,
            "num_query_groups": None if kv == tc.num_attention_heads else kv, "vocab_size": tc.vocab_size,
            "rotary_base": base, "norm_epsilon": tc.rms_norm_eps, "init_method_std": tc.initializer_range,
            "qkv_bias": tc.model_type == "qwen2", **rope}


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
        raise ConversionError(f"{root} has no model.safetensors (or index); convert .bin checkpoints to safetensors "
                              "first")
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
    hf_config_dict(llm_dir, "--llm", LLM_CONFIG_KEYS)
    vision = hf_config_dict(vision_dir, "--vision", ("model_type",))
    if vision["model_type"] not in ("clip", "clip_vision_model"):
        raise ConversionError(f"--vision {vision_dir} holds a {vision['model_type']!r} model, not a CLIP vision "
                              "tower (model_type clip or clip_vision_model)")
    hf_config_dict(vision_dir, "--vision", VISION_CONFIG_KEYS, "vision_config" if vision["model_type"] == "clip"
                   else None)
    tc = AutoConfig.from_pretrained(llm_dir)
    vc = CLIPVisionConfig.from_pretrained(vision_dir)
    sections = {"model": _model_section(tc), "vision": _vision_section(vc, LLAVA_FEATURE_LAYER)}
    shapes = _full_shapes(sections)
    llm = read_safetensors(llm_dir)
    if "lm_head.weight" not in llm and "model.embed_tokens.weight" in llm:  # tied: our output layer is its own
        llm["lm_head.weight"] = llm["model.embed_tokens.weight"].clone()
    state = _gather(_llm_params(ModelConfig(**sections["model"]), "model.", "lm_head.weight"), llm, f"--llm {llm_dir}",
                    shapes)
    state |= _gather(_vision_params(VisionConfig(**sections["vision"]), "vision_model."),
                     {clip_name(n): t for n, t in read_safetensors(vision_dir).items()}, f"--vision {vision_dir}",
                     shapes)
    return sections, state


def _full_shapes(sections: dict) -> dict[str, tuple[int, ...]]:
    """megavictor's full tensor shapes under the config the HF config sections give."""
    cfg = Config(model=ModelConfig(**sections["model"]), vision=VisionConfig(**sections["vision"]))
    victor = sections.get("victor")
    cfg.victor.enabled = bool(victor)
    if victor:
        cfg.victor.num_registers = victor["num_registers"]
    return {name: tuple(shape) for name, shape in full_shapes(cfg).items()}


def _vision_tail(tensors: dict[str, Tensor], prefix: str, used_layers: int) -> dict[str, Tensor]:
    """The ViT tensors megavictor does not run, named relative to the vision model: CLIP's layers past the feature
    layer, and `post_layernorm` (unused by LLaVA)."""
    tail = {}
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if rest.startswith("post_layernorm.") or (layer and int(layer.group(1)) >= used_layers):
            tail[rest] = tensor
    return tail


def source_of(llm_dir: str | Path | None = None, vision_dir: str | Path | None = None,
              llava_dir: str | Path | None = None) -> tuple[dict, dict[str, Tensor]]:
    """What an export needs of the HF source to keep its conventions: its LLaVA config (as a dict; for a separate
    LLM and CLIP, the two configs with LLaVA's feature layer) and the ViT tail (`_vision_tail`)."""
    if llava_dir is not None:
        config = _llava_config(llava_dir)
        tensors = {current_llava_name(n): t for n, t in read_safetensors(llava_dir).items()}
        sections = _vision_section(config.vision_config, config.vision_feature_layer)
        return config.to_dict(), _vision_tail(tensors, LLAVA_VISION, sections["num_layers"])
    text, vision = AutoConfig.from_pretrained(llm_dir), CLIPVisionConfig.from_pretrained(vision_dir)
    used = _vision_section(vision, LLAVA_FEATURE_LAYER)["num_layers"]
    config = {"text_config": text.to_dict(), "vision_config": vision.to_dict(),
              "vision_feature_layer": LLAVA_FEATURE_LAYER}
    return config, _vision_tail({clip_name(n): t for n, t in read_safetensors(vision_dir).items()}, "vision_model.",
                                used)


# The LLaVA configs `--llava` reads, by `model_type`.
LLAVA_CONFIGS: dict[str, type[PretrainedConfig]] = {"llava": LlavaConfig, "llava_next": LlavaNextConfig,
                                                     "victor_llava": VictorLlavaConfig,
                                                     "victor_llava_next": VictorLlavaNextConfig}


def _llava_config(llava_dir: str | Path) -> LlavaConfig | LlavaNextConfig:
    model_type = json.loads((Path(llava_dir) / "config.json").read_text())["model_type"]
    _require(model_type in LLAVA_CONFIGS, f"--llava {llava_dir} holds a {model_type!r} model; supported: "
                                          f"{', '.join(LLAVA_CONFIGS)}")
    return LLAVA_CONFIGS[model_type].from_pretrained(llava_dir)


def from_hf_llava(llava_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """A `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` (llava-hf v1.6) or exported Victor
    LLaVA(-NeXT) dir -> (config sections, full state).

    A Victor export brings its registers and a `victor:` section; a stock LLaVA has none (`complete_state`
    initialises them). A LLaVA-NeXT brings its grids and `image_newline`: `vision.image_grid_pinpoints` and
    `data.image_aspect_ratio: anyres`.
    """
    hf_config_dict(llava_dir, "--llava", ("model_type", "text_config", "vision_config"))
    hf_config_dict(llava_dir, "--llava", LLM_CONFIG_KEYS, "text_config")
    config = _llava_config(llava_dir)
    _require(config.vision_feature_select_strategy == "default",
             "vision_feature_select_strategy must be 'default' (class token dropped)")
    _require(config.projector_hidden_act == "gelu" and config.multimodal_projector_bias,
             "the projector must be LLaVA-1.5's (gelu, with biases)")
    sections = {"model": _model_section(config.text_config),
                "vision": _vision_section(config.vision_config, config.vision_feature_layer)}
    victor = isinstance(config, VictorConfigMixin)
    if victor:
        sections["victor"] = {"enabled": True, "num_registers": config.num_registers,
                              "drop_layer": config.drop_layer}
    if isinstance(config, LlavaNextConfig):
        sections["vision"]["image_grid_pinpoints"] = [list(pin) for pin in config.image_grid_pinpoints]
        sections["data"] = {"image_aspect_ratio": str(ImageAspectRatio.ANYRES)}
    tensors = {current_llava_name(name): t for name, t in read_safetensors(llava_dir).items()}
    params = _llava_params(ModelConfig(**sections["model"]), VisionConfig(**sections["vision"]),
                           victor and config.num_registers > 0)
    return sections, _gather(params, tensors, f"--llava {llava_dir}", _full_shapes(sections))


# Older llava-hf checkpoints (all of v1.6's LLaVA-NeXT) name tensors `language_model.model.*`: transformers' own
# renaming (4.5x's `_checkpoint_conversion_mapping`; 5.x moved it into its weight-conversion machinery).
LEGACY_LLAVA_NAMES = {r"^language_model.model": "model.language_model", r"^vision_tower": "model.vision_tower",
                      r"^multi_modal_projector": "model.multi_modal_projector", r"^language_model.lm_head": "lm_head",
                      r"^image_newline": "model.image_newline"}


def clip_name(name: str) -> str:
    """A CLIP vision tensor name as transformers 4 writes it (`vision_model.*`; 5 drops that level)."""
    return name if name.startswith("vision_model.") else "vision_model." + name


def current_llava_name(name: str) -> str:
    """A tensor name of any llava-hf checkpoint (old names, or transformers 5's CLIP without `vision_model.`) in
    the naming megavictor reads and writes, which every transformers 4.5x and 5.x loads."""
    for pattern, replacement in LEGACY_LLAVA_NAMES.items():
        name, n = re.subn(pattern, replacement, name)
        if n:
            break
    vision = "model.vision_tower."
    return vision + clip_name(name[len(vision):]) if name.startswith(vision) else name


def complete_state(cfg: Config, state: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Add what an HF checkpoint cannot hold for `cfg` (projector, registers: N(0, init_method_std), zero biases;
    anyres's `image_newline` for a LLaVA-1.5 or LLM + CLIP source: as training initialises it, std 1/sqrt(H)), drop
    registers and the newline the config has none for, then `check_full_state`."""
    expected = full_shapes(cfg)
    dtype = state["embedding.word_embeddings.weight"].dtype
    generator = torch.Generator().manual_seed(seed)
    out = {n: t for n, t in state.items() if n not in ("registers", "image_newline") or n in expected}
    for name, shape in expected.items():
        if name in out or not (name in ("registers", "image_newline") or name.startswith("projector.")):
            continue
        if name == "image_newline":
            fresh = initial_value(name, tuple(shape), cfg.model.init_method_std, cfg.model.num_layers, seed)
        elif name.endswith("bias"):
            fresh = torch.zeros(shape)
        else:
            fresh = torch.randn(shape, generator=generator) * cfg.model.init_method_std
        out[name] = fresh.to(dtype)
    try:
        check_full_state(cfg, out)
    except ValueError as exc:  # the overrides or the recipe changed a size the HF weights fix
        raise ConversionError(f"{exc}; drop the model.* / vision.* overrides that change sizes") from None
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


# Config fields an export takes from megavictor's config (the weights fix them), whatever the source said.
_NOT_FROM_SOURCE = ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "rope_theta",
                    "rope_scaling", "rope_parameters")


def _text_config(cfg: Config, vocab_size: int, tokenizer: PreTrainedTokenizerBase | None,
                 source: dict | None) -> dict:
    """The LLM's HF config: the source's (its `max_position_embeddings` and every other field) with the sizes
    megavictor trained; without a source, a Llama config whose context is `data.seq_length`."""
    m = cfg.model
    base = {k: v for k, v in (source or {}).get("text_config", {}).items() if k not in _NOT_FROM_SOURCE}
    base.setdefault("model_type", "qwen2" if m.qkv_bias else "llama")
    _require(base["model_type"] in LLM_FAMILIES and m.qkv_bias == (base["model_type"] == "qwen2"),
             f"model.qkv_bias={m.qkv_bias} does not fit the source's {base['model_type']!r} decoder")
    rope_scaling = None if m.rope_scaling is None else \
        {"rope_type": str(m.rope_scaling)} | {hf: getattr(m, key) for hf, key in _LLAMA3_KEYS.items()}
    base.setdefault("max_position_embeddings", cfg.data.seq_length)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    return {**base, "vocab_size": vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups or m.num_attention_heads, "rms_norm_eps": m.norm_epsilon,
            "rope_theta": m.rotary_base, "rope_scaling": rope_scaling, "initializer_range": m.init_method_std,
            "tie_word_embeddings": False, **ids}


def faithful_vision(cfg: Config, source: dict | None, vision_tail: dict[str, Tensor]) -> bool:
    """Whether the source's whole ViT can be exported: its config, with `vision_tail` holding exactly the layers
    past megavictor's (which the source's `vision_feature_layer` then selects), at megavictor's sizes."""
    src = (source or {}).get("vision_config")
    if not src or not isinstance(source.get("vision_feature_layer"), int):
        return False
    v, n = cfg.vision, src.get("num_hidden_layers")
    layer = source["vision_feature_layer"]
    tail_layers = {int(match.group(1)) for name in vision_tail
                   if (match := re.match(r"encoder\.layers\.(\d+)\.", name))}
    sizes = {"hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size, "image_size": v.image_size,
             "patch_size": v.patch_size, "num_attention_heads": v.num_attention_heads}
    return (isinstance(n, int) and (layer if layer >= 0 else n + 1 + layer) == v.num_layers
            and tail_layers == set(range(v.num_layers, n)) and all(src.get(k) == x for k, x in sizes.items()))


def _vision_config(cfg: Config, source: dict | None, faithful: bool) -> tuple[dict | CLIPVisionConfig, int]:
    """The ViT's HF config and LLaVA's `vision_feature_layer`: the source's when the whole tower is exported, else
    exactly megavictor's layers and the last of them."""
    if faithful:
        vision = {k: v for k, v in source["vision_config"].items() if k not in _NOT_FROM_SOURCE}
        return {**vision, "model_type": vision.get("model_type", "clip_vision_model")}, source["vision_feature_layer"]
    v = cfg.vision
    return CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
                            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.activation,
                            layer_norm_eps=v.norm_epsilon), -1


def _hf_config(cfg: Config, vocab_size: int, token_ids: list[int], tokenizer: PreTrainedTokenizerBase | None,
               dtype: torch.dtype, source: dict | None = None, faithful: bool = False
               ) -> LlavaConfig | LlavaNextConfig:
    v, vi = cfg.vision, cfg.victor
    vision, feature_layer = _vision_config(cfg, source, faithful)
    common = {"vision_config": vision, "text_config": _text_config(cfg, vocab_size, tokenizer, source),
              "image_token_index": token_ids[0], "vision_feature_layer": feature_layer,
              "vision_feature_select_strategy": "default", "image_seq_length": v.num_visual_tokens,
              "projector_hidden_act": "gelu", "tie_word_embeddings": False, "dtype": dtype}
    if v.anyres():
        common["image_grid_pinpoints"] = v.image_grid_pinpoints
    name = "LlavaNext" if v.anyres() else "Llava"
    if not vi.enabled:
        return (LlavaNextConfig if v.anyres() else LlavaConfig)(architectures=[f"{name}ForConditionalGeneration"],
                                                               **common)
    name = "Victor" + name
    config = (VictorLlavaNextConfig if v.anyres() else VictorLlavaConfig)(
        num_registers=vi.num_registers, drop_layer=vi.drop_layer,
        register_token_id=token_ids[1] if vi.num_registers else None,
        architectures=[f"{name}ForConditionalGeneration"], **common)
    config.auto_map = {"AutoConfig": f"configuration_victor_llava.{name}Config",
                       "AutoModelForImageTextToText": f"modeling_victor_llava.{name}ForConditionalGeneration"}
    return config


def _has_registers(cfg: Config) -> bool:
    return cfg.victor.enabled and cfg.victor.num_registers > 0


def hf_state(cfg: Config, full_state: dict[str, Tensor], vision_tail: dict[str, Tensor] | None = None
             ) -> dict[str, Tensor]:
    """The (Victor) LLaVA tensors of a full state, in transformers' names, with the source's ViT tail (layers past
    the feature layer, `post_layernorm`); without one, the ViT's `post_layernorm` (unused by LLaVA) as identity."""
    tensors = _scatter(_llava_params(cfg.model, cfg.vision, _has_registers(cfg)), full_state)
    dtype = full_state["embedding.word_embeddings.weight"].dtype
    hidden = cfg.vision.hidden_size
    tensors[LLAVA_VISION + "post_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    tensors[LLAVA_VISION + "post_layernorm.bias"] = torch.zeros(hidden, dtype=dtype)
    tensors |= {LLAVA_VISION + name: t.to(dtype) for name, t in (vision_tail or {}).items()}
    return tensors


def full_state_of(cfg: Config, tensors: dict[str, Tensor], origin: str = "HF state") -> dict[str, Tensor]:
    """Inverse of `hf_state`: megavictor's full state from (Victor) LLaVA tensors in transformers' names, as any
    transformers 4.5x/5.x model or checkpoint names them (`current_llava_name`)."""
    tensors = {current_llava_name(name): t for name, t in tensors.items()}
    return _gather(_llava_params(cfg.model, cfg.vision, _has_registers(cfg)), tensors, origin)


def hf_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """A (Victor) LLaVA model's parameters under the names megavictor reads and writes: transformers 5 builds CLIP
    without its `vision_model.` level in memory (its loader renames on the fly), 4.5x with it."""
    return [(current_llava_name(name), param) for name, param in model.named_parameters()]


def hf_reference_names(cfg: Config) -> dict[str, str]:
    """transformers name -> the megavictor (reference) parameter it is part of, for every mapped tensor."""
    return {hf: p.ref for p in _llava_params(cfg.model, cfg.vision, _has_registers(cfg)) for hf in p.hf}


def victor_hf_config(cfg: Config, dtype: torch.dtype = torch.float32) -> LlavaConfig:
    """The HF config of `cfg`'s model without a tokenizer: `<image>` and `<register>` ids after the vocabulary
    (never looked up). What the DeepSpeed engine trains."""
    tokens = [IMAGE_TOKEN] + [REGISTER_TOKEN] * _has_registers(cfg)
    return _hf_config(cfg, cfg.model.vocab_size, _prepare_tokenizer(None, tokens, cfg.model.vocab_size), None, dtype)


def image_processor(cfg: Config) -> BaseImageProcessor:
    """What megavictor's loader does (`megavictor.data.images.load_image`): RGB, then with
    `data.image_aspect_ratio: pad` (LLaVA-1.5) pad to square with the mean colour, or with `crop` shortest side to
    image_size (bicubic) and centre crop; CLIP mean/std. With `anyres` (`load_anyres`), LLaVA-NeXT's base view and
    grid tiles of image_size (its `do_pad` pads a batch's tile counts, not the images)."""
    size = cfg.vision.image_size
    common = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                  do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    if cfg.data.image_aspect_ratio == ImageAspectRatio.ANYRES:
        return _pil("LlavaNextImageProcessor")(image_grid_pinpoints=cfg.vision.image_grid_pinpoints, do_pad=True,
                                               **common)
    if cfg.data.image_aspect_ratio == ImageAspectRatio.PAD:
        return _pil("LlavaImageProcessor")(do_pad=True, **common)
    return _pil("CLIPImageProcessor")(**common)


def _pil(name: str) -> type[BaseImageProcessor]:
    """transformers 5 gives each image processor a torchvision backend (the default, which without torchvision falls
    back to PIL with a warning whenever the name is looked up: at every `convert`) and a PIL one (`<name>Pil`), which
    resizes as megavictor's loader does (PIL bicubic): the loader's twin. Both save `name` as `image_processor_type`,
    so the export loads anywhere. transformers 4 has only `name`, PIL-based."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def chat_template(cfg: Config) -> str:
    """The processor's chat template: the prompt format megavictor trained with (`megavictor.data.tokenizer.render`),
    its system prompt the default. Messages hold strings or LLaVA content lists ({"type": "image"} renders
    `<image>`, {"type": "text"} its text, in order)."""
    content = ("{%- if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
               "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif -%}")
    if cfg.data.prompt_format == PromptFormat.PLAIN:  # images, then the caption
        return "{%- for m in messages if m['role'] != 'system' %}" + content + "{%- endfor %}"
    return ("{%- set system = " + json.dumps(cfg.data.system_prompt) + " %}"
            "{%- for m in messages if m['role'] == 'system' %}{% set system = m['content'] %}{% endfor %}"
            "{%- if system %}{{ system }} {% endif %}"
            "{%- for m in messages if m['role'] != 'system' %}"
            "{%- if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}" + content +
            "{%- if m['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
            "{%- endfor %}{%- if add_generation_prompt %}ASSISTANT:{% endif %}")


def _readable_by_4_and_5(out: Path) -> None:
    """What transformers 5 writes in a form 4.5x reads too (exports are loaded with either, whichever wrote them):
    RoPE as `rope_theta` + `rope_scaling` beside 5's `rope_parameters` (4 would silently fall back to base 10000),
    and the fast tokenizer's class as `PreTrainedTokenizerFast` (5 writes `TokenizersBackend`, its alias)."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    text = config["text_config"]
    params = text.get("rope_parameters")
    if params and text.get("rope_theta") is None:
        text["rope_theta"] = params["rope_theta"]
        text["rope_scaling"] = None if params.get("rope_type", "default") == "default" else \
            {k: v for k, v in params.items() if k != "rope_theta"}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = out / "tokenizer_config.json"
    if path.is_file():
        tokenizer = json.loads(path.read_text())
        if tokenizer.get("tokenizer_class") == "TokenizersBackend":
            path.write_text(json.dumps({**tokenizer, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2,
                                       ensure_ascii=False) + "\n")


def to_hf(cfg: Config, full_state: dict[str, Tensor], out_dir: str | Path, tokenizer_dir: str | Path | None = None,
          max_shard_size: str | int = "5GB", source: dict | None = None,
          vision_tail: dict[str, Tensor] | None = None) -> Path:
    """Write an HF model dir: safetensors (sharded past `max_shard_size`), config, generation config, image
    processor, and with `tokenizer_dir` the tokenizer (plus `<image>`/`<register>` tokens) and processor, whose
    chat template renders the training prompt format.

    `source` (the HF source's config, `source_of`) and `vision_tail` keep the source's conventions: its config
    fields (`max_position_embeddings`, ...) and, when they fit, its whole ViT with its `vision_feature_layer`.

    A baseline (`victor.enabled=false`) becomes a stock `LlavaForConditionalGeneration` (with anyres images
    `LlavaNextForConditionalGeneration`); its `<image>` token must be embeddable, so when it lies past the
    vocabulary the embedding and output rows are padded with zeros (and the token is suppressed in generation). A
    Victor model (`VictorLlava(Next)ForConditionalGeneration`) ships its remote code (`trust_remote_code=True`) and
    needs no padding: its image and register ids are never looked up.
    """
    check_full_state(cfg, full_state)
    vi = cfg.victor
    if vi.enabled and vi.mask != VictorMask.CAUSAL:
        raise ConversionError(f"victor.mask={vi.mask!r} has no HF implementation (only causal)")
    for key, value in (("peer.fastv_layer", cfg.peer.fastv_layer), ("peer.pyramid_layers", cfg.peer.pyramid_layers),
                       ("peer.avg_pool_to", cfg.peer.avg_pool_to), ("peer.prune", cfg.peer.prune)):
        if value is not None:
            raise ConversionError(f"{key}={value} has no HF implementation (megatron engine and eval only)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Set up for `generate(**processor(...))` (init arguments, so they are saved): left padding for batches, and
    # only the inputs the model takes.
    tokenizer = None if tokenizer_dir is None else AutoTokenizer.from_pretrained(
        str(tokenizer_dir), padding_side="left", model_input_names=["input_ids", "attention_mask"])
    token_ids = _prepare_tokenizer(tokenizer, [IMAGE_TOKEN] + [REGISTER_TOKEN] * _has_registers(cfg),
                                   cfg.model.vocab_size)

    faithful = faithful_vision(cfg, source, vision_tail or {})
    tensors = hf_state(cfg, full_state, vision_tail if faithful else None)
    dtype = full_state["embedding.word_embeddings.weight"].dtype
    vocab_size = cfg.model.vocab_size
    if not vi.enabled and token_ids[0] >= vocab_size:
        extra = token_ids[0] + 1 - vocab_size
        for name in (LLAVA_LM + "embed_tokens.weight", LLAVA_HEAD):
            tensors[name] = torch.cat([tensors[name], tensors[name].new_zeros(extra, cfg.model.hidden_size)])
        vocab_size += extra
    save_torch_state_dict(tensors, str(out), max_shard_size=max_shard_size)

    config = _hf_config(cfg, vocab_size, token_ids, tokenizer, dtype, source, faithful)
    config.save_pretrained(out)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                     suppress_tokens=[i for i in token_ids if i < vocab_size] or None).save_pretrained(out)
    images = image_processor(cfg)
    if tokenizer is None:
        images.save_pretrained(out)
    else:
        llava = {"patch_size": cfg.vision.patch_size, "vision_feature_select_strategy": "default",
                 "num_additional_image_tokens": 1,  # CLIP's class token, dropped by the "default" strategy
                 "chat_template": chat_template(cfg)}
        if vi.enabled:
            victor_processor = VictorLlavaNextProcessor if cfg.vision.anyres() else VictorLlavaProcessor
            processor = victor_processor(images, tokenizer, num_registers=vi.num_registers,
                                         register_token=REGISTER_TOKEN, **llava)
            processor.auto_map = {"AutoProcessor": f"processing_victor_llava.{victor_processor.__name__}"}
        else:
            processor = (LlavaNextProcessor if cfg.vision.anyres() else LlavaProcessor)(images, tokenizer, **llava)
        processor.save_pretrained(out)
    if vi.enabled:
        for name in REMOTE_CODE:
            shutil.copy(Path(hf_model.__file__).with_name(name), out / name)
    _readable_by_4_and_5(out)
    return out
