"""Serving Victor exports with vLLM: an out-of-tree vLLM plugin (entry point `vllm.general_plugins`).

After `megavictor convert to-hf`, `vllm serve EXPORT --trust-remote-code` and `LLM(model=EXPORT,
trust_remote_code=True)` run the export with stock vLLM: layers >= k keep KV blocks only for registers and text.

- `plugin`: what vLLM calls at start-up (model registration, the config hook that picks the scheduler and worker).
- `short_cache`: the KV cache spec, block manager and scheduler of the layers after the drop ("short" coordinates:
  a token's slot is its index among its request's non-visual tokens).
- `model`: the vLLM model (stock LLaVA parts; the drop in the decoder loop) and its multimodal processor.
- `worker`: vLLM's CPU worker, completed where its runner omits a feature the model uses.

These modules import vLLM and nothing of megavictor, so they run in the serving venv (`python -m
megavictor.serving.venv` builds it) and are imported by nothing in megavictor but the serving benchmark's script.
"""
