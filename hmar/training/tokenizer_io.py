"""Tokenizer-only directories (``config.json`` with ``"tokenizer"`` + ``tokenizer.safetensors``), the layout
``hmar train-tokenizer`` writes, and one loader for every place a tokenizer can come from."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..checkpoint import TOKENIZER_FORMAT
from ..errors import HMARError
from ..fileio import atomic_path
from ..presets import TokenizerConfig
from ..tokenizer import VQVAE

PathLike = Union[str, os.PathLike]


def save_tokenizer(directory: PathLike, tokenizer: VQVAE, extra: Optional[dict] = None) -> Path:
    """Write ``config.json`` (``{"format": "hmar-tokenizer", "tokenizer": {...}}``) and
    ``tokenizer.safetensors`` (same tensor names as in an hmar model directory), atomically."""
    from safetensors.torch import save_file
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    with atomic_path(d / "tokenizer.safetensors") as tmp:
        save_file(sd, str(tmp))
    cfg = {"format": TOKENIZER_FORMAT, "version": 1, "tokenizer": tokenizer.config.to_dict(), **(extra or {})}
    with atomic_path(d / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))
    return d


def load_tokenizer(path: PathLike, patch_nums: Optional[Sequence[int]] = None,
                   device: Union[str, torch.device] = "cpu") -> VQVAE:
    """A frozen tokenizer (eval mode, no grads) from: a tokenizer directory, a ``train-tokenizer`` run
    directory (``RUN/tokenizer``), an hmar model directory (its tokenizer), or an official
    ``vae_ch160v4096z32.pth`` file."""
    p = Path(path)
    if not p.exists():
        raise HMARError(f"tokenizer {str(p)!r} does not exist: pass the directory written by "
                        "`hmar train-tokenizer` (or an hmar model directory, or vae_ch160v4096z32.pth)")
    if p.is_dir() and not (p / "config.json").exists():
        for sub in ("tokenizer", "model"):
            if (p / sub / "config.json").exists():
                p = p / sub
                break
        else:
            raise HMARError(f"{str(p)!r} holds no config.json: not a tokenizer or model directory")
    if p.is_dir():
        try:
            cfg = json.loads((p / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise HMARError(f"{p / 'config.json'} is not valid JSON ({e})") from None
        if "tokenizer" not in cfg or cfg.get("format") not in (TOKENIZER_FORMAT, "hmar"):
            raise HMARError(f"{p / 'config.json'} describes no tokenizer (format={cfg.get('format')!r})")
        tok = VQVAE(TokenizerConfig.from_dict(cfg["tokenizer"]))
        wf = p / "tokenizer.safetensors"
        if not wf.exists():
            raise HMARError(f"{str(p)!r} has no tokenizer.safetensors")
        from ..checkpoint import _strict_load, read_safetensors
        _strict_load(tok, read_safetensors(wf, "train the tokenizer again, or restore the file"), str(wf),
                     allow_derived=True)
    else:
        from ..checkpoint import load_official_tokenizer
        tok = load_official_tokenizer(p, patch_nums)
    if patch_nums is not None:
        tok.set_patch_nums(patch_nums)
    tok = tok.to(device).eval()
    for q in tok.parameters():
        q.requires_grad_(False)
    return tok
