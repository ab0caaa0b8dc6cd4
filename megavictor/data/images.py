"""Image bytes to the vision encoder's input: RGB, LLaVA-1.5's pad-to-square (or CLIP's centre crop), CLIP mean/std.

`pad` (LLaVA-1.5's `image_aspect_ratio: pad`, the default) pads the shorter side symmetrically with the mean colour
and resizes the square to `image_size`, so nothing of the image is cut off; `crop` resizes the shortest side to
`image_size` and centre-crops (CLIP's processor). Transparent images are composited on that same mean colour (the
colour the padding uses), not on the black that dropping the alpha channel would leave.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from megavictor.config import ImageAspectRatio

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
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()
