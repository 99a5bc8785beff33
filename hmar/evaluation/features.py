"""Run feature extractors over image folders or tensors, in batches, reading each image once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from ..datasets.folder import UNREADABLE_IMAGE, list_images, load_image
from ..errors import HMARError

ImageSource = Union[str, Path, torch.Tensor, Sequence[Path]]


class Extractor(Protocol):
    """Images (uint8 ``[N, C, H, W]`` or float in [0, 1]) -> features ``[N, D]``; ``name`` keys caches."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _read(path: Path) -> np.ndarray:
    try:
        return load_image(path)
    except UNREADABLE_IMAGE as e:
        raise HMARError(f"cannot read the image {path} ({type(e).__name__}: {e}): re-save or remove it (the "
                        "statistics are over every image of the folder, so none is skipped)") from None


def _batches(source: ImageSource, batch_size: int):
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise HMARError(f"image tensor must be [N, C, H, W], got shape {tuple(source.shape)}")
        for i in range(0, len(source), batch_size):
            yield source[i:i + batch_size]
        return
    files = list_images(Path(source)) if isinstance(source, (str, Path)) else list(source)
    if not files:
        raise HMARError(f"no images found in {source}")
    for i in range(0, len(files), batch_size):
        arrays = [_read(Path(f)) for f in files[i:i + batch_size]]
        shapes = {a.shape for a in arrays}
        if len(shapes) == 1:
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        else:  # mixed sizes: one image at a time (the extractors resize internally)
            for a in arrays:
                yield torch.from_numpy(a[None]).permute(0, 3, 1, 2)


def extract_features(source: ImageSource, extractors: Sequence[Extractor], batch_size: int = 50,
                     progress: Optional[Callable[[int], None]] = None) -> List[np.ndarray]:
    """Features ``float32 [N, D_i]`` of every image of ``source`` for each extractor (one decoding pass)."""
    if batch_size < 1:
        raise HMARError(f"--batch-size must be at least 1, got {batch_size}")
    outs: List[List[np.ndarray]] = [[] for _ in extractors]
    done = 0
    with torch.inference_mode():
        for batch in _batches(source, batch_size):
            for out, ext in zip(outs, extractors):
                out.append(ext(batch).float().cpu().numpy())
            done += len(batch)
            if progress is not None:
                progress(done)
    return [np.concatenate(o, axis=0) for o in outs]
