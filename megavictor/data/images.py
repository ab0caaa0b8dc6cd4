"""Image bytes to the vision encoder's input: RGB, CLIP-style resize + centre crop, CLIP mean/std."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(data: bytes, image_size: int) -> torch.Tensor:
    """Decode to a [3, image_size, image_size] float tensor, normalised as CLIP's processor does."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    w, h = image.size
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
