"""megavictor: Victor (visual compact token register) VLMs on megatron-core."""

import warnings

# megatron-core announces at import time every optional GPU library it falls back from; on CPU that is expected.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(is|are) not installed.*")

__version__ = "0.1.0"
