"""The demo's stand-in for a pretrained CLIP: the config's ViT, trained for a few seconds on the digits train pool.

LLaVA starts from a pretrained, frozen CLIP; nothing can be downloaded here, and a ViT trained from scratch
through a tiny from-scratch LLM learns visual tokens the LLM cannot read within the CPU budget (measured: cell
features linearly decodable only from whole cells, not from the tokens an attention head averages). So the
prep step pretrains the tower the way CLIP features behave: every patch token is trained to predict the digit
of its grid cell (or "empty") and which cell it lies in, with linear heads on the last layer's patch outputs.
Only `caption_train` images (train-pool scans) are used; held-out accuracy on `caption_val` is reported. `--hires`
data trains it on each canvas's native 32-px tiles (2x2 cells each), the views anyres shows it.

The tower's weights go to `<data>/vision_encoder.safetensors` under the full model's names (`vision.*`), what
`vision.init_from` reads; `<data>/vision_encoder.json` records the vision config, steps and accuracy.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.digits import HIRES_CELL, grid_of
from data_prep.shards import PrepError
from megavictor.config import Config, load_config
from megavictor.data.manifest import VISION_ENCODER_FILE

EMPTY = 10  # the class of an empty cell, after the digits 0-9
BATCH = 64
LR = 2e-3


def _split_images(data: Path, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All training views of a split [N, 3, S, S] and their cells' digits [N, cells] (EMPTY for an empty cell): each
    32x32 image, or each `--hires` canvas cut into its native S-px tiles (what the anyres tiles show the ViT: a CLIP
    is trained at its own resolution, not on images shrunk below it)."""
    from megavictor.data.images import load_image
    from megavictor.data.manifest import load_manifest
    from megavictor.data.reader import ShardReader

    reader = ShardReader(data, load_manifest(data).split_shards(split))
    images, digits = [], []
    for _, raw in reader.read(range(len(reader))):
        record = json.loads(raw["json"])
        cells = [EMPTY if d is None else d for d in record["digits"]]
        if "grid" in record:
            for view, view_cells in hires_tiles(raw["png"], record["grid"], cells, image_size):
                images.append(view)
                digits.append(view_cells)
        else:
            images.append(load_image(raw["png"], image_size))
            digits.append(cells)
    return torch.stack(images), torch.tensor(digits)


def hires_tiles(png: bytes, grid: list[int], cells: list[int], tile: int) -> list[tuple[torch.Tensor, list[int]]]:
    """A `--hires` canvas of grid = [rows, cols] cells cut into native tile x tile views (row-major, as the anyres
    tiles of a canvas that is its own pinpoint), each with its cells' entries of `cells` in reading order."""
    from PIL import Image

    from megavictor.data.images import normalize, to_rgb

    rows, cols = grid
    per_tile = tile // HIRES_CELL
    if tile % HIRES_CELL or rows % per_tile or cols % per_tile:
        raise PrepError(f"vision.image_size={tile}: a --hires tile must hold whole {HIRES_CELL}-px cells and tile "
                        f"every canvas ({rows * HIRES_CELL}x{cols * HIRES_CELL} px); use 32")
    with Image.open(io.BytesIO(png)) as opened:
        canvas = normalize(to_rgb(opened))
    views = []
    for top in range(0, rows, per_tile):
        for left in range(0, cols, per_tile):
            y, x = top * HIRES_CELL, left * HIRES_CELL
            views.append((canvas[:, y:y + tile, x:x + tile].contiguous(),
                          [cells[(top + r) * cols + left + c] for r in range(per_tile) for c in range(per_tile)]))
    return views


def cell_of_patch(cfg: Config, grid: int) -> torch.Tensor:
    """[patches]: which cell of a grid x grid image (reading order) each ViT patch lies in."""
    patches = cfg.vision.image_size // cfg.vision.patch_size
    if patches % grid:
        raise ValueError(f"vision.image_size / vision.patch_size = {patches} patches per side must be a multiple of "
                         f"{grid}: the demo's vision pretraining labels patches by {grid}x{grid} grid cell")
    per_cell = patches // grid
    return torch.tensor([(r // per_cell) * grid + c // per_cell for r in range(patches) for c in range(patches)])


def pretrain_vision_encoder(data: Path, config: Path, steps: int, seed: int = 0) -> dict:
    """Train `config`'s ViT on `data`'s digit grids and write it next to the shards; returns the record."""
    from safetensors.torch import save_file

    from megavictor.distributed import init_distributed
    from megavictor.model.vlm import build_vision_tower

    cfg = load_config(config, [f"train.seed={seed}"])
    init_distributed(tp=1, pp=1, seed=seed)
    torch.manual_seed(seed)
    tower = build_vision_tower(cfg)
    hidden = cfg.vision.hidden_size
    train_x, train_y = _split_images(data, "caption_train", cfg.vision.image_size)
    val_x, val_y = _split_images(data, "caption_val", cfg.vision.image_size)
    grid = grid_of(train_y[0].tolist())
    cells = cell_of_patch(cfg, grid)
    digit_head, cell_head = torch.nn.Linear(hidden, EMPTY + 1), torch.nn.Linear(hidden, grid * grid)

    def loss_and_hits(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tower(x)[:, 1:]  # patch outputs, the class token dropped as the VLM does
        digit_logits, cell_logits = digit_head(tokens), cell_head(tokens)
        target = y[:, cells]  # each patch's cell digit
        loss = (F.cross_entropy(digit_logits.flatten(0, 1), target.flatten())
                + F.cross_entropy(cell_logits.flatten(0, 1), cells.repeat(len(x))))
        return loss, (digit_logits.argmax(-1) == target)[target != EMPTY]

    params = [*tower.parameters(), *digit_head.parameters(), *cell_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    # OneCycleLR needs a warm-up of more than one step (pct_start * total_steps > 1): 5%, or 2 steps of short runs.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=max(steps, 3),
                                                   pct_start=max(0.05, 2 / max(steps, 3)))
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    for _ in range(steps):
        batch = torch.randint(len(train_x), (BATCH,), generator=generator)
        loss, _ = loss_and_hits(train_x[batch], train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    tower.eval()
    with torch.no_grad():
        _, hits = loss_and_hits(val_x, val_y)
    record = {"config": config.name, "vision": cfg.to_dict()["vision"], "steps": steps, "seed": seed,
              "val_digit_token_accuracy": round(float(hits.float().mean()), 4)}
    save_file({f"vision.{name}": p.detach().contiguous() for name, p in tower.named_parameters()},
              str(data / VISION_ENCODER_FILE))
    (data / "vision_encoder.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def ensure_vision_encoder(out: Path, config: Path, steps: int, seed: int) -> None:
    """Pretrain the demo's vision tower unless `out` already holds one from the same config, steps and seed."""
    record_path = out / "vision_encoder.json"
    if (out / VISION_ENCODER_FILE).is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        wanted = {"vision": load_config(config, []).to_dict()["vision"], "steps": steps, "seed": seed}
        if all(record.get(k) == v for k, v in wanted.items()):
            return
    print(f"pretraining the vision tower of {config} ({steps} steps) ...", flush=True)
    record = pretrain_vision_encoder(out, config, steps, seed)
    print(f"wrote {out / VISION_ENCODER_FILE}: held-out digit accuracy per patch token "
          f"{record['val_digit_token_accuracy']}")
