"""The exported Victor LLaVA as transformers loads it (config, model, processor, the drop's gather convention).

These files are the remote code every Victor export ships (`trust_remote_code=True`): they import transformers and
torch and each other, never the rest of megavictor, so they run without it. Inside megavictor they are the bottom
layer: the megatron and reference models share `victor_drop`'s gather convention with the export, the DeepSpeed
engine trains `modeling_victor_llava` itself, and `megavictor.hf` converts weights to and from them.
"""
