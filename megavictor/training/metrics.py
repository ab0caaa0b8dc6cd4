"""Per-step metrics: `RUN_DIR/metrics.jsonl`, a progress bar, and wandb (offline by default); MFU from the
analytic FLOP count (`megavictor.model.flops`) and the hardware's peak."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megavictor.config import Config
from megavictor.errors import notice

# Peak dense throughput used for MFU where no GPU says otherwise (CPU: a nominal 1 TFLOP/s per process).
DEFAULT_PEAK_FLOPS = {"cpu": 1e12, "bf16_gpu": 989e12}


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

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        """Closed once however the loop ends (finished, stopped, diverged)."""
        self.close()


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
