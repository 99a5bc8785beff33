"""``hmar tokenize``: encode an image folder once with the frozen tokenizer into a token cache, so that the
transformer trainer does not run the encoder at every step.

View 0 of every image is the centre crop; views ``1..N`` are random crops (and flips with ``hflip``)
drawn exactly as the trainer would draw them for epochs ``1..N``. Unreadable files are skipped (one
warning each) and counted in the cache metadata.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import torch

from ..errors import HMARError
from ..fileio import ensure_writable_dir
from .data import (ImageFolderDataset, find_splits, keyed_rng, load_rgb, quantizer_fingerprint, transform, val_split,
                   write_token_cache)
from .distributed import resolve_device
from .tokenizer_io import load_tokenizer


def _view(ds: ImageFolderDataset, i: int, v: int) -> torch.Tensor:
    """View ``v`` of image ``i``: 0 = centre crop; ``v >= 1`` = the random crop the trainer draws in epoch ``v``."""
    im = load_rgb(ds.files[i])
    if v == 0:
        return transform(im, ds.resolution, train=False)
    return transform(im, ds.resolution, True, ds.hflip, keyed_rng(ds.seed, v, i, 1))


def _encode_split(ds: ImageFolderDataset, tokenizer, views: int, batch_size: int, device: torch.device,
                  bad: Dict[str, None], say: Callable[[str], None], progress: bool,
                  every_class: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(indices [views, N_ok, L], labels [N_ok])`` of the readable images of ``ds``; ``every_class``: an error if
    a class has no readable image (the training split: such a class could never be learnt)."""
    from tqdm.auto import tqdm
    ok: List[int] = []
    for i in range(len(ds)):
        if ds.try_load(i, 0) is None:
            p = str(ds.files[i])
            if p not in bad:
                bad[p] = None
                say(f"warning: skipping unreadable image {p}")
        else:
            ok.append(i)
    if not ok:
        raise HMARError(f"none of the {len(ds)} images under {ds.root} could be read")
    have = {ds.labels[i] for i in ok}
    empty = [n for c, n in enumerate(ds.class_names) if c not in have]
    if every_class and empty:
        raise HMARError(f"class folder(s) {', '.join(empty)} under {ds.root} hold no readable image (see the warnings "
                        "above): replace the files or remove the folder(s); a class without images cannot be learnt")
    out = []
    bar = tqdm(total=views * len(ok), unit="img", desc=f"tokenize {ds.root.name}", disable=not progress)
    for v in range(views):
        rows = []
        for s in range(0, len(ok), batch_size):
            chunk = ok[s:s + batch_size]
            imgs = [_view(ds, i, v) for i in chunk]
            x = torch.stack(imgs).to(device)
            with torch.no_grad():
                rows.append(torch.cat(tokenizer.img_to_indices(x), 1).cpu())
            bar.update(len(chunk))
        out.append(torch.cat(rows))
    bar.close()
    labels = torch.tensor([ds.labels[i] for i in ok], dtype=torch.long)
    return torch.stack(out), labels


def tokenize_folder(data: Union[str, Path], tokenizer: Union[str, Path], out: Union[str, Path], views: int = 1,
                    batch_size: int = 64, device: str = "auto", hflip: bool = False, seed: int = 42,
                    say: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Write a token cache (``.safetensors``) of the train (and val) split of ``data``.

    ``views``: 1 (centre crop only) or more (centre crop + ``views - 1`` random crops per training image).
    ``seed`` must equal the trainer's ``--seed`` for the random views to be the ones it would have drawn.
    """
    if views < 1:
        raise HMARError(f"--views must be >= 1, got {views}")
    if batch_size < 1:
        raise HMARError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise HMARError(f"--out {str(out)!r} must end in .safetensors (the trainer recognises caches by it)")
    if out.is_dir():
        raise HMARError(f"--out {str(out)!r} is a directory: pass a file path such as {str(out / 'cache.safetensors')!r}")
    dev = resolve_device(device)
    ensure_writable_dir(out.parent, "--out")   # before the encoding, not after it
    tok = load_tokenizer(tokenizer, device=dev)
    R = tok.config.resolution
    tr_dir, val_dir = find_splits(data)
    train = ImageFolderDataset(tr_dir, R, train=True, hflip=hflip, seed=seed)
    val = val_split(val_dir, R, seed, train.class_names)   # its classes checked before any encoding, as `train` does
    bad: Dict[str, None] = {}
    # the (smaller) val split first: a val split of only unreadable images fails before the train split's encoding
    encoded_val = None
    if val is not None:
        try:
            encoded_val = _encode_split(val, tok, 1, batch_size, dev, bad, say, progress)
        except HMARError as e:
            raise HMARError(f"val split {val_dir}: {e} (replace its files with readable images, or remove it)") from None
    splits = {"train": _encode_split(train, tok, views, batch_size, dev, bad, say, progress, every_class=True)}
    if encoded_val is not None:
        splits["val"] = encoded_val
    meta = {"class_names": train.class_names, "patch_nums": list(tok.config.patch_nums),
            "vocab_size": tok.config.vocab_size, "resolution": R, "views": views, "hflip": hflip, "seed": seed,
            "tokenizer_path": str(Path(tokenizer).resolve()), "tokenizer": tok.config.to_dict(),
            "quantizer_fingerprint": quantizer_fingerprint(tok.quantize), "skipped_files": len(bad),
            "source": str(Path(data).resolve())}
    write_token_cache(out, splits, meta)
    n = {k: int(v[1].shape[0]) for k, v in splits.items()}
    say(f"wrote {out}: train {n['train']} images x {views} view(s)" + (f", val {n['val']} images" if "val" in n else "")
        + f" of {len(train.class_names)} classes, {sum(p * p for p in tok.config.patch_nums)} tokens each"
        + (f"; {len(bad)} unreadable file(s) skipped" if bad else ""))
    return out
