"""Training-free selections of each image's visual tokens before the LLM (`peer.prune`, `peer.prune_to: B`).

Each image's V projected visual tokens become B tokens that fill its B register slots (victor.enabled=true,
victor.num_registers=B, victor.drop_layer=0: the visual slots are dropped before the first decoder layer), as the
average pool of `megavictor.model.peers` does. No parameters: they are meant for `megavictor eval` on a checkpoint
trained without them (the plain baseline), as in their papers. Selected tokens keep their original order.

- random: B of the V tokens, uniformly without replacement. Each image's draw comes from a generator seeded by
  `train.seed` and the image's pixels, so one image gets the same tokens whatever the evaluation order, the batch
  and the decoding path (the KV cache's prefill once, or the megatron model re-run at every token).
- divprune (Alvar et al., CVPR 2025, arXiv 2503.02175): max-min diversity by cosine distance over the projected
  tokens (the features DivPrune's LLaVA code prunes, after the projector), greedy: first the token farthest from
  its nearest neighbour, then each time the token farthest from the tokens already chosen.
- visionzip (Yang et al., CVPR 2025, arXiv 2412.04467): D dominant tokens, the patches the ViT's class token
  attends most (head mean) in the layer whose output the projector takes (our tower's last layer); then C
  contextual tokens: C targets evenly spaced among the other patches, each other patch assigned to the target whose
  key (head mean, as VisionZip's `metric`) is most cosine-similar, each group's ViT features averaged and projected.
  D = round(B * 54 / 64) (the paper's 54 + 10 at 64 tokens), at most B - 1 when B > 1. The D dominant tokens come
  first, then the C contextual ones in their targets' order (VisionZip's concatenation). Differences from the
  released code: no class token among the B (our LLM never saw one), and a group is averaged with its target (the
  release adds the target to the mean of the others).

The ViT readout VisionZip needs (`TowerOutputs.qkv`) is the last layer's fused q/k/v projection, captured with a
forward hook, so it works with any attention backend; the class token's attention is recomputed from it. All of
this runs where `megavictor eval` runs the model, in one process (tensor parallel would split VisionZip's heads
over ranks, and its head means would need a reduce); `megavictor train` refuses `peer.prune`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megavictor.config import Config, PruneMethod

VISIONZIP_DOMINANT_SHARE = 54 / 64  # VisionZip's dominant : contextual = 54 : 10 at 64 tokens


@dataclass
class TowerOutputs:
    """What one ViT forward gives a selection besides the projected visual tokens."""

    images: torch.Tensor  # [N, 3, H, W] the pixels (random: each image's generator is seeded by them)
    features: torch.Tensor  # [N, V, Hv] the ViT's patch features, class token dropped (VisionZip merges these)
    project: Callable[[torch.Tensor], torch.Tensor]  # the projector, [..., Hv] -> [..., H]
    qkv: torch.Tensor | None  # [N, 1 + V, 3 * Hv] the last ViT layer's fused q/k/v (visionzip), batch-first


@contextmanager
def captured_outputs(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what `module` returns (the first element of a megatron (output, bias) pair) while the context is
    open, detached."""
    outs: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda mod, args, out: outs.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        yield outs
    finally:
        handle.remove()


@contextmanager
def tower_readout(cfg: Config, vit: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Open around a ViT forward (megatron's CLIPViTModel or the reference twin: both name their layers
    `decoder.layers`): for VisionZip, the last layer's fused q/k/v output lands in the yielded list."""
    if cfg.peer.prune != PruneMethod.VISIONZIP:
        yield []
        return
    with captured_outputs(vit.decoder.layers[-1].self_attention.linear_qkv) as outs:
        yield outs


def select_visual(cfg: Config, visual: torch.Tensor, tower: TowerOutputs) -> torch.Tensor:
    """[N, V, H] projected visual tokens -> [N, B, H]: what fills each image's B register slots under `peer.prune`."""
    keep = cfg.peer.prune_to
    assert keep is not None, "config.validate pairs peer.prune with peer.prune_to"
    if cfg.peer.prune == PruneMethod.RANDOM:
        return take(visual, random_indices(tower.images, visual.shape[1], keep, cfg.train.seed))
    if cfg.peer.prune == PruneMethod.DIVPRUNE:
        return take(visual, divprune_indices(visual, keep))
    assert tower.qkv is not None, "tower_readout captures the q/k/v under visionzip"
    attention, keys = class_attention_and_keys(tower.qkv, cfg.vision.num_attention_heads)
    dominant, contextual = visionzip_counts(keep)
    kept, groups = visionzip_groups(attention, keys, dominant, contextual)
    if contextual == 0:
        return take(visual, kept)
    merged = tower.project(group_means(tower.features, groups, contextual)).to(visual.dtype)
    return torch.cat([take(visual, kept), merged], dim=1)


def take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[N, V, H] tokens, [N, K] indices -> [N, K, H]."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A 64-bit generator seed from `seed` and the image's pixels (as float32 bytes)."""
    pixels = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(pixels, digest_size=8, key=str(seed).encode()).digest(), "little")


