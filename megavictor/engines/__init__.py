"""Training engines: one interface (`base.Engine`), two implementations.

- `megatron`: tp x pp x dp on megatron-core (`VictorVLM`, megatron DDP and optimizer, dist_checkpointing).
- `deepspeed`: ZeRO-1/2/3 data parallel on the HF-format model (imported only when chosen).

The training loop (`megavictor.training.loop`) composes an engine; it never subclasses one.
"""
