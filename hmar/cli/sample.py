"""``hmar sample``: class-conditional generation to PNG files and a grid."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Sequence

import torch

from ..datasets.folder import GRID_FILE
from ..errors import HMARError
from .common import (add_model_args, add_sampling_args, check_sampling_args, load_pipeline, prepare_out_dir,
                     sampling_kwargs, save_image)
from .data import HelpFormatter

_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images of given classes",
                       description="Generate class-conditional images. Writes one PNG per image and a grid "
                                   "(one row per class) when --out is a directory, or only the grid when it ends in .png.",
                       formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--classes", default=None,
                   help="comma-separated class ids or names (a name that holds commas is matched whole); default: every "
                        "class of the model (at most 16)")
    p.add_argument("--num-per-class", "-n", type=int, default=None,
                   help="images per class (default: 1 with --classes, else 8 per class)")
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward batch (part of the seeding: another batch size gives other images)")
    p.add_argument("--out", "-o", default="samples", help="output directory, or a .png path for the grid only")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def split_classes(text: str, names: Sequence[str]) -> List[str]:
    """``--classes`` text split at its commas, except inside a class name that holds commas (``"cats, dogs",x``
    with the class ``"cats, dogs"``: the longest run of pieces that is a name, in any case, is taken whole; so with
    the classes ``a``, ``b`` and ``a,b``, ``a,b`` is the one class ``a,b``: give ``b,a`` or ids for the two)."""
    parts, out, i = text.split(","), [], 0
    known = {n.strip().lower() for n in names if "," in n}
    while i < len(parts):
        j = next((j for j in range(len(parts), i + 1, -1) if ",".join(parts[i:j]).strip().lower() in known), i + 1)
        piece = ",".join(parts[i:j])
        if piece.strip():
            out.append(piece)
        i = j
    return out


def run(args: argparse.Namespace) -> int:
    if args.num_per_class is not None and args.num_per_class < 1:
        raise HMARError(f"--num-per-class must be >= 1, got {args.num_per_class}")
    if args.batch_size < 1:
        raise HMARError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.suffix.lower() in _OTHER_IMAGE_SUFFIXES:
        raise HMARError(f"--out {args.out!r}: the grid is written as PNG only; pass a .png path or a directory")
    if out.suffix.lower() == ".png" and out.is_dir():
        raise HMARError(f"--out {args.out!r} is a directory whose name ends in .png: the grid cannot be written "
                        "there; pass another .png path, or a directory name without .png")
    if args.classes is not None and not args.classes.replace(",", "").strip():
        raise HMARError(f"--classes {args.classes!r} names no class: give ids or names like 1,2,3")
    pipe = load_pipeline(args)
    if args.classes:
        labels = [pipe.class_index(x) for x in split_classes(args.classes, pipe.class_names or [])]
        per = args.num_per_class or 1
    else:
        labels = list(range(min(pipe.num_classes, 16)))
        per = args.num_per_class or 8
    kw = sampling_kwargs(args)
    from ..sampling import check_labels, make_generator
    check_labels(labels, pipe.num_classes, torch.device("cpu"))
    check_sampling_args(pipe, kw)
    gen = make_generator(args.seed, pipe.device)   # a bad seed: refused before the output folder exists
    prepare_out_dir(out.parent if out.suffix.lower() == ".png" else out)
    all_labels = [l for l in labels for _ in range(per)]
    from tqdm.auto import tqdm
    from ..pipeline import make_grid, to_pil
    images = []
    t0 = time.time()
    bar = tqdm(total=len(all_labels), desc="sampling", unit="img", disable=args.no_progress)
    for i in range(0, len(all_labels), args.batch_size):
        chunk = all_labels[i:i + args.batch_size]
        images += to_pil(pipe.generate(chunk, generator=gen, **kw).images)
        bar.update(len(chunk))
    bar.close()
    dt = time.time() - t0
    grid = make_grid(images, ncols=per)
    if out.suffix.lower() == ".png":
        save_image(grid, out)
        where = str(out)
    else:
        names = pipe.class_names
        count: dict = {}   # images written per class so far: a class given twice (--classes 3,3) numbers on
        for lab, im in zip(all_labels, images):
            named = names and 0 <= lab < len(names)
            tag = ("uncond" if lab < 0 else f"{lab:04d}") + (f"_{_slug(names[lab])}" if named else "")
            count[lab] = count.get(lab, 0) + 1
            save_image(im, out / f"{tag}_{count[lab] - 1:03d}.png")
        save_image(grid, out / GRID_FILE)
        where = f"{out}/ ({len(images)} PNGs + {GRID_FILE})"
    print(f"wrote {where}: {len(images)} images of {len(labels)} classes at {pipe.resolution}px in {dt:.1f}s"
          + (" [random tiny model: noise]" if pipe.is_random else ""))
    return 0


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")[:40]
