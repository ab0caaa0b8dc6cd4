"""Tiny configs and hand-built packed batches shared by the model tests."""

from __future__ import annotations

import torch

from megavictor.config import Config, load_config
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample
from megavictor.model.batch import VictorBatch

SEQ_LENGTH = 128


def tiny_config(overrides: list[str] | None = None) -> Config:
    """4-layer decoder, 2-layer ViT with 16 visual tokens, 8 registers, k=3: the model at test size."""
    return load_config(None, [f"data.seq_length={SEQ_LENGTH}", "log.wandb=false", *(overrides or [])])


def samples(seed: int = 0) -> dict[str, Sample]:
    g = torch.Generator().manual_seed(seed)

    def image() -> torch.Tensor:
        return torch.randn(3, 32, 32, generator=g)

    def text(n: int) -> list[int]:
        return torch.randint(3, 500, (n,), generator=g).tolist()

    one_image = text(3) + [IMAGE_PLACEHOLDER] + text(6)
    text_only = text(9)
    two_images = [IMAGE_PLACEHOLDER] + text(2) + [IMAGE_PLACEHOLDER] + text(7)
    return {
        "one_image": Sample(one_image, [i >= 5 for i in range(len(one_image))], [image()]),
        "text_only": Sample(text_only, [i >= 3 for i in range(len(text_only))], []),
        "two_images": Sample(two_images, [i >= 4 for i in range(len(two_images))], [image(), image()]),
    }


# LLaVA-NeXT's grids at the tiny ViT's 32-px tiles; `ANYRES` turns them on for `tiny_config` (rows of 256 slots).
TEST_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
ANYRES = [f"vision.image_grid_pinpoints={TEST_PINPOINTS}", "data.image_aspect_ratio=anyres", "data.seq_length=256"]


def anyres_samples(cfg: Config, seed: int = 0) -> dict[str, Sample]:
    """`samples()`' structures with anyres images of different grids: one_image 90x25 (3x1 tiles, 76 visual
    tokens), two_images 20x60 (1x2, 34) and 40x40 (2x2, 88), and another_image 30x50 (1x2, 44)."""
    spec = cfg.vision.anyres()
    fixed, g = samples(seed), torch.Generator().manual_seed(seed + 1)

    def with_images(sample: Sample, sizes: list[tuple[int, int]]) -> Sample:
        layouts = [spec.layout(h, w) for h, w in sizes]
        views = [torch.randn(layout.tiles, 3, spec.tile, spec.tile, generator=g) for layout in layouts]
        return Sample(sample.tokens, sample.trainable, views, sizes, [layout.tokens for layout in layouts])

    return {"one_image": with_images(fixed["one_image"], [(90, 25)]), "text_only": fixed["text_only"],
            "two_images": with_images(fixed["two_images"], [(20, 60), (40, 40)]),
            "another_image": with_images(fixed["one_image"], [(30, 50)])}


def packed_batches(cfg: Config) -> list[VictorBatch]:
    """Two micro-batches of packed samples with different image counts (so the short lengths differ); anyres
    images of different grids when `cfg` has them on."""
    if cfg.vision.anyres():
        s, r = anyres_samples(cfg), cfg.victor.registers_per_image
        lay = lambda name: expand_sample(s[name], 0, r)  # noqa: E731  (each image brings its own count)
        return [collate_rows([[lay("one_image"), lay("text_only"), lay("two_images")]], cfg.data.seq_length),
                collate_rows([[lay("text_only"), lay("another_image")]], cfg.data.seq_length)]
    s = samples()
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    lay = lambda name: expand_sample(s[name], v, r)  # noqa: E731
    first = collate_rows([[lay("one_image"), lay("text_only"), lay("two_images")]], cfg.data.seq_length)
    second = collate_rows([[lay("text_only"), lay("one_image")]], cfg.data.seq_length)
    return [first, second]
