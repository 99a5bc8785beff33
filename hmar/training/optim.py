"""AdamW with the official weight-decay groups."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple

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


def clip_grads(params: Sequence[nn.Parameter], clip: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, clip)`` (``clip <= 0``: no clipping, the norm only), returning the
    total norm before clipping (on FSDP2 the full norm, not a DTensor)."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _clips_in_kernel(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]) -> bool:
    """Whether ``opt.step()`` can clip through ``grad_scale``: a fused step of every group (a group that is not
    fused refuses a ``grad_scale``), an optimiser that reads it (torch.amp.GradScaler's own test), plain fp32
    gradients (not FSDP2's DTensors), and ``params`` every parameter of ``opt`` (the factor scales all of them)."""
    if not grads or not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    if not all(g.get("fused") for g in opt.param_groups):
        return False
    if any(hasattr(g, "full_tensor") or g.dtype != torch.float32 for g in grads):
        return False
    return {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}


def clip_and_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip: float,
                  in_kernel: bool = True) -> torch.Tensor:
    """Clip the gradients to a total norm of ``clip`` (``clip <= 0``: no clipping), step ``opt``, and return the
    total norm before clipping (a 0-d tensor; on FSDP2 the full norm).

    What :func:`clip_grads` and then ``opt.step()`` do, without the multiply pass where it can (``in_kernel``
    and :func:`_clips_in_kernel`: a fused AdamW over ``params``): ``clip_grad_norm_`` multiplies every gradient by
    ``min(1, clip / (norm + 1e-6))`` in a pass of its own (a read and a write of every gradient: 16 GB a step at
    hmar-d30's 2010 M fp32 gradients), while the fused AdamW kernel can divide each gradient by a ``grad_scale``
    tensor as it reads it (the hook ``torch.amp.GradScaler`` unscales through). So the factor goes there, as its
    inverse ``max(1, (norm + 1e-6) / clip)``. The kernel then also writes the clipped gradients back, so the
    saving is one read of the gradients and the multiply's launches. The two ways agree to fp32 rounding (a
    quotient against a product). A GradScaler's step (fp16) sets ``grad_scale`` itself: clip with
    :func:`clip_grads` after its ``unscale_`` there."""
    grads = [p.grad for p in params if p.grad is not None]
    if not (in_kernel and clip > 0 and _clips_in_kernel(opt, params, grads)):
        norm = clip_grads(params, clip)
        opt.step()
        return norm
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    opt.grad_scale = torch.clamp((norm + 1e-6) / clip, min=1.0).float()   # read by this step's fused kernel only
    try:
        opt.step()
    finally:
        del opt.grad_scale   # a later GradScaler step reads getattr(opt, "grad_scale", 1)
    return norm
