"""Write N samples per class as PNGs, sharded over ranks, with results independent of the rank count.

Work is cut into chunks of at most ``batch_size`` images of one class: chunk ``(c, start)`` holds
images ``start .. start + n - 1`` of class ``c`` and is sampled with a generator seeded from
``(seed, c, start)`` only. Chunks are dealt to ranks round-robin, so 1 GPU or 8 GPUs write
byte-identical files; changing ``batch_size`` changes the chunks and therefore the samples. On the CPU the
numerics also depend on the threads per process: torchrun gives each worker ``OMP_NUM_THREADS=1``, so compare
with a 1-process run under the same setting.
Output: ``out_dir/<class index>/<image index:06d>.png``. Chunks whose files all exist are skipped
(resume after preemption) unless ``overwrite`` is set.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, List, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import HMARError

SampleFn = Callable[[torch.LongTensor, torch.Generator], torch.Tensor]


def chunk_seed(seed: int, class_index: int, start: int) -> int:
    """A 63-bit seed that depends only on the run seed, the class and the chunk's first image index."""
    digest = hashlib.sha256(f"hmar-samples:{seed}:{class_index}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def plan_chunks(num_classes: int, per_class: int, batch_size: int) -> List[Tuple[int, int, int]]:
    """Every ``(class, start, count)`` chunk, in a fixed order (class-major)."""
    if num_classes < 1 or per_class < 1 or batch_size < 1:
        raise HMARError(f"num_classes, per_class and batch_size must be positive, got "
                        f"{num_classes}, {per_class}, {batch_size}")
    return [(c, s, min(batch_size, per_class - s)) for c in range(num_classes) for s in range(0, per_class, batch_size)]


def dist_rank_world() -> Tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment torchrun sets; ``(0, 1)`` when not launched by it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as e:
        raise HMARError(f"RANK/WORLD_SIZE must be integers: {e}") from e
    return rank, world


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> ``uint8 [B, H, W, 3]`` (rounded, clamped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise HMARError(f"sample_fn must return [B, 3, H, W] images, got shape {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def generate_samples(sample_fn: SampleFn, num_classes: int, per_class: int, batch_size: int,
                     out_dir: Union[str, Path], seed: int, rank: int = 0, world_size: int = 1,
                     device: Union[str, torch.device] = "cpu", overwrite: bool = False) -> List[Path]:
    """Sample this rank's chunks with ``sample_fn(labels, generator) -> [B, 3, H, W] in [0, 1]``; returns files written."""
    if not 0 <= rank < world_size:
        raise HMARError(f"rank {rank} is outside world size {world_size}")
    out = Path(out_dir)
    written: List[Path] = []
    for i, (c, start, n) in enumerate(plan_chunks(num_classes, per_class, batch_size)):
        if i % world_size != rank:
            continue
        files = [out / str(c) / f"{start + j:06d}.png" for j in range(n)]
        if not overwrite and all(f.is_file() for f in files):
            continue
        gen = torch.Generator(device=device).manual_seed(chunk_seed(seed, c, start))
        labels = torch.full((n,), c, dtype=torch.long, device=device)
        images = to_uint8_images(sample_fn(labels, gen))
        if len(images) != n:
            raise HMARError(f"sample_fn returned {len(images)} images for {n} labels")
        files[0].parent.mkdir(parents=True, exist_ok=True)
        for f, img in zip(files, images):
            tmp = f.with_name(f.name + ".part")  # not an image suffix: never read by evaluation
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(tmp, format="PNG")
            tmp.replace(f)  # a file either is complete or does not exist
            written.append(f)
    return written
