"""Regenerate the README figures with the shipped default model (CPU, ~10 s):
docs/samples.png (one row per class) and docs/editing.png (inpaint, outpaint, class edit).

    python scripts/make_readme_figures.py --val-dir DATA/emoji64/val
The source images are emoji from the validation split (never seen in training); see the dataset's
LICENSE.txt for their attribution (Noto: Apache-2.0, Twemoji: CC-BY 4.0, OpenMoji: CC BY-SA 4.0).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hmar import HMARPipeline
from hmar.pipeline import make_grid


def label(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width + 2, img.height + 16), "white")
    out.paste(Image.new("RGB", (img.width + 2, img.height + 2), (160, 160, 160)), (0, 14))
    out.paste(img, (1, 15))
    ImageDraw.Draw(out).text((2, 1), text, fill="black")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()
    args.out.mkdir(exist_ok=True)
    pipe = HMARPipeline.from_pretrained(None)
    ims = pipe(class_labels=list(range(pipe.num_classes)), num_images_per_label=8, generator=0)
    rows = []
    for c in range(pipe.num_classes):
        row = make_grid(ims[c * 8:(c + 1) * 8], 8)
        canvas = Image.new("RGB", (row.width + 120, row.height), "white")
        canvas.paste(row, (120, 0))
        ImageDraw.Draw(canvas).text((4, row.height // 2 - 6), pipe.class_names[c], fill="black")
        rows.append(canvas)
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(args.out / "samples.png")

    R = pipe.resolution
    folders = sorted(p for p in args.val_dir.iterdir() if p.is_dir())
    pick = lambda i, k=0: sorted(folders[i].glob("*.png"))[k]  # noqa: E731
    big = lambda im: im.resize((128, 128), Image.NEAREST)  # noqa: E731
    lines = []
    # inpainting: the right half of a smiley, unconditional, three seeds
    src = Image.open(pick(0, 3)).convert("RGB")
    mask = np.zeros((src.height, src.width), np.uint8)
    mask[:, src.width // 2:] = 255
    outs = pipe.inpaint(src, mask, seeds=[0, 1, 2])
    lines.append([label(big(src), "source"), label(big(Image.fromarray(mask).convert("RGB")), "mask"),
                  *[label(big(o), f"inpaint s{i}") for i, o in enumerate(outs)]])
    # outpainting: shrink an animal and let the model draw the border
    src = Image.open(pick(2, 1)).convert("RGB").resize((R // 2, R // 2), Image.LANCZOS)
    outs = pipe.outpaint(src, pad=(R // 4, R // 4, R // 4, R // 4), class_label=2, seeds=[0, 1, 2])
    canvas = Image.new("RGB", (R, R), (200, 200, 200))
    canvas.paste(src, (R // 4, R // 4))
    lines.append([label(big(src.resize((R, R))), "source"), label(big(canvas), "source, padded"),
                  *[label(big(o), f"outpaint s{i}") for i, o in enumerate(outs)]])
    # class edit: regenerate the lower part of a smiley as a flag
    src = Image.open(pick(0, 5)).convert("RGB")
    mask = np.zeros((src.height, src.width), np.uint8)
    mask[src.height // 3:, :] = 255
    outs = pipe.class_edit(src, mask, 8, seeds=[0, 1, 2])
    lines.append([label(big(src), "source"), label(big(Image.fromarray(mask).convert("RGB")), "region"),
                  *[label(big(o), f"-> Flags s{i}") for i, o in enumerate(outs)]])
    w = max(sum(t.width for t in l) + 4 * len(l) for l in lines)
    h = sum(l[0].height + 4 for l in lines)
    fig = Image.new("RGB", (w, h), "white")
    y = 0
    for l in lines:
        x = 0
        for t in l:
            fig.paste(t, (x, y))
            x += t.width + 4
        y += l[0].height + 4
    fig.save(args.out / "editing.png")
    print("wrote", args.out / "samples.png", args.out / "editing.png")


if __name__ == "__main__":
    main()
