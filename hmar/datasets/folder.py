"""The image-folder layout every builder writes and every reader (trainer, evaluation) reads.

Layout::

    ROOT/classes.json              ["T-shirt/top", "Trouser", ...]  (class index = list position)
    ROOT/LICENSE.txt               attribution and licence of the source
    ROOT/<split>/<NN_slug>/*.png   one folder per class, e.g. ``00_t-shirt-top``

A class folder name starts with its zero-padded class index, so sorting the folder names gives
the class order of ``classes.json`` (and a reader that only sorts folders, ImageFolder-style,
gets the same labels). Readers also accept plain index folders (``0/``, ``7/``: the sample
layout) and folders named after the class. The index of an ``NN_name`` folder decides its class; a name
that is another class of ``classes.json`` is refused as a contradiction.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import HMARError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLASSES_FILE = "classes.json"
LICENSE_FILE = "LICENSE.txt"
GRID_FILE = "grid.png"   # the contact sheet `hmar sample` writes beside its images: not a sample
_INDEX_PREFIX = re.compile(r"^(\d+)(?:_.*)?$")


def slugify(name: str) -> str:
    """A file-system-safe lower-case form of a class name (``"T-shirt/top"`` -> ``"t-shirt-top"``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "class"


def class_dir_name(index: int, name: str, num_classes: int) -> str:
    """Folder name of class ``index``: zero-padded index, underscore, slug (``"03_dress"``)."""
    width = max(2, len(str(num_classes - 1)))
    return f"{index:0{width}d}_{slugify(name)}"


def write_metadata(root: Path, class_names: Sequence[str], license_text: str) -> None:
    """Write ``classes.json`` (ordered class names) and ``LICENSE.txt`` into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / CLASSES_FILE).write_text(json.dumps(list(class_names), indent=1, ensure_ascii=False) + "\n")
    (root / LICENSE_FILE).write_text(license_text.rstrip() + "\n")


def clear_class_folders(split_dir: Path) -> None:
    """Delete the PNGs a previous build left in ``split_dir/<NN_slug>/`` (and the folders it empties), so that
    a rebuild with other options (a smaller limit, other labels) holds exactly the images it reports."""
    if not split_dir.is_dir():
        return
    for d in split_dir.iterdir():
        if d.is_dir() and _INDEX_PREFIX.match(d.name):
            for f in d.glob("*.png"):
                f.unlink()
            if not any(d.iterdir()):
                d.rmdir()


def read_class_names(root: Path) -> Optional[List[str]]:
    """Class names from ``classes.json`` in ``root`` or its parent (a split folder); None if absent."""
    for cand in (root / CLASSES_FILE, root.parent / CLASSES_FILE):
        if cand.is_file():
            try:
                names = json.loads(cand.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
                raise HMARError(f"{cand} is not valid JSON ({e}): it must hold a list of class names like "
                                '["cat", "dog"]; fix or delete it') from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise HMARError(f"{cand} must hold a JSON list of class names; rebuild the dataset")
            return names
    return None


def split_for_key(key: str, val_fraction: float) -> str:
    """Deterministic ``"train"``/``"val"`` assignment from a hash of ``key`` (no randomness)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "val" if (h % 1_000_000) < round(val_fraction * 1_000_000) else "train"


def class_name_index(folder: str, class_names: Sequence[str]) -> Optional[int]:
    """Index of the class whose name or slug ``folder`` is (``"Trouser"``, ``"ankle-boot"``); else None."""
    return next((i for i, name in enumerate(class_names) if folder in (name, slugify(name))), None)


def folder_class_index(folder: str, class_names: Optional[Sequence[str]] = None) -> Optional[int]:
    """Class index named by a folder: a class name or its slug first (``"Trouser"``, ``"ankle-boot"``, and
    ``"2019"`` among the classes ``["2019", "2020"]``), else an index (``"7"``, ``"07_sneaker"``); else None.

    The index of an ``NN_name`` folder counts; its name is free (``"00_c0"``), except that a name which is
    another class's raises :class:`HMARError` (``"03_cat"`` where class 3 is ``"dog"`` and ``"cat"`` is 5:
    the folder and ``classes.json`` contradict each other, and either reading would mislabel its images)."""
    named = class_name_index(folder, class_names or ())
    if named is not None:
        return named
    m = _INDEX_PREFIX.match(folder)
    if not m:
        return None
    idx = int(m.group(1))
    rest = folder[len(m.group(1)) + 1:]
    if rest and class_names and idx < len(class_names) and class_name_index(rest, class_names[idx:idx + 1]) is None:
        other = class_name_index(rest, class_names)
        if other is not None:
            raise HMARError(f"class folder {folder!r} has index {idx}, which is class {class_names[idx]!r}, "
                            f"but {rest!r} is class {other}: rename the folder "
                            f"({class_dir_name(other, class_names[other], len(class_names))!r} or "
                            f"{class_dir_name(idx, class_names[idx], len(class_names))!r}) or fix classes.json")
    return idx


def index_folder_layout(folders: Sequence[str]) -> bool:
    """Whether class folders without ``classes.json`` are read as class indices: every name is an index
    (``"7"``, ``"07_sneaker"``) and the indices are ``0 .. len(folders) - 1``, each once (the layouts that ``hmar
    generate`` and the data set builders write). Otherwise (``"2019"``, ``"2020"``; ``"cat"``, ``"dog"``) the classes
    are the folder names in sorted order."""
    idx = [_INDEX_PREFIX.match(f) for f in folders]
    return bool(folders) and all(idx) and sorted(int(m.group(1)) for m in idx) == list(range(len(folders)))


def list_images(folder: Path) -> List[Path]:
    """All image files under ``folder`` (recursive), sorted for a stable order.

    Symlinked folders are followed (``Path.rglob`` skips them: a data set of linked class folders looked empty);
    hidden files and folders (``.ipynb_checkpoints/``, macOS ``._x.png``) are not images of the data set. Two
    folders that are one folder on disk (two links to it, or a link and the folder itself) would count its images
    twice, as two classes of identical images or duplicates in one: :class:`HMARError` naming both."""
    if folder.exists() and not folder.is_dir():
        raise HMARError(f"{folder} is a file, not a folder of images; pass the folder that holds the images")
    if not folder.is_dir():
        raise HMARError(f"image folder {folder} does not exist; pass a folder of images")
    out = []
    seen: Dict[str, Path] = {}   # real path -> the first folder walked there
    for d, dirs, names in os.walk(folder, followlinks=True):
        if os.path.islink(d) and _links_to_ancestor(Path(d), folder):
            dirs[:] = []   # a link back up the tree: walking it would never end
            continue
        real = os.path.realpath(d)
        if real in seen:
            raise HMARError(f"folders {seen[real]} and {d} are the same folder ({real}), so its images would be "
                            "read twice: remove one of them (or link single images, not the whole folder)")
        seen[real] = Path(d)
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))   # sorted: the same folder is named first
        out += [Path(d) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS
                and (Path(d) / n).is_file()]
    return sorted(out)


