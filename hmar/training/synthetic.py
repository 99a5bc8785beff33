"""A tiny synthetic image-folder data set (coloured shapes) for tests, demos and smoke runs."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "cross", "ring", "square", "stripe", "triangle")  # sorted: folder order = class order
COLOURS = ((220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 180, 30), (150, 50, 180), (30, 170, 190))


def make_shapes_folder(root: Union[str, Path], classes: int = 3, per_class: int = 30, size: int = 64,
                       seed: int = 0, val_per_class: int = 0, formats: Sequence[str] = ("png",)) -> Path:
    """Write ``root/<shape>/*.png`` (or ``root/train`` + ``root/val`` when ``val_per_class > 0``): class
    ``c`` is a shape of colour ``c`` at a random position and scale on a light random background."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = [("train", per_class), ("val", val_per_class)] if val_per_class > 0 else [("", per_class)]
    for split, n in splits:
        for c in range(classes):
            d = (root / split if split else root) / SHAPES[c % len(SHAPES)]
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = _shape_image(c, size, rng)
                fmt = formats[i % len(formats)]
                im.save(d / f"{i:04d}.{fmt}")
    return root


def _shape_image(c: int, size: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    dr = ImageDraw.Draw(im)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    col = tuple(int(min(255, max(0, v + rng.integers(-20, 21)))) for v in COLOURS[c % len(COLOURS)])
    box = [cx - r, cy - r, cx + r, cy + r]
    kind = SHAPES[c % len(SHAPES)]
    if kind == "circle":
        dr.ellipse(box, fill=col)
    elif kind == "square":
        dr.rectangle(box, fill=col)
    elif kind == "triangle":
        dr.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif kind == "cross":
        w = r / 3
        dr.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        dr.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    elif kind == "ring":
        dr.ellipse(box, outline=col, width=max(2, int(r / 3)))
    else:  # stripe
        dr.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=col)
    return im


def class_folders(root: Union[str, Path]) -> List[Path]:
    """The class folders of a synthetic data set (sorted)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir())


# a tokenizer small enough for CPU tests (vqvae-tiny's scales and 64 px images, fewer channels and blocks)
SMALL_TOKENIZER = dict(ch=16, norm_groups=8, num_res_blocks=1, using_sa=False, using_mid_sa=False)


def make_random_tokenizer(directory: Union[str, Path], preset: str = "vqvae-tiny", seed: int = 0, **overrides) -> Path:
    """Save an untrained (randomly initialised, deterministic) tokenizer directory: enough to test the
    transformer trainers, whose tokens only need to be a fixed function of the images."""
    import torch

    from ..presets import tokenizer_config
    from ..tokenizer import VQVAE
    from .tokenizer_io import save_tokenizer
    torch.manual_seed(seed)
    vq = VQVAE(tokenizer_config(preset, **{**SMALL_TOKENIZER, **overrides}))
    return save_tokenizer(directory, vq)
