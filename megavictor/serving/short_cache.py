"""The KV cache of the layers after the drop: a spec of its own, a block manager that counts short tokens, and the
scheduler hook that lends the manager the request table.

vLLM gives each KV cache spec type its own group of layers, block table and manager. Layers >= k declare
`VictorShortSpec`, so they form their own group(s); its manager allocates blocks for a request's non-visual tokens
only: ceil(short tokens / block size) blocks where the other group holds ceil(all tokens / block size). Every count
the scheduler hands a manager is in the long (all tokens) coordinates; the manager converts it with the request's
prompt (visual tokens are the image placeholder id, and only prompts hold them).

Prefix caching: a hit in the long group would skip the short layers' work for the hit tokens, whose short KV would
then be missing. The short manager never reports a hit, and vLLM's hybrid coordinator takes the shortest hit over the
groups, so no request ever starts from cached blocks: outputs stay exact, and prefix caching saves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry


@dataclass(frozen=True, kw_only=True)
class VictorShortSpec(AttentionSpec):
    """Full causal attention over a request's non-visual tokens (registers and text), which carry their original
    positions. Derives from `AttentionSpec`, not `FullAttentionSpec`: vLLM merges subclasses of the latter into the
    full-attention group."""

    image_token_id: int

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        # A text-only request is as long in both groups.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


class VictorShortManager(FullAttentionManager):
    """Blocks for short tokens only. `requests` is the scheduler's request table (`VictorSchedulerMixin` sets it)."""

    requests: dict[str, Any]

    def __init__(self, kv_cache_spec: VictorShortSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.image_token_id = kv_cache_spec.image_token_id
        self._visual_before: dict[str, np.ndarray] = {}

    def short_tokens(self, request_id: str, num_tokens: int) -> int:
        """How many of the request's first `num_tokens` tokens are not visual."""
        counts = self._visual_before.get(request_id)
        if counts is None:
            prompt = np.asarray(self.requests[request_id].prompt_token_ids)
            counts = np.concatenate([[0], np.cumsum(prompt == self.image_token_id)])
            self._visual_before[request_id] = counts
        return num_tokens - int(counts[min(num_tokens, len(counts) - 1)])

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[Any], total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False, prefill_end: int = 0) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, self.short_tokens(request_id, num_tokens), new_computed_blocks,
            self.short_tokens(request_id, total_computed_tokens),
            self.short_tokens(request_id, num_local_computed_tokens),
            self.short_tokens(request_id, num_tokens_main_model), apply_admission_cap, prefill_end)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list[Any]:
        return super().allocate_new_blocks(request_id, self.short_tokens(request_id, num_tokens),
                                           self.short_tokens(request_id, num_tokens_main_model))

    def allocate_external_computed_blocks(self, request_id: str, num_local_computed_tokens: int,
                                          num_external_computed_tokens: int, record_for_zeroing: bool = True) -> None:
        if num_external_computed_tokens:
            raise NotImplementedError("Victor models cannot load KV computed elsewhere (KV connectors)")

    @classmethod
    def find_longest_cache_hit(cls, block_hashes: Any, max_length: int, kv_cache_group_ids: list[int],
                               block_pool: Any, kv_cache_spec: KVCacheSpec, drop_eagle_block: bool,
                               alignment_tokens: int, dcp_world_size: int = 1,
                               pcp_world_size: int = 1) -> tuple[tuple[list[Any], ...], int]:
        """Never a hit (see the module docstring): the hybrid coordinator then uses no cached block at all."""
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request: Any, num_tokens: int, retention_interval: int | None = None, *,
                     replay_boundaries: Sequence[int] = ()) -> None:
        """Short blocks are never published for reuse (they are never looked up)."""

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._visual_before.pop(request_id, None)


def register_spec() -> None:
    """Register the spec and its manager (after vLLM's own, which register lazily on first use)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(VictorShortSpec, VictorShortManager, uniform_type_base_spec=VictorShortSpec)


class VictorSchedulerMixin:
    """Hands the scheduler's request table to the short managers, which need each request's prompt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:  # type: ignore[attr-defined]
            if isinstance(manager, VictorShortManager):
                manager.requests = self.requests  # type: ignore[attr-defined]


class VictorScheduler(VictorSchedulerMixin, Scheduler):
    pass


class VictorAsyncScheduler(VictorSchedulerMixin, AsyncScheduler):
    pass