def _links_to_ancestor(d: Path, top: Path) -> bool:
    real = os.path.realpath(d)
    for a in [p for p in d.parents if p == top or top in p.parents]:
        ra = os.path.realpath(a)
        if ra == real or ra.startswith(real.rstrip(os.sep) + os.sep):
            return True
    return False


def refuse_empty_class_folders(root: Path, with_images: Sequence[str]) -> None:
    """Where class ids come from the folders themselves (sorted names, or index folders 0..n-1), an empty folder
    would silently shift the ids of the classes after it or hold a class that cannot be learnt: :class:`HMARError`
    naming it."""
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                   and d.name not in with_images)
    if empty:
        raise HMARError(f"class folder(s) {', '.join(str(root / e) for e in empty)} hold no images: add images "
                        "or remove the folder (class ids are the sorted folder names)")


@dataclass
class ImageFolder:
    """Files of a class-folder tree with their labels (``-1`` where the folder names no class)."""

    files: List[Path]
    labels: List[int]
    class_names: List[str]

    def __len__(self) -> int:
        return len(self.files)


def load_image_folder(root: Path, class_names: Optional[Sequence[str]] = None, by_index: bool = False) -> ImageFolder:
    """Index ``root/<class folder>/*`` (see the module doc for accepted folder names; :func:`folder_class_index`
    maps a folder to its class, :func:`index_folder_layout` says when folders without ``classes.json`` are indices).

    ``by_index``: the folders are ``hmar generate``'s ``<class index>/`` (a sample folder with ``generate.json``),
    whatever the class names are. Without index folders or ``classes.json``, classes are the sorted folder names.
    Images directly in ``root`` (no class folders) are returned with label ``-1``.
    """
    root = Path(root)
    files = list_images(root)
    if not files:
        raise HMARError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    names = list(class_names) if class_names is not None else read_class_names(root)
    subdirs = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if by_index:
        other = [d for d in subdirs if not re.fullmatch(r"[0-9]+", d)]
        if other:
            raise HMARError(f"{root / other[0]}: a folder that `hmar generate` wrote (generate.json) holds "
                            "<class index>/ folders only; move the other folders out")
        mapping = {d: int(d) for d in subdirs}
        if names is None:
            names = [str(i) for i in range(max(mapping.values(), default=-1) + 1)]
    else:
        if names is None:   # index folders: their names in index order; else the sorted names
            names = (sorted(subdirs, key=lambda d: int(_INDEX_PREFIX.match(d).group(1)))  # type: ignore[union-attr]
                     if index_folder_layout(subdirs) else list(subdirs))
            refuse_empty_class_folders(root, subdirs)
        mapping = {}
        for d in subdirs:
            idx = folder_class_index(d, names)
            if idx is None:
                raise HMARError(f"folder {root / d} names no class of {names!r}; "
                                "name class folders by index (e.g. '3' or '03_dress') or by class name")
            mapping[d] = idx
        first: Dict[int, str] = {}
        for d, i in mapping.items():
            if first.setdefault(i, d) != d:
                what = f"{i} ({names[i]!r})" if i < len(names) else str(i)
                raise HMARError(f"class folders {root / first[i]} and {root / d} both map to class {what}: rename "
                                "them so that each folder names one class (by name, or as 'NN_name' with its "
                                "index), or fix classes.json")
    labels = []
    for f in files:
        parts = f.relative_to(root).parts
        labels.append(mapping[parts[0]] if len(parts) > 1 else -1)
    bad = [i for i in set(labels) if i >= len(names)]
    if bad:
        raise HMARError(f"class folder index {max(bad)} under {root} is out of range for "
                        f"{len(names)} classes; check classes.json or the folder names")
    return ImageFolder(files=files, labels=labels, class_names=list(names))


