"""Image bytes to the vision encoder's input: RGB, LLaVA-1.5's pad-to-square (or CLIP's centre crop) or LLaVA-NeXT's
anyres tiles, CLIP mean/std.

`pad` (LLaVA-1.5's `image_aspect_ratio: pad`, the default) pads the shorter side symmetrically with the mean colour
and resizes the square to `image_size`, so nothing of the image is cut off; `crop` resizes the shortest side to
`image_size` and centre-crops (CLIP's processor). Transparent images are composited on that same mean colour (the
colour the padding uses), not on the black that dropping the alpha channel would leave. `anyres` (`load_anyres`) gives
each image a base view and the tiles of its best-fitting grid, pixel for pixel as transformers'
`LlavaNextImageProcessor` (PIL backend) makes them.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from megavictor.config import ImageAspectRatio
from megavictor.hf_model.anyres import AnyresSpec, select_best_resolution

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # what LLaVA's expand2square (and HF's do_pad) fills with


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on `PAD_COLOR`."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, PAD_COLOR + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes, image_size: int, aspect: str = ImageAspectRatio.PAD) -> torch.Tensor:
    """Decode to a [3, image_size, image_size] float tensor, normalised as CLIP's processor does."""
    with Image.open(io.BytesIO(data)) as opened:
        image = to_rgb(opened)
    w, h = image.size
    if aspect == ImageAspectRatio.PAD and w != h:
        square = Image.new("RGB", (max(w, h), max(w, h)), PAD_COLOR)
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image, (w, h) = square, square.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)  # shortest side to image_size (bicubic), then centre crop
        image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return normalize(image)


def normalize(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] float tensor, scaled to [0, 1] and normalised with CLIP's mean and std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def load_anyres(data: bytes, spec: AnyresSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode to LLaVA-NeXT's views [1 + rows * cols, 3, tile, tile] and the original (height, width).

    The base view is the whole image resized to one tile (bicubic; the aspect ratio is not kept). For the tiles the
    image is resized to fit the best pinpoint grid (`select_best_resolution`) keeping its aspect ratio, the fitted
    side rounded up, centred on black (zero before normalisation; an odd extra pixel goes bottom/right), and cut
    into tiles row-major: transformers' `get_image_patches`, so an export's processor and training agree.
    """
    with Image.open(io.BytesIO(data)) as opened:
        image = to_rgb(opened)
    width, height = image.size
    grid_height, grid_width = select_best_resolution(height, width, spec.pinpoints)
    scale_w, scale_h = grid_width / width, grid_height / height
    if scale_w < scale_h:
        fit_w, fit_h = grid_width, min(math.ceil(height * scale_w), grid_height)
    else:
        fit_w, fit_h = min(math.ceil(width * scale_h), grid_width), grid_height
    canvas = Image.new("RGB", (grid_width, grid_height), (0, 0, 0))
    canvas.paste(image.resize((fit_w, fit_h), Image.Resampling.BICUBIC),
                 ((grid_width - fit_w) // 2, (grid_height - fit_h) // 2))
    tile = spec.tile
    views = [image.resize((tile, tile), Image.Resampling.BICUBIC)]
    views += [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, grid_height, tile)
              for x in range(0, grid_width, tile)]
    return torch.stack([normalize(view) for view in views]), (height, width)
