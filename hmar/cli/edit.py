"""``hmar edit inpaint|outpaint|class``: zero-shot editing of one image (see :mod:`hmar.editing`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..errors import HMARError
from .common import (add_model_args, add_sampling_args, check_sampling_args, load_pipeline, parse_int_list,
                     prepare_out_dir, sampling_kwargs, save_image)

_RULES = """
rules (details: python -c "import hmar.editing; help(hmar.editing)"):
  image   any size; scaled so its shorter side is the model resolution (Lanczos), then centre-cropped
          to a square. Images over --max-pixels are refused.
  mask    an image of exactly the input image's size: white (or any channel > 127; alpha > 127 when
          the mask has transparency) = regenerate, black = keep. Empty mask: the output is the
          tokenizer's reconstruction (a note is printed). Full mask: a plain sample of --class.
  outpaint the canvas (image + --pad, or --size) is letterboxed to a square so none of it is cropped;
          everything but the image is generated.
  sampling without --schedule, HMAR models use the editing schedule: the model's default plus one
          masked pass over the region at every scale >= 1 (--schedule default: the plain default).
          --seed defaults to 0; --cfg, --top-k, --top-p, --temperature to the model's settings.
  output  with one seed: --out; with several seeds: OUT_s<seed>.png for each and OUT_strip.png
          (source after crop, the edit region, then the results).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="zero-shot in-painting, out-painting and class-conditional editing",
                       description="Edit an image without training: keep the tokens outside the edit region at "
                                   "every scale and generate the ones inside.",
                       epilog=_RULES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="operation", metavar="OPERATION")
    ops.required = True
    helps = {"inpaint": "regenerate the white part of --mask (unconditional unless --class is given)",
             "outpaint": "extend the image by --pad or to --size and generate the new border",
             "class": "regenerate the white part of --mask as class --class (required)"}
    for name, text in helps.items():
        q = ops.add_parser(name, help=text, description=text, epilog=_RULES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_model_args(q)
        q.add_argument("--image", "-i", required=True, help="input image file (PNG, JPEG, WebP, ...)")
        if name != "outpaint":
            q.add_argument("--mask", "-m", required=True,
                           help="mask image of the same size as --image: white = edit, black = keep")
        else:
            g = q.add_mutually_exclusive_group(required=True)
            g.add_argument("--pad", default=None,
                           help="pixels to add around the image: L,T,R,B (one value: all sides)")
            g.add_argument("--size", default=None, help="canvas size WxH (at least the image size); image centred")
        q.add_argument("--class", dest="class_label", default=None, required=(name == "class"),
                       help="class id or name to generate toward" +
                            ("" if name == "class" else " (default: unconditional, the null class)"))
        add_sampling_args(q)
        q.add_argument("--seeds", default=None,
                       help="comma-separated seeds, one image per seed (overrides --seed), e.g. 0,1,2")
        q.add_argument("--composite", choices=("latent", "pixels", "none"), default="pixels",
                       help="keep the outside of the region: 'pixels' (default) = outside the region's token cells the "
                            "pixels are exactly the tokenizer's reconstruction; 'latent' = only the latent is the "
                            "source's (smoother seam, pixels close but not equal); 'none' = pure token-level edit")
        q.add_argument("--max-pixels", type=int, default=50_000_000, help="refuse images with more pixels than this (default: 50000000)")
        q.add_argument("--out", "-o", default="edited.png", help="output PNG path (default: edited.png)")
        q.set_defaults(func=run, edit_op=name)


def _parse_pad(text: str) -> List[int]:
    vals = parse_int_list(text, "--pad")
    if len(vals) == 1:
        vals = vals * 4
    if len(vals) != 4 or min(vals) < 0:
        raise HMARError(f"--pad must be one or four non-negative integers L,T,R,B, got {text!r}")
    return vals


def _parse_size(text: str) -> Tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise HMARError(f"--size must look like 512x384 (width x height), got {text!r}") from None
    return w, h


def run(args: argparse.Namespace) -> int:
    from .. import editing
    from ..pipeline import make_grid
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise HMARError(f"--out must be a .png path, got {args.out!r}")
    if args.max_pixels < 1:
        raise HMARError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    seeds: Optional[List[int]] = parse_int_list(args.seeds, "--seeds") if args.seeds else None
    if seeds is not None and not seeds:
        raise HMARError("--seeds is empty: give at least one seed, e.g. 0,1,2")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise HMARError(f"--seeds {args.seeds} repeats a seed: each seed gives one image (OUT_s<seed>.png), "
                        "so a repeated one would overwrite itself; give distinct seeds, e.g. 0,1,2")
    from ..sampling import make_generator
    for seed in seeds or [args.seed]:   # a seed out of range: refused before any work
        make_generator(seed, torch.device("cpu"))
    # read the inputs before loading a model, so that bad files fail fast
    img = editing.load_image(args.image, max_pixels=args.max_pixels)
    if args.edit_op == "outpaint":
        if (args.pad is None or not args.pad.strip()) == (args.size is None or not args.size.strip()):
            raise HMARError("outpaint needs exactly one of --pad L,T,R,B (or one value for all sides) and --size WxH")
        pad = _parse_pad(args.pad) if args.pad else None
        size = _parse_size(args.size) if args.size else None
        try:
            img, mask = editing.outpaint_canvas(img, pad, size, max_pixels=args.max_pixels)
        except HMARError as e:   # the library's names (target_size=, max_pixels) -> the flags
            raise HMARError(str(e).replace("target_size", "--size").replace(
                "(max_pixels; --max-pixels in the CLI): downscale it first or raise the limit",
                "(--max-pixels): pass a smaller --pad / --size, or raise --max-pixels")) from None
    else:
        mask = editing.load_mask(args.mask, max_pixels=args.max_pixels)
        if mask.shape != (img.height, img.width):
            raise HMARError(f"--mask is {mask.shape[1]}x{mask.shape[0]} but --image is {img.width}x{img.height}: "
                            f"the mask must have the image's size (white = edit, black = keep)")
    pipe = load_pipeline(args, say=lambda m: print(m, file=sys.stderr))
    label = None if args.class_label is None else pipe.class_index(args.class_label)
    if label is not None:
        from ..sampling import check_labels
        check_labels([label], pipe.num_classes, torch.device("cpu"))   # -5, or 12 of 10 classes: refused here
    if label is not None and label < 0:
        if args.edit_op == "class":
            raise HMARError(f"--class {args.class_label!r}: class editing needs a real class (id or name); "
                            "use `hmar edit inpaint` without --class for an unconditional edit")
        label = None                                      # -1 is the null class: unconditional
    kw = sampling_kwargs(args)
    check_sampling_args(pipe, kw)
    prepare_out_dir(out.parent)
    res = editing.edit(pipe, img, mask, label, generator=args.seed, seeds=seeds, composite=args.composite,
                       max_pixels=args.max_pixels, return_tokens=True, **kw)
    if not bool(res.regions[-1].any()):
        print("note: the edit region is empty (after resizing and cropping): the output is the tokenizer's "
              "reconstruction of the input", file=sys.stderr)
    elif bool(res.regions[-1].all()) and not bool(mask.all()):
        pn = pipe.model.config.patch_nums[-1]
        print(f"note: the kept part of the image covers no whole token of the finest {pn}x{pn} scale (after "
              f"resizing{' the canvas' if args.edit_op == 'outpaint' else ''} to {pipe.resolution}px), so nothing "
              "of it is kept: the output is a plain sample"
              + (" (pass a smaller --pad / --size)" if args.edit_op == "outpaint" else ""), file=sys.stderr)
    written = []
    if len(res.images) == 1:
        save_image(res.images[0], out)
        written.append(str(out))
    else:
        for s, im in zip(res.seeds, res.images):
            p = out.with_name(f"{out.stem}_s{s}.png")
            save_image(im, p)
            written.append(str(p))
        strip = out.with_name(f"{out.stem}_strip.png")
        strip_images = [res.source, res.mask.convert("RGB")] + res.images
        save_image(make_grid(strip_images, ncols=len(res.images) + 2), strip)
        written.append(str(strip))
    print(f"wrote {', '.join(written)} ({args.edit_op}, {pipe.resolution}px"
          + (", class " + str(label) if label is not None else ", unconditional") + ")"
          + (" [random tiny model: noise]" if pipe.is_random else ""))
    return 0
