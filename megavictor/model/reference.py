"""A plain, single-process PyTorch twin of `VictorVLM`: same parameter names and shapes, no megatron.

Parameter names are those of the unsharded megatron model (`decoder.layers.{global index}...`), with megatron's
fused tensors: `linear_qkv` rows grouped per query group as [q heads of the group, k, v], `linear_fc1` of the
SwiGLU MLP as [gate; up]. `megavictor.model.sharding` maps these to and from tensor/pipeline-parallel shards.
Used to check the parallel model numerically, and as the base of the HF export and the DeepSpeed engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavictor.config import Config, VisionActivation
from megavictor.model.batch import VictorBatch
from megavictor.model.drop_plan import DropPlan, build_drop_plan, gather_visual, scatter_image_slots
from megavictor.model.peers import image_slot_fill, learned_registers, run_layer
from megavictor.model.recipe import apply_freezing
from megavictor.model.visual_select import TowerOutputs, tower_readout
from megavictor.model.weight_init import initialize

MASKED_SCORE = -10000.0  # megatron's attention_mask_func fill value


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVSlot:
    """One decoder layer's KV cache for greedy decoding (`megavictor.kv_cache`): keys after RoPE and values,
    [B, cached slots, heads, head_dim], grown by each forward that is given the slot."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new slots' keys and values; return all cached ones (the new included)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, groups: int, bias: bool, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, hidden // heads
        self.linear_qkv = nn.Linear(hidden, (heads + 2 * groups) * self.head_dim, bias=bias or qkv_bias)
        self.linear_proj = nn.Linear(hidden, hidden, bias=bias)
        self.softmax = nn.Softmax(dim=-1)  # a module, so that FastV can read the probabilities (no parameters)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor | None,
                kv: KVSlot | None = None) -> torch.Tensor:
        """`mask` [B, 1, S, keys] (True: masked); with `kv`, the keys are the cached slots followed by `x`'s."""
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, s, self.heads, self.head_dim)
        k = k.repeat_interleave(per_group, dim=2)
        v = v.repeat_interleave(per_group, dim=2)
        if rope is not None:
            q = q * rope.cos() + rotate_half(q) * rope.sin()
            k = k * rope.cos() + rotate_half(k) * rope.sin()
        if kv is not None:
            k, v = kv.extend(k, v)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(mask, MASKED_SCORE)
        out = torch.einsum("bhqk,bkhd->bqhd", self.softmax(scores), v)
        return self.linear_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, gated: bool, bias: bool, activation, out: int | None = None) -> None:
        super().__init__()
        self.gated, self.activation = gated, activation
        self.linear_fc1 = nn.Linear(hidden, ffn * (2 if gated else 1), bias=bias)
        self.linear_fc2 = nn.Linear(ffn, out or hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return self.linear_fc2(h)


class Layer(nn.Module):
    """Pre-norm transformer layer with megatron's submodule names."""

    def __init__(self, hidden: int, ffn: int, heads: int, groups: int, norm, gated: bool, bias: bool,
                 activation, qkv_bias: bool = False) -> None:
        super().__init__()
        self.input_layernorm = norm()
        self.self_attention = Attention(hidden, heads, groups, bias, qkv_bias)
        self.pre_mlp_layernorm = norm()
        self.mlp = MLP(hidden, ffn, gated, bias, activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor | None,
                kv: KVSlot | None = None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), mask, rope, kv)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Stack(nn.Module):
    def __init__(self, layers: list[Layer], final_norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if final_norm is not None:
            self.final_layernorm = final_norm


class VisionTower(nn.Module):
    """CLIP ViT as megatron's CLIPViTModel builds it: patch conv (no bias), class token, ln_pre, no ln_post."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        v = cfg.vision
        norm = lambda: nn.LayerNorm(v.hidden_size, eps=v.norm_epsilon)  # noqa: E731
        act = quick_gelu if v.activation == VisionActivation.QUICK_GELU else F.gelu
        self.conv1 = nn.Conv2d(3, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(1, 1, v.hidden_size))
        self.position_embeddings = nn.Embedding(v.num_visual_tokens + 1, v.hidden_size)
        self.ln_pre = norm()
        self.decoder = Stack([Layer(v.hidden_size, v.ffn_hidden_size, v.num_attention_heads, v.num_attention_heads,
                                    norm, gated=False, bias=True, activation=act) for _ in range(v.num_layers)], None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> patch features [N, V, hidden] (class token dropped)."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln_pre(x + self.position_embeddings.weight)
        for layer in self.decoder.layers:
            x = layer(x, None, None)
        return x[:, 1:]


class Projector(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        # LLaVA's projector maps vision -> hidden, then hidden -> hidden.
        self.encoder = MLP(cfg.vision.hidden_size, cfg.model.hidden_size, gated=False, bias=True, activation=F.gelu,
                           out=cfg.model.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)


class ReferenceVLM(nn.Module):
    """The whole Victor VLM in one process; batch-first throughout."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        norm = lambda: nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)  # noqa: E731
        self.vision = VisionTower(cfg)
        self.projector = Projector(cfg)
        self.embedding = Embedding(m.vocab_size, m.hidden_size)
        registers = learned_registers(cfg)
        self.registers = nn.Parameter(torch.zeros(registers, m.hidden_size)) if registers else None
        self.image_newline = nn.Parameter(torch.zeros(m.hidden_size)) if cfg.vision.anyres() else None
        groups = m.num_query_groups or m.num_attention_heads
        self.decoder = Stack([Layer(m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, groups, norm,
                                    gated=True, bias=False, activation=F.silu, qkv_bias=m.qkv_bias)
                              for _ in range(m.num_layers)],
                             norm())
        self.output_layer = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        initialize(self, m.init_method_std, m.num_layers, cfg.train.seed)
        apply_freezing(self, cfg)

    def hidden_states(self, batch: VictorBatch, plan: DropPlan, cache: list[KVSlot] | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, S', H] of the slots that reach the loss; with `cache` (one empty slot per
        decoder layer), each layer also keeps its keys and values (the prefill of `megavictor.kv_cache`)."""
        x = self.embedding.word_embeddings(batch.tokens)
        visual, tower = None, None
        if batch.images.shape[0]:
            with tower_readout(self.cfg, self.vision) as qkv:
                features = self.vision(batch.images)
            tower = TowerOutputs(batch.images, features, self.projector, qkv[0] if qkv else None)
            visual = gather_visual(self.projector(features), self.image_newline, plan.image_slots)
        x = scatter_image_slots(x, plan.image_slots, visual, image_slot_fill(self.cfg, visual, self.registers, tower))
        for index, layer in enumerate(self.decoder.layers):
            if plan.drops_in(index):
                x = plan.drop(x, seq_dim=1, layer_index=index)
            view = plan.view_for_layer(index)
            kv = None if cache is None else cache[index]
            x = run_layer(plan, index, layer.self_attention.softmax,
                          lambda: layer(x, view.mask, view.rope.transpose(0, 1), kv))
        return self.decoder.final_layernorm(x)

    def forward(self, batch: VictorBatch, plan: DropPlan | None = None, return_logits: bool = False) -> torch.Tensor:
        """Per-slot losses [B, S'] (zero where masked), or logits [B, S', V]; same contract as `VictorVLM`."""
        plan = plan if plan is not None else build_drop_plan(batch, self.cfg)
        logits = self.output_layer(self.hidden_states(batch, plan))
        if return_logits:
            return logits
        labels = plan.output_view.labels
        mask = labels >= 0
        losses = F.cross_entropy(logits.float().flatten(0, 1), torch.where(mask, labels, 0).flatten(), reduction="none")
        return losses.view_as(labels) * mask


def full_shapes(cfg: Config) -> dict[str, torch.Size]:
    """Every parameter of the full model (reference names) and its shape, without allocating it."""
    with torch.device("meta"):
        return {name: p.shape for name, p in ReferenceVLM(cfg).named_parameters()}


def shape_problems(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps tensors of `shapes` from being exactly the tensors (names and shapes) of `expected`."""
    problems = [f"missing {n}" for n in expected if n not in shapes]
    problems += [f"unexpected {n}" for n in shapes if n not in expected]
    return problems + [f"{n} has shape {tuple(shapes[n])}, the config needs {tuple(s)}"
                       for n, s in expected.items() if n in shapes and tuple(shapes[n]) != tuple(s)]


def check_full_state(cfg: Config, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `state` has exactly ReferenceVLM(cfg)'s tensors and shapes."""
    problems = shape_problems({n: t.shape for n, t in state.items()}, full_shapes(cfg))
    if problems:
        raise ValueError(f"the weights do not match the config ({len(problems)} problems): {'; '.join(problems[:5])}")
