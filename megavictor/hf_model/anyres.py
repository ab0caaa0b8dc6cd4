"""LLaVA-NeXT's "anyres" image layout as one pure function (standalone: torch is its only import, so it can ship with
exports), for everything that must agree on it: config checks, the data loader's token counts, the pipeline cost
model, the model's feature gather and the exported processor (issue #31).

An image of (height, width) pixels is fitted to the best of `pinpoints` (the grid resolutions a model was trained
with: largest effective resolution, then least waste) and cut into rows x cols tiles of `tile` pixels; the ViT also
sees the whole image resized to one tile (the base view). Its visual tokens are the base view's side^2 patches, then
the tiles' patch grid with the padding rows (or columns) the fit added removed ("unpadding"), each grid row closed by
a learned newline embedding. This is transformers' `LlavaNextForConditionalGeneration` arithmetic
(`select_best_resolution`, `image_size_to_num_patches`, `pack_image_features`, the processor's
`_get_number_of_features`), checked equal by tests/test_anyres.py in transformers 4.57, 5.19 and 5.25.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Pinpoints = tuple[tuple[int, int], ...]  # (height, width) of each candidate grid, in pixels


def select_best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) an image is fitted to: the largest effective resolution (the image's pixels that
    survive the fit, at most its own), then the least wasted area; the first listed wins a full tie."""
    best, best_effective, best_waste = pinpoints[0], 0, float("inf")
    for grid_height, grid_width in pinpoints:
        scale = min(grid_width / width, grid_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = grid_height * grid_width - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (grid_height, grid_width), effective, waste
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """One image's tiles and visual tokens. The tiles' patch grid is [rows * side, cols * side]; the unpadded window
    kept of it starts at (top, left) and is height x width patches."""

    rows: int
    cols: int
    side: int  # patches per tile side (tile // patch)
    top: int
    height: int
    left: int
    width: int

    @property
    def tiles(self) -> int:
        """ViT inputs: the base view and the rows x cols tiles."""
        return 1 + self.rows * self.cols

    @property
    def tokens(self) -> int:
        """Visual slots: the base view's patches, then each kept grid row and its newline."""
        return self.side * self.side + self.height * (self.width + 1)


@lru_cache(maxsize=65536)
def anyres_layout(height: int, width: int, pinpoints: Pinpoints, tile: int, patch: int) -> AnyresLayout:
    """The layout of an image of (height, width) pixels (cached: data sets repeat sizes)."""
    grid_height, grid_width = select_best_resolution(height, width, pinpoints)
    rows, cols, side = grid_height // tile, grid_width // tile, tile // patch
    patches_down, patches_across = rows * side, cols * side
    top, left, kept_height, kept_width = 0, 0, patches_down, patches_across
    # The fit scaled the image to touch the grid on one axis and padded the other evenly; drop the padding's
    # patches (rounded as transformers' `unpad_image` rounds).
    if width / height > patches_across / patches_down:
        pad = (patches_down - int(round(height * (patches_across / width), 7))) // 2
        top, kept_height = pad, patches_down - 2 * pad
    else:
        pad = (patches_across - int(round(width * (patches_down / height), 7))) // 2
        left, kept_width = pad, patches_across - 2 * pad
    return AnyresLayout(rows, cols, side, top, kept_height, left, kept_width)


def max_anyres_tokens(pinpoints: Pinpoints, tile: int, patch: int) -> int:
    """The most visual tokens one image can take: a grid kept whole (an image of the grid's own shape)."""
    return max(anyres_layout(h, w, pinpoints, tile, patch).tokens for h, w in pinpoints)


@dataclass(frozen=True)
class AnyresSpec:
    """The settings every anyres computation takes together: the candidate grids and the ViT's tile and patch."""

    pinpoints: Pinpoints
    tile: int
    patch: int

    def layout(self, height: int, width: int) -> AnyresLayout:
        return anyres_layout(height, width, self.pinpoints, self.tile, self.patch)

    @property
    def max_tokens(self) -> int:
        return max_anyres_tokens(self.pinpoints, self.tile, self.patch)


def feature_index(layouts: list[AnyresLayout], newline: int) -> "torch.Tensor":
    """Where each visual slot's feature comes from, image after image, in `cat([tile features flattened to
    [sum(tiles) * side^2, H], newline[None]])` (the newline's row is `newline`): the base view's patches, then the
    kept grid row by row, each row closed by the newline. Built on the host, so the gather costs no device sync."""
    import torch  # here, not at the top: the config and the loader's counts need no torch

    parts, start = [], 0
    for layout in layouts:
        side, per_tile = layout.side, layout.side * layout.side
        parts.append(torch.arange(start, start + per_tile))
        y = torch.arange(layout.top, layout.top + layout.height)[:, None]
        x = torch.arange(layout.left, layout.left + layout.width)[None, :]
        tile = 1 + (y // side) * layout.cols + (x // side)  # grid patch (y, x) lies in this tile, after the base
        index = start + tile * per_tile + (y % side) * side + (x % side)
        parts.append(torch.cat([index, torch.full((layout.height, 1), newline)], dim=1).flatten())
        start += layout.tiles * per_tile
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