def load_image(path: Path, size: Optional[int] = None) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB (upright by its EXIF orientation, alpha composited on white,
    Lanczos resize to ``size``)."""
    with Image.open(path) as im:
        im = to_rgb(upright(im))
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.array(im, dtype=np.uint8)   # a writable copy (np.asarray of a PIL image is read-only)


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned by its EXIF orientation tag, in place (cameras store a portrait photo sideways and tag it; PIL
    does not apply the tag). An image without the tag, or with an EXIF block PIL cannot parse, is left as it is."""
    im.load()   # a file that does not decode raises here, as it would without the orientation step
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        pass   # a damaged EXIF block: the pixels are still the image, only their orientation is unknown
    return im


UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError)
"""PIL's errors for a truncated, empty or non-image file (``except UNREADABLE_IMAGE``)."""

WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "F")   # grayscale beyond 8 bits: PIL's convert clips these


def gray_unit(im: Image.Image) -> np.ndarray:
    """A wide grayscale image (:data:`WIDE_GRAY_MODES`) as float64 ``H x W`` in [0, 1], by its mode's range:
    16-bit modes (and ``I`` with values above 255) over 65535, ``I`` otherwise over 255; float (``F``) images as
    they are when within [0, 1], else over 255 (or 65535 above 255)."""
    a = np.asarray(im, dtype=np.float64)
    top = a.max(initial=0.0)
    if im.mode == "F":
        peak = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    else:
        peak = 65535.0 if im.mode != "I" or top > 255 else 255.0
    return np.clip(np.nan_to_num(a / peak), 0.0, 1.0)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto a white background. Wide grayscale (16-bit,
    32-bit, float: :func:`gray_unit`) is scaled to 8 bits by its range, where PIL's own conversion clips to white."""
    if im.mode in WIDE_GRAY_MODES:
        im = Image.fromarray(np.rint(gray_unit(im) * 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")