def random_indices(images: torch.Tensor, tokens: int, keep: int, seed: int) -> torch.Tensor:
    """[N, keep] ascending: for each image, `keep` of its `tokens` visual tokens uniformly without replacement,
    drawn from a generator seeded by `seed` and the image (`image_seed`)."""
    rows = [torch.randperm(tokens, generator=torch.Generator().manual_seed(image_seed(seed, image)))[:keep]
            for image in images]
    return torch.stack(rows).sort(dim=1).values.to(images.device)


def divprune_indices(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """[N, V, H] -> [N, keep] ascending: DivPrune's greedy max-min selection under cosine distance. The first
    token is the one whose nearest other token is farthest; each next one the unchosen token whose distance to the
    chosen set (to its nearest chosen token) is largest; ties go to the lowest index."""
    unit = F.normalize(tokens.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)  # [N, V, V]
    n, v, _ = distance.shape
    rows = torch.arange(n, device=tokens.device)
    self_pairs = torch.eye(v, dtype=torch.bool, device=tokens.device)
    chosen = [distance.masked_fill(self_pairs, math.inf).amin(dim=2).argmax(dim=1)]
    taken = torch.zeros(n, v, dtype=torch.bool, device=tokens.device)
    taken[rows, chosen[0]] = True
    to_chosen = distance[rows, chosen[0]]  # [N, V] each token's distance to its nearest chosen token
    for _ in range(keep - 1):
        nxt = to_chosen.masked_fill(taken, -math.inf).argmax(dim=1)
        chosen.append(nxt)
        taken[rows, nxt] = True
        to_chosen = torch.minimum(to_chosen, distance[rows, nxt])
    return torch.stack(chosen, dim=1).sort(dim=1).values


def class_attention_and_keys(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ViT layer's fused q/k/v [N, 1 + V, 3 * Hv] (megatron's layout, the class token first: per head q, k, v)
    -> the class token's attention probabilities over the V patches, head mean [N, V], and the patches' keys, head
    mean [N, V, Hv / heads]."""
    n, s, _ = qkv.shape
    q, k, _ = qkv.float().view(n, s, heads, 3, -1).unbind(dim=3)
    scores = torch.einsum("nhd,nshd->nhs", q[:, 0], k) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1).mean(dim=1)[:, 1:], k[:, 1:].mean(dim=2)


def visionzip_counts(keep: int) -> tuple[int, int]:
    """(dominant, contextual) tokens of a budget of `keep`: VisionZip's 54:10, at least one contextual from 2 on."""
    if keep == 1:
        return 1, 0
    dominant = min(round(keep * VISIONZIP_DOMINANT_SHARE), keep - 1)
    return dominant, keep - dominant


def visionzip_groups(attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's split of each image's V patches, from the class token's attention [N, V] and the keys
    [N, V, D]: the `dominant` most attended patches [N, dominant] (ascending), and each patch's contextual group
    [N, V] (-1 for the dominant ones). The targets are every `step`-th of the other patches in order, step =
    their count // `contextual` (VisionZip's uniform sampling); each target heads its own group, every other
    patch joins the target its key is most cosine-similar to."""
    n, v = attention.shape
    kept = attention.topk(dominant, dim=1).indices.sort(dim=1).values
    rest_mask = torch.ones(n, v, dtype=torch.bool, device=attention.device)
    rest_mask.scatter_(1, kept, False)
    groups = torch.full((n, v), -1, dtype=torch.long, device=attention.device)
    if contextual == 0:
        return kept, groups
    rest = rest_mask.nonzero()[:, 1].view(n, v - dominant)  # [N, V - D] the other patches, in order
    step = (v - dominant) // contextual
    targets = rest[:, ::step][:, :contextual]  # [N, C]
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit @ take(unit, targets).transpose(1, 2)  # [N, V, C]
    groups = torch.where(rest_mask, similarity.argmax(dim=2), groups)
    groups.scatter_(1, targets, torch.arange(contextual, device=attention.device).expand(n, -1))
    return kept, groups


def group_means(features: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """[N, V, Hv] features, [N, V] group of each (-1: none) -> [N, count, Hv] each group's mean."""
    members = F.one_hot(groups.clamp(min=0), count).to(features.dtype) * (groups >= 0)[..., None].to(features.dtype)
    return torch.einsum("nvc,nvh->nch", members, features) / members.sum(dim=1)[..., None]
