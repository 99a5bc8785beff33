"""Write N samples per class as PNGs, sharded over ranks, with results independent of the rank count.

Work is cut into chunks of at most ``batch_size`` images of one class: chunk ``(c, start)`` holds
images ``start .. start + n - 1`` of class ``c`` and is sampled with a generator seeded from
``(seed, c, start)`` only. Chunks are dealt to ranks round-robin, so 1 GPU or 8 GPUs write
byte-identical files; changing ``batch_size`` changes the chunks and therefore the samples. On the CPU the
numerics also depend on the threads per process: torchrun gives each worker ``OMP_NUM_THREADS=1``, so compare
with a 1-process run under the same setting.
Output: ``out_dir/<class index>/<image index:06d>.png``. Chunks whose files all exist are skipped
(resume after preemption) unless ``overwrite`` is set. ``out_dir/generate.json`` records what the images depend on
(model, seed, batch size, sampling options, precision): a resume with other settings, or into a folder holding
images beyond the run's classes and count, is refused, since an evaluation would mix or count them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import HMARError
from ..fileio import atomic_path

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


SETTINGS_FILE = "generate.json"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's weights (each tensor's shape and the sum of its first 4096 values in fp64): cheap
    for any size, and other weights give another digest."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            head = t.detach().flatten()[:4096].double().sum().item() if t.numel() else 0.0
            h.update(f"{name}:{tuple(t.shape)}:{head!r};".encode())
    return h.hexdigest()[:16]


def check_settings(out_dir: Union[str, Path], settings: Dict[str, Any], overwrite: bool, rank: int = 0) -> None:
    """Refuse to resume into ``out_dir`` when its ``generate.json`` records other settings (unless ``overwrite``);
    rank 0 writes the file (atomically) for a new folder or an overwrite."""
    path = Path(out_dir) / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))          # as it reads back (tuples -> lists)
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = (", ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in sorted(set(old) | set(
                settings)) if old.get(k) != settings.get(k)) if isinstance(old, dict) else "unreadable")
            raise HMARError(f"{out_dir} holds samples made with other settings ({diff}); resuming would mix them: "
                            "pass a new --out, or --overwrite to regenerate every image")
        return
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=1) + "\n")


def extra_images(out_dir: Union[str, Path], num_classes: int, per_class: int) -> List[Path]:
    """Sample files in ``out_dir`` outside this run's plan (a class index >= ``num_classes`` or an image index >=
    ``per_class``): left by a larger earlier run, an evaluation would count them."""
    out = []
    for f in sorted(Path(out_dir).glob("*/*.png")):
        if re.fullmatch(r"\d+", f.parent.name) and re.fullmatch(r"\d{6}", f.stem) and (
                int(f.parent.name) >= num_classes or int(f.stem) >= per_class):
            out.append(f)
    return out


def generate_samples(sample_fn: SampleFn, num_classes: int, per_class: int, batch_size: int,
                     out_dir: Union[str, Path], seed: int, rank: int = 0, world_size: int = 1,
                     device: Union[str, torch.device] = "cpu", overwrite: bool = False,
                     settings: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Sample this rank's chunks with ``sample_fn(labels, generator) -> [B, 3, H, W] in [0, 1]``; returns files written.

    ``settings`` (what the images depend on besides ``seed`` and ``batch_size``, e.g. the model's fingerprint and
    the sampling options) are checked against those of an earlier run into ``out_dir``, see :func:`check_settings`."""
    if not 0 <= rank < world_size:
        raise HMARError(f"rank {rank} is outside world size {world_size}")
    out = Path(out_dir)
    plan = plan_chunks(num_classes, per_class, batch_size)
    extra = extra_images(out, num_classes, per_class)
    if extra:
        raise HMARError(f"{out} holds {len(extra)} images outside this run's {num_classes} classes x {per_class} "
                        f"(e.g. {extra[0].relative_to(out)}), which an evaluation would count: pass a new --out, or "
                        "remove them")
    check_settings(out, {"seed": int(seed), "batch_size": int(batch_size), **(settings or {})}, overwrite, rank)
    written: List[Path] = []
    for i, (c, start, n) in enumerate(plan):
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
            with atomic_path(f) as tmp:  # a file either is complete or does not exist
                Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(tmp, format="PNG")
            written.append(f)
    return written
