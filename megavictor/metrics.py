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
from megavictor.errors import notice
from megavictor.model.batch import KIND_VISUAL, VictorBatch
from megavictor.model.peers import removed_visual, shortened_from
from megavictor.pipeline_split import TRAIN_FACTOR, transformer_layer_flops

# Peak dense throughput used for MFU where no GPU says otherwise (CPU: a nominal 1 TFLOP/s per process).
DEFAULT_PEAK_FLOPS = {"cpu": 1e12, "bf16_gpu": 989e12}


def decoder_flops(cfg: Config, long: int, short: int, factor: float = TRAIN_FACTOR, head_tokens: int | None = None,
                  context_long: int | None = None, context_short: int | None = None) -> float:
    """FLOPs of the decoder and output layer for one row: layers < k on `long` slots, layers >= k on `short`
    slots (the baseline passes short == long), times `factor` (3 for training, 1 for a forward).

    `head_tokens` is how many slots reach the output layer (default `short`; generation computes only the last);
    `context_long` / `context_short` are the attention key counts (default: the row itself, full-square; decoding
    passes the KV cache length of each side of the drop).
    """
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    total = 0.0
    first_short = shortened_from(cfg)
    for i in range(m.num_layers):
        dropped = first_short is not None and i >= first_short
        seq, context = (short, context_short) if dropped else (long, context_long)
        total += factor * transformer_layer_flops(seq, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                                  groups, gated=True, context=context)
    head = short if head_tokens is None else head_tokens
    return total + factor * 2.0 * head * m.hidden_size * m.vocab_size


def vision_flops(cfg: Config, images: int, train: bool = True) -> float:
    """ViT (+ class token) and projector for `images` images; a frozen ViT (or inference) runs forward only."""
    v, m = cfg.vision, cfg.model
    vit = v.num_layers * transformer_layer_flops(v.num_visual_tokens + 1, v.hidden_size, v.ffn_hidden_size,
                                                 v.num_attention_heads, v.num_attention_heads, gated=False)
    projector = 2.0 * v.num_visual_tokens * (v.hidden_size * m.hidden_size + m.hidden_size * m.hidden_size)
    vit_factor = TRAIN_FACTOR if (train and not v.freeze) else 1.0
    return images * (vit_factor * vit + (TRAIN_FACTOR if train else 1.0) * projector)


def batch_train_flops(cfg: Config, batch: VictorBatch) -> float:
    """Training FLOPs of one micro-batch for the whole model (all tp/pp ranks together)."""
    visual_per_row = (batch.kinds == KIND_VISUAL).sum(dim=1).tolist()
    return rows_train_flops(cfg, batch.shape[1], visual_per_row, batch.images.shape[0])


def rows_train_flops(cfg: Config, long: int, visual_per_row: list[int], images: int) -> float:
    """Training FLOPs of rows of `long` slots holding these visual slots and images (what the packing plan
    knows of a global batch)."""
    total = sum(decoder_flops(cfg, long, long - removed_visual(cfg, visual)) for visual in visual_per_row)
    return total + vision_flops(cfg, images, train=True)


def generate_flops(cfg: Config, rows: int, visual: int, prompt: int, new_tokens: int) -> float:
    """Forward FLOPs of `generate` with a KV cache: `rows` prompts of `prompt` slots holding `visual` visual
    slots each (one image per prompt), a prefill that computes logits for the last slot only, then
    `new_tokens - 1` single-token decode steps."""
    short = prompt - removed_visual(cfg, visual)
    total = rows * decoder_flops(cfg, prompt, short, factor=1.0, head_tokens=1)
    for t in range(1, new_tokens):
        total += rows * decoder_flops(cfg, 1, 1, factor=1.0, context_long=prompt + t, context_short=short + t)
    return total + vision_flops(cfg, rows, train=False)


def peak_flops() -> float:
    if torch.cuda.is_available():
        return DEFAULT_PEAK_FLOPS["bf16_gpu"]
    return DEFAULT_PEAK_FLOPS["cpu"]


class MetricsLogger:
    """Writes one JSON object per optimizer step; only the process that holds the reported loss writes."""

    def __init__(self, cfg: Config, run_dir: Path, active: bool, total_steps: int, start_step: int) -> None:
        self.active = active
        self.interval = cfg.log.log_interval
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
        """On resume, forget lines for steps the checkpoint does not cover (logged after it, then lost), and a torn
        last line (the job killed, or the disk full, during an append), saying so."""
        if not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                notice(f"{self.path}: dropped line {number}, torn by an interrupted append ({line[:40]!r}...)")
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Every step into metrics.jsonl; every `log.log_interval` steps (and always with a val_loss) to wandb and
        the progress bar's figures."""
        if not self.active:
            return
        append_line(self.path, json.dumps(record))
        self._bar.update(1)
        if record["step"] % self.interval and "val_loss" not in record:
            return
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                              tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def append_line(path: Path, line: str) -> None:
    """Append `line` with one write(2) of the whole line; a short write (a full disk) is undone, so that the file
    never ends in a torn line that the job itself left."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd).st_size
        try:
            written, error = os.write(fd, data), "a short write"
        except OSError as exc:
            written, error = -1, str(exc)
        if written != len(data):
            os.ftruncate(fd, before)
            raise OSError(f"{path}: could not append a line ({error})")
    finally:
        os.close(fd)


def _wandb_id(run_dir: Path) -> str:
    """A stable run id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
