"""AdamW with the official weight-decay groups."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

# parameters whose name contains one of these are never decayed (official ``filter_params``)
NO_DECAY_NAMES = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                  "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def no_decay(name: str, p: torch.Tensor) -> bool:
    """1-D tensors, biases and the named embeddings/scales are not decayed."""
    return p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_NAMES)


def param_groups(named: Iterable[Tuple[str, nn.Parameter]]) -> List[Dict[str, Any]]:
    """Two groups of the trainable parameters: ``wd_scale`` 1 (decayed) and 0 (not decayed)."""
    decay, keep, dn, kn = [], [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if no_decay(name, p):
            keep.append(p)
            kn.append(name)
        else:
            decay.append(p)
            dn.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "wd_scale": 1.0, "names": dn})
    if keep:
        groups.append({"params": keep, "wd_scale": 0.0, "names": kn})
    return groups


def build_adamw(groups: List[Dict[str, Any]], lr: float, betas: Tuple[float, float], fused: str,
                device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused on CUDA when ``fused`` is ``auto`` or ``on``); lr and wd are set per step by
    :func:`apply_schedule`."""
    use_fused = (fused == "on") or (fused == "auto" and device.type == "cuda")
    kw: Dict[str, Any] = {"fused": True} if use_fused else {}
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), weight_decay=0.0, **kw)


def apply_schedule(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Set every group's lr and weight decay (``wd * wd_scale``)."""
    for g in opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)
