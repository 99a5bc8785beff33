"""Options and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import torch

from ..errors import HMARError
from ..fileio import atomic_path, ensure_writable_dir


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default=None,
                   help="model directory (ours) or official transformer file (hmar-d*.pth, var_d*.pth, stage-1 "
                        "ar-ckpt); default: the model shipped with hmar, else a random tiny model")
    p.add_argument("--vqvae", default=None, help="official VQ-VAE file (vae_ch160v4096z32.pth) for official transformer files")
    p.add_argument("--mask-checkpoint", default=None, help="official stage-2 (masked) file to pair with a stage-1 checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--fast", action="store_true",
                   help="CUDA: bf16 transformer, the token loop replayed as one CUDA graph, a bf16 compiled decoder "
                        "(about a minute of warm-up; BENCHMARKS.md section 3)")
    p.add_argument("--compile", action="store_true",
                   help="with --fast (implied): also torch.compile the transformer blocks")
    p.add_argument("--fp8", action="store_true",
                   help="with --fast (implied): the transformer blocks' GEMMs in fp8 e4m3 (GPUs of compute "
                        "capability 8.9+: H100/H200, L4, RTX 40xx); faster, at a small error (BENCHMARKS.md)")
    p.add_argument("--decode-batch", type=int, default=None, metavar="N",
                   help="with --fast: images per decoder call (default: as many as keep one full-resolution "
                        "activation within 1.5 GiB, 16 at 256 and 512 px in bf16); fewer take less memory, more time")
    p.add_argument("--full-res-chunks", type=int, default=None, metavar="N",
                   help="with --fast: the decoder's full-resolution part in N chunks of each call's images (default: "
                        "none at 256 px, 2 at 512 px); 2 at 256 px: 0.7 GB less, 0.3-1 ms more (H200)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance (VAR's linear ramp up to this value; default: the model's, e.g. 1.5)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens (0: off; default: the model's)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass in [0, 1] (0 or 1: off; default: the model's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature > 0 (default: the model's, usually 1)")
    p.add_argument("--schedule", default=None,
                   help="HMAR's masked-step schedule (VAR / stage-1 models have none): default | none | coarse | "
                        "official-256 | official-512 | JSON list of "
                        "per-scale token counts, e.g. '[[1],[1,3],[1,1,2,5],[16],...]'")
    p.add_argument("--guide-masked", action="store_true", help="also apply guidance inside masked refinement passes")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                schedule=args.schedule, guide_masked=True if args.guide_masked else None)


def check_sampling_args(pipe, kw: dict) -> None:
    """Fail before any sampling on options the sampler would refuse (NaN guidance, a bad schedule, ...)."""
    from ..presets import resolve_schedule
    from ..sampling import check_options
    o = pipe._opts(**kw)   # the pipeline's defaults under the options given
    check_options(o["cfg"], o["top_k"], o["top_p"], o["temperature"])
    if kw.get("schedule") is not None:
        resolve_schedule(kw["schedule"], pipe.model.config.patch_nums)
        if not hasattr(pipe.model, "masked_logits"):
            import sys
            print(f"note: --schedule sets HMAR's masked refinement steps; this {pipe.model.config.kind} model has no "
                  "masked branch, so it samples each scale in one pass without it", file=sys.stderr)


def prepare_out_dir(directory: Path, what: str = "--out") -> None:
    """Create the output folder (before the slow work), or say why it cannot be one."""
    if directory.exists() and not directory.is_dir():
        raise HMARError(f"{what}: {str(directory)!r} exists and is not a directory: choose another path")
    ensure_writable_dir(directory, what)


def save_image(image, path: Path) -> None:
    """Write a PIL image atomically, in the format its suffix names (PNG when the suffix names none): to a
    temporary name beside ``path``, then renamed, so an interrupted or failed write (Ctrl-C, a full disk) leaves the
    previous file or none, never a truncated one."""
    from PIL import Image
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))


def parse_int_list(text: str, what: str) -> List[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise HMARError(f"{what} must be comma-separated integers like 1,2,3, got {text!r}") from None


def load_pipeline(args: argparse.Namespace, say=print):
    """The pipeline the user asked for; with no --checkpoint the shipped default model, else a random tiny one."""
    from ..pipeline import HMARPipeline, default_model_dir
    from ..training.distributed import resolve_device
    resolve_device(args.device)   # a malformed device or one not available here: an error naming --device
    fp8 = getattr(args, "fp8", False)
    fast = getattr(args, "fast", False) or getattr(args, "compile", False) or fp8
    decode_batch = getattr(args, "decode_batch", None)
    chunks = getattr(args, "full_res_chunks", None)
    for flag, value, what in (("--decode-batch", decode_batch, "sets the fast decoder's images per call"),
                              ("--full-res-chunks", chunks, "splits the fast decoder's full-resolution part")):
        if value is not None and (value < 1 or not fast):
            raise HMARError(f"{flag} {value}: it {what}, so it needs --fast (or --compile) and a value >= 1")
    if fast and not args.device.startswith("cuda"):
        raise HMARError(f"--fast/--compile/--fp8 speed up sampling on CUDA; --device is {args.device}: "
                        "drop them or use --device cuda")
    if fp8:
        from ..model.fp8 import check_supported
        try:
            check_supported(args.device, "drop --fp8")
        except ValueError as e:
            raise HMARError(f"--fp8: {e}") from None
    if args.checkpoint is None:
        if default_model_dir() is not None:
            pipe = HMARPipeline.from_pretrained(None, device=args.device)
        else:
            say("note: no trained default model is shipped in this build: sampling from a RANDOMLY INITIALISED "
                "tiny model (hmar-tiny); the images are noise. Pass --checkpoint to use a trained model.")
            pipe = HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny", device=args.device)
    else:
        pipe = HMARPipeline.from_pretrained(args.checkpoint, vqvae=args.vqvae, device=args.device,
                                            mask_checkpoint=args.mask_checkpoint)
    return (pipe.enable_fast_sampling(compile=args.compile, decode_batch=decode_batch, full_res_chunks=chunks,
                                      fp8=fp8) if fast else pipe)
