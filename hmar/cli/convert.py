"""``hmar convert``: official checkpoint files -> our directory format (safetensors + config.json)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import torch

from ..errors import HMARError
from ..fileio import ensure_writable_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert official HMAR/VAR (+ VQ-VAE) files to an hmar model directory",
                       description="Load official files strictly (hmar-d*.pth, var_d*.pth, stage-1 ar-ckpt*.pth, "
                                   "optionally a stage-2 file) with the VQ-VAE and write config.json + safetensors.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", "-c", required=True, help="official transformer file")
    p.add_argument("--vqvae", required=True, help="official VQ-VAE file (vae_ch160v4096z32.pth)")
    p.add_argument("--mask-checkpoint", default=None, help="official stage-2 (masked) file, to assemble an HMAR "
                                                           "from a stage-1 checkpoint")
    p.add_argument("--class-names", default=None, help="text file with one class name per line")
    p.add_argument("--half", action="store_true", help="store weights in fp16 (half the size)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import HMARPipeline
    out = Path(args.out)
    if out.exists() and not out.is_dir():     # checked before loading (a d30 file takes a while)
        raise HMARError(f"--out {args.out!r} is a file: the output is a directory, pass a new or existing one")
    ensure_writable_dir(out, "--out", create=False)   # made only by the save, after a successful load
    names = _read_class_names(args.class_names) if args.class_names else None
    pipe = HMARPipeline.from_pretrained(args.checkpoint, vqvae=args.vqvae, mask_checkpoint=args.mask_checkpoint)
    if names is not None:
        if len(names) != pipe.num_classes:
            raise HMARError(f"--class-names {args.class_names!r} has {len(names)} names but the model has "
                            f"{pipe.num_classes} classes: give one name per line for every class")
        pipe.class_names = names
    d = pipe.save_pretrained(out, dtype=torch.float16 if args.half else None)
    c = pipe.model.config
    print(f"wrote {d}: {c.kind} depth {c.depth} width {c.embed_dim} scales {list(c.patch_nums)}")
    return 0


def _read_class_names(path: str) -> List[str]:
    """The non-empty lines of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise HMARError(f"--class-names {path!r} is not a UTF-8 text file: give one class name per line") from None
