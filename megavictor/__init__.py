"""megavictor: Victor (visual compact token register) VLMs on megatron-core."""

import warnings

# megatron-core announces at import time every optional GPU library it falls back from; on CPU that is expected.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(is|are) not installed.*")
# dist_checkpointing still builds torch ShardedTensors; torch's deprecation notice is megatron's to act on.
warnings.filterwarnings("ignore", message=r".*deprecating ShardedTensor.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")

__version__ = "0.1.0"
