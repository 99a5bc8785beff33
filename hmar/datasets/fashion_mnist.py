"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package -> 32x32 grayscale PNG folders.

The 28x28 images are padded with 2 black pixels on every side (centred, value 0) and saved as
8-bit grayscale PNGs (mode ``L``); readers convert to RGB. File names keep the index of the
image in its source split (``train/03_dress/00017.png`` is training image 17). The trainers take
``test/`` as the validation split (:data:`hmar.training.data.VAL_DIRS`).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import HMARError
from .folder import class_dir_name, clear_class_folders, write_metadata

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
PAD = 2  # 28 + 2 * 2 = 32
LICENSE_TEXT = """Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist)
Copyright (c) 2017 Zalando SE, https://tech.zalando.com
Taken from the Debian package dataset-fashion-mnist; converted to 32x32 PNG (2 px black border) by hmar.

The MIT License (MIT)

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise HMARError(f"{path} is not an IDX file (bad magic number); reinstall it with: {APT_COMMAND}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise HMARError(f"{path} holds IDX type 0x{dtype_code:02x}, expected unsigned bytes (0x08)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(data) - offset != count:
        raise HMARError(f"{path} is truncated: header says {shape}, file has {len(data) - offset} bytes "
                        f"of data; reinstall it with: {APT_COMMAND}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_split(source: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``[N]`` of one split (``"train"`` or ``"test"``)."""
    if split not in SPLIT_FILES:
        raise HMARError(f"unknown Fashion-MNIST split {split!r}; choose from {sorted(SPLIT_FILES)}")
    paths = [source / name for name in SPLIT_FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise HMARError(f"Fashion-MNIST file {missing[0]} not found in {source}: install the Debian "
                        f"package dataset-fashion-mnist ({APT_COMMAND}) or pass --source DIR")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise HMARError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise HMARError(f"{paths[1]} has label {labels.max()}, Fashion-MNIST has {len(CLASS_NAMES)} classes")
    return images, labels


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """Centre 28x28 images in a 32x32 black canvas."""
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=0)


def build_fashion_mnist(out: Path, source: Path = DEFAULT_SOURCE, splits: Sequence[str] = ("train", "test"),
                        limit_per_class: Optional[int] = None) -> Dict[str, int]:
    """Write ``out/<split>/<NN_class>/<index>.png`` (32x32, mode L); returns images written per split."""
    out, source = Path(out), Path(source)
    if limit_per_class is not None and limit_per_class < 1:
        raise HMARError(f"--limit-per-class must be at least 1, got {limit_per_class}")
    loaded = {split: load_split(source, split) for split in splits}  # fail before writing anything
    write_metadata(out, CLASS_NAMES, LICENSE_TEXT)
    folders = [class_dir_name(i, n, len(CLASS_NAMES)) for i, n in enumerate(CLASS_NAMES)]
    counts: Dict[str, int] = {}
    for split, (images, labels) in loaded.items():
        clear_class_folders(out / split)
        for folder in folders:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
        taken = np.zeros(len(CLASS_NAMES), dtype=np.int64)
        padded = pad_to_32(images)
        written = 0
        for i, (img, label) in enumerate(zip(padded, labels)):
            if limit_per_class is not None and taken[label] >= limit_per_class:
                continue
            taken[label] += 1
            Image.fromarray(np.ascontiguousarray(img)).save(out / split / folders[label] / f"{i:05d}.png")
            written += 1
        counts[split] = written
    return counts
