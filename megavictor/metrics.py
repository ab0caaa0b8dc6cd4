"""Per-step metrics: `RUN_DIR/metrics.jsonl`, a progress bar, and wandb (offline by default).

Also the analytic FLOP count behind MFU. It knows Victor: layers < k run on every slot, layers >= k only on the
slots that survive the drop, and the frozen ViT runs forward only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megavictor.config import Config
from megavictor.model.batch import KIND_VISUAL, VictorBatch
from megavictor.plan import TRAIN_FACTOR, transformer_layer_flops

# Peak dense throughput used for MFU where no GPU says otherwise (CPU: a nominal 1 TFLOP/s per process).
DEFAULT_PEAK_FLOPS = {"cpu": 1e12, "bf16_gpu": 989e12}


def batch_train_flops(cfg: Config, batch: VictorBatch) -> float:
    """Training FLOPs of one micro-batch for the whole model (all tp/pp ranks together)."""
    m, v = cfg.model, cfg.vision
    groups = m.num_query_groups or m.num_attention_heads
    rows, long = batch.shape
    visual_per_row = (batch.kinds == KIND_VISUAL).sum(dim=1)
    total = 0.0
    for r in range(rows):
        short = long - int(visual_per_row[r]) if cfg.victor.enabled else long
        for i in range(m.num_layers):
            seq = short if (cfg.victor.enabled and i >= cfg.victor.drop_layer) else long
            total += TRAIN_FACTOR * transformer_layer_flops(seq, m.hidden_size, m.ffn_hidden_size,
                                                            m.num_attention_heads, groups, gated=True)
        total += TRAIN_FACTOR * 2.0 * short * m.hidden_size * m.vocab_size
    images = batch.images.shape[0]
    vit = v.num_layers * transformer_layer_flops(v.num_visual_tokens + 1, v.hidden_size, v.ffn_hidden_size,
                                                 v.num_attention_heads, v.num_attention_heads, gated=False)
    total += images * (1.0 if v.freeze else TRAIN_FACTOR) * vit
    return total


def peak_flops() -> float:
    if torch.cuda.is_available():
        return DEFAULT_PEAK_FLOPS["bf16_gpu"]
    return DEFAULT_PEAK_FLOPS["cpu"]


class MetricsLogger:
    """Writes one JSON object per optimizer step; only the process that holds the reported loss writes."""

    def __init__(self, cfg: Config, run_dir: Path, active: bool, total_steps: int, start_step: int) -> None:
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._drop_steps_after(start_step)
        if cfg.log.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.log.project, dir=str(run_dir), config=cfg.to_dict(),
                                     name=run_dir.name, resume="allow", id=_wandb_id(run_dir))
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _drop_steps_after(self, step: int) -> None:
        """On resume, forget lines for steps the checkpoint does not cover (logged after it, then lost)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar is not None and "loss" in record:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable run id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
