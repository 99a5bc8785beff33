"""``hmar train`` (transformer stages 1 and 2, VAR), ``hmar train-tokenizer`` and ``hmar tokenize``.

Examples::

    hmar train-tokenizer --data shapes/ --preset vqvae-tiny --out runs/tok --epochs 20
    hmar tokenize --data shapes/ --tokenizer runs/tok --out runs/shapes.safetensors --views 4
    hmar train --stage next-scale --model hmar-tiny --tokenizer runs/tok --data shapes/ --out runs/s1
    hmar train --stage masked --init runs/s1 --data shapes/ --out runs/s2
    hmar sample --checkpoint runs/s2/model
    torchrun --nproc_per_node 8 -m hmar train --config hmar-d16 --data /imagenet --tokenizer vae_ch160v4096z32.pth
"""
from __future__ import annotations

import argparse

from ..training.config import TokenizerTrainConfig, TrainConfig, add_config_args, build_config

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a transformer: stage 1 (next-scale; HMAR or VAR) or stage 2 (masked)",
        formatter_class=_FMT,
        description="Train HMAR's stage-1 next-scale model (block-diagonal; --model hmar-*/nsp-*), VAR (--model var-*) "
                    "or HMAR's stage-2 masked branch (--stage masked --init STAGE1). Writes RUNDIR/model "
                    "(use it with `hmar sample --checkpoint RUNDIR/model`), RUNDIR/checkpoints (resumable), "
                    "log.txt, metrics.jsonl and samples/. Runs under torchrun for several processes (DDP, or "
                    "--fsdp).\n\nexamples:\n"
                    "  hmar train --model hmar-tiny --tokenizer runs/tok --data shapes/ --out runs/s1 --epochs 20\n"
                    "  hmar train --stage masked --init runs/s1 --data shapes/ --out runs/s2 --epochs 10\n"
                    "  hmar train --model var-tiny --tokenizer runs/tok --data cache.safetensors --out runs/var\n"
                    "  torchrun --nproc_per_node 8 -m hmar train --config hmar-d16 --data /imagenet "
                    "--tokenizer vae_ch160v4096z32.pth --out runs/d16")
    add_config_args(p, TrainConfig)
    p.set_defaults(func=run_train)

    t = sub.add_parser(
        "train-tokenizer", help="train the multi-scale residual VQ-VAE tokenizer", formatter_class=_FMT,
        description="Train a VQ-VAE tokenizer end to end on an image folder: L1/L2 reconstruction, VQ loss, "
                    "codebook-usage tracking with dead-code re-initialisation, optional PatchGAN (hinge, adaptive "
                    "weight) and optional perceptual loss from a LOCAL TorchScript network. Writes "
                    "RUNDIR/tokenizer (pass it to `hmar train --tokenizer`).\n\nexample:\n"
                    "  hmar train-tokenizer --data shapes/ --preset vqvae-tiny --out runs/tok --epochs 20 --disc "
                    "--disc-start 500")
    add_config_args(t, TokenizerTrainConfig)
    t.set_defaults(func=run_train_tokenizer)

    k = sub.add_parser(
        "tokenize", help="pre-encode an image folder into a token cache for `hmar train`", formatter_class=_FMT,
        description="Encode the train (and val) split of an image folder with a frozen tokenizer into a token "
                    "cache (.safetensors: int16/int32 indices per view, labels, class names). Pass the cache to "
                    "`hmar train --data CACHE` so the encoder does not run at every step.\n\nexample:\n"
                    "  hmar tokenize --data shapes/ --tokenizer runs/tok --out runs/shapes.safetensors --views 4")
    k.add_argument("--data", required=True, help="image folder (ROOT/<class>/* or ROOT/train + a validation split "
                                                 "ROOT/val, validate, validation or test)")
    k.add_argument("--tokenizer", required=True, help="tokenizer directory (train-tokenizer output or run dir), "
                                                      "hmar model directory, or vae_ch160v4096z32.pth")
    k.add_argument("--out", required=True, help="output cache file, ending in .safetensors")
    k.add_argument("--views", type=int, default=1,
                   help="views per training image: 1 = centre crop only; N = centre crop + N-1 random crops "
                        "(default: 1)")
    k.add_argument("--hflip", action="store_true", help="random horizontal flips in the random views")
    k.add_argument("--seed", type=int, default=42, help="seed of the random views (use the trainer's --seed) "
                                                        "(default: 42)")
    k.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default: 64)")
    k.add_argument("--device", default="auto", help="torch device (default: auto)")
    k.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    k.set_defaults(func=run_tokenize)


def run_train(args: argparse.Namespace) -> int:
    from ..training.loop import Trainer
    cfg = build_config(TrainConfig, args)
    Trainer(cfg).run()
    return 0


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from ..training.tokenizer_trainer import TokenizerTrainer
    cfg = build_config(TokenizerTrainConfig, args)
    TokenizerTrainer(cfg).run()
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    import sys

    from ..training.tokenize import tokenize_folder
    tokenize_folder(args.data, args.tokenizer, args.out, views=args.views, batch_size=args.batch_size,
                    device=args.device, hflip=args.hflip, seed=args.seed,
                    say=lambda m: print(m, file=sys.stderr), progress=not args.no_progress)
    return 0
