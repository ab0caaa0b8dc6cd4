"""vLLM's CPU worker with the model runner's lookback buffer, which the CPU runner's `load_model` leaves out.

The GPU runner gives models that set `token_lookback_depth` each request's prompt tokens before its first scheduled
token (`lookback_token_ids`); the CPU runner overrides `load_model` without that step. Victor's model needs it to
place each token in short coordinates, so on CPU the config hook selects this worker.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.cpu_worker import CPUWorker


class VictorCPUWorker(CPUWorker):
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        depth = getattr(runner.model, "token_lookback_depth", 0)
        if depth and runner.lookback_token_ids is None:
            buffer = runner._make_buffer(runner.max_num_reqs, depth, dtype=torch.int32)
            buffer.gpu = buffer.cpu  # the CPU runner's buffers are one tensor (as its `_postprocess_tensors` does)
            runner.lookback_token_ids = buffer
