"""``hmar sample``: class-conditional generation to PNG files and a grid."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..errors import HMARError
from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images of given classes",
                       description="Generate class-conditional images. Writes one PNG per image and a grid "
                                   "(one row per class) when --out is a directory, or only the grid when it ends in .png.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--classes", default=None,
                   help="comma-separated class ids or names; default: every class of the model (at most 16)")
    p.add_argument("--num-per-class", "-n", type=int, default=None,
                   help="images per class (default: 1 with --classes, else 8 per class)")
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    p.add_argument("--out", "-o", default="samples", help="output directory, or a .png path for the grid only")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args)
    if args.classes:
        labels = [pipe.class_index(x) for x in args.classes.split(",") if x.strip()]
        per = args.num_per_class or 1
    else:
        labels = list(range(min(pipe.num_classes, 16)))
        per = args.num_per_class or 8
    if per < 1:
        raise HMARError(f"--num-per-class must be >= 1, got {per}")
    if args.batch_size < 1:
        raise HMARError(f"--batch-size must be >= 1, got {args.batch_size}")
    kw = sampling_kwargs(args)
    from ..sampling import check_labels, make_generator
    check_labels(labels, pipe.num_classes, torch.device("cpu"))
    from ..presets import resolve_schedule
    if kw["schedule"] is not None and hasattr(pipe.model, "masked_logits"):
        resolve_schedule(kw["schedule"], pipe.model.config.patch_nums)  # fail early with a clear message
    all_labels = [l for l in labels for _ in range(per)]
    gen = make_generator(args.seed, pipe.device)
    from tqdm.auto import tqdm
    from ..pipeline import make_grid, to_pil
    images = []
    t0 = time.time()
    bar = tqdm(total=len(all_labels), desc="sampling", unit="img", disable=args.no_progress)
    for i in range(0, len(all_labels), args.batch_size):
        chunk = all_labels[i:i + args.batch_size]
        out = pipe.generate(chunk, generator=gen, **kw)
        images += to_pil(out.images)
        bar.update(len(chunk))
    bar.close()
    dt = time.time() - t0
    grid = make_grid(images, ncols=per)
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        where = str(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        names = pipe.class_names
        for k, (lab, im) in enumerate(zip(all_labels, images)):
            tag = f"{lab:04d}" + (f"_{_slug(names[lab])}" if names and lab < len(names) else "")
            im.save(out / f"{tag}_{k % per:03d}.png")
        grid.save(out / "grid.png")
        where = f"{out}/ ({len(images)} PNGs + grid.png)"
    print(f"wrote {where}: {len(images)} images of {len(labels)} classes at {pipe.resolution}px in {dt:.1f}s"
          + (" [random tiny model: noise]" if pipe.is_random else ""))
    return 0


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")[:40]
