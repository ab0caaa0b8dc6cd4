"""Training engines: the shared step loop (`loop`) and the DeepSpeed engine (`deepspeed`, imported on demand).

The megatron engine lives in `megavictor.trainer`, the `megavictor train` entry point, which picks one by
`train.engine`.
"""
