"""The vLLM plugin's entry point (`vllm.general_plugins` -> `megavictor = megavictor.serving.plugin:register`).

vLLM calls `register` in every process it starts, before it reads a model's config. It registers the Victor model
class under the architecture name the export's config.json carries, the short KV cache spec, and a config hook that
picks the scheduler (and on CPU the worker) the model needs and refuses what it cannot serve, naming the reason
(vLLM reports it as a config validation error).

A Victor LLaVA-NeXT export (anyres images) is refused the same way: the plugin serves LLaVA-1.5 exports only.
"""

from __future__ import annotations

import os
from typing import Any

ARCHITECTURE = "VictorLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "VictorLlavaNextForConditionalGeneration"
NEXT_REFUSAL = (f"megavictor's vLLM plugin does not serve {NEXT_ARCHITECTURE} (LLaVA-NeXT anyres images) yet: it "
                "serves VictorLlavaForConditionalGeneration (LLaVA-1.5) exports only; run this export with "
                "transformers (`generate`, trust_remote_code=True), or serve the baseline's stock "
                "LlavaNextForConditionalGeneration export")


class VictorConfigHook:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`)."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return None

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from vllm.logger import init_logger

        log = init_logger("megavictor.serving")
        scheduler = vllm_config.scheduler_config
        parallel = vllm_config.parallel_config
        if scheduler.disable_hybrid_kv_cache_manager:
            raise ValueError("Victor models need vLLM's hybrid KV cache manager (layers after the drop keep their own,"
                             " shorter KV cache): remove --disable-hybrid-kv-cache-manager")
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("Victor models cannot be served with pipeline parallelism (the drop changes the shapes "
                             "stages pass): use --tensor-parallel-size instead")
        if vllm_config.speculative_config is not None:
            raise ValueError("Victor models cannot be served with speculative decoding")
        if not vllm_config.model_config.enforce_eager:
            log.info("megavictor: Victor models run eagerly (the drop has data-dependent shapes); setting "
                     "enforce_eager")
            vllm_config.model_config.enforce_eager = True
        if vllm_config.cache_config.enable_prefix_caching:
            log.warning("megavictor: prefix caching never hits for Victor models (the KV of layers after the drop is "
                        "not cached); outputs are exact")
        # The V1 model runner hands models the prompt tokens before each request's chunk (`lookback_token_ids`);
        # the V2 runner (vLLM's default on GPUs with Triton) does not yet. Workers inherit the environment.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if scheduler.scheduler_cls is None:
            # vLLM decides async scheduling after this hook; the scheduler class must match the decision, so it is
            # made here: async only when asked for.
            if scheduler.async_scheduling is None:
                scheduler.async_scheduling = False
            scheduler.scheduler_cls = ("megavictor.serving.short_cache.VictorAsyncScheduler"
                                       if scheduler.async_scheduling else
                                       "megavictor.serving.short_cache.VictorScheduler")
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and parallel.worker_cls in ("auto", "vllm.v1.worker.cpu_worker.CPUWorker"):
            parallel.worker_cls = "megavictor.serving.worker.VictorCPUWorker"


class VictorLlavaNextRefusal:
    """The config hook of Victor LLaVA-NeXT exports: refuses them while vLLM builds the model config, before
    anything is loaded. Its per-image visual counts (tiles, unpadding, newlines) would need the LLaVA-NeXT processor
    and vision path under the drop, which `model.py` does not have."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        raise ValueError(NEXT_REFUSAL)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        raise ValueError(NEXT_REFUSAL)


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .short_cache import register_spec

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "megavictor.serving.model:VictorLlavaForConditionalGeneration")
    MODELS_CONFIG_MAP[ARCHITECTURE] = VictorConfigHook
    # Unregistered, the NeXT architecture would go to vLLM's Transformers backend (the export ships remote code),
    # which knows nothing of the drop. Registered, it resolves to this plugin, whose hook refuses it; the class named
    # is only inspected, never built.
    if NEXT_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(NEXT_ARCHITECTURE, "megavictor.serving.model:VictorLlavaForConditionalGeneration")
    MODELS_CONFIG_MAP[NEXT_ARCHITECTURE] = VictorLlavaNextRefusal
    register_spec()
