"""Losses of the transformer stages: per-scale loss weights (stage 1), masked CE and mask drawing (stage 2),
and per-scale metrics."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HMARError
from .data import keyed_rng

WEIGHTINGS = ("gaussian", "uniform", "equal")


def scale_loss_weights(patch_nums: Sequence[int], kind: str = "gaussian") -> torch.Tensor:
    """Total loss weight of each scale, ``[S]`` (float64).

    * ``gaussian`` (HMAR's official ``lognorm``): ``rho_k = pn_k / pn_max``; ``z_k`` = the *reversed* list
      ``rho_{S-1-k}`` standardised with the sample std (ddof 1); ``W_k = pdf(z_k) / sum pdf``. Sums to 1.
    * ``uniform`` (VAR): every token ``1/L``, so scale ``k`` totals ``pn_k^2 / L``. Sums to 1.
    * ``equal``: every scale totals 1 (sums to S).
    """
    pn = np.asarray(patch_nums, dtype=np.float64)
    if kind == "gaussian":
        if len(pn) < 2:
            return torch.ones(len(pn), dtype=torch.float64)
        rho = pn / pn.max()
        rev = rho[::-1]
        z = (rev - rho.mean()) / rho.std(ddof=1)
        pdf = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        return torch.from_numpy(pdf / pdf.sum())
    if kind == "uniform":
        n = pn ** 2
        return torch.from_numpy(n / n.sum())
    if kind == "equal":
        return torch.ones(len(pn), dtype=torch.float64)
    raise HMARError(f"unknown loss weighting {kind!r}; use one of {', '.join(WEIGHTINGS)}")


def token_loss_weights(patch_nums: Sequence[int], kind: str = "gaussian") -> torch.Tensor:
    """Per-token weights ``[L]`` (float32): scale ``k``'s total spread evenly over its ``pn_k^2`` tokens."""
    W = scale_loss_weights(patch_nums, kind)
    return torch.cat([torch.full((p * p,), float(W[i]) / (p * p)) for i, p in enumerate(patch_nums)]).float()


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 loss ``mean_B sum_L w_l * CE_{b,l}``; also returns the per-token CE ``[B, L]`` (no smoothing
    is applied to the returned CE when ``label_smoothing`` is 0)."""
    B, L, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing).view(B, L)
    return (ce * weights.to(ce.device)).sum(1).mean(), ce


def masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm: str = "token",
              label_smoothing: float = 0.0, total_masked: Optional[torch.Tensor] = None, world: int = 1
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage-2 loss: CE on the masked positions only.

    ``norm="token"``: sum over masked tokens / number of masked tokens (of the GLOBAL batch when
    ``total_masked`` is given: the loss is then scaled by ``world`` so that DDP's gradient averaging yields
    exactly the global token mean). ``norm="image"``: each image's mean over its masked tokens, averaged
    over images (the official ``mask_unweighted`` formula).
    """
    B, L, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing).view(B, L)
    m = mask.to(ce.dtype)
    if norm == "image":
        return ((ce * m).sum(1) / m.sum(1).clamp(min=1)).mean(), ce
    if norm != "token":
        raise HMARError(f"unknown masked-loss normalisation {norm!r}: use token or image")
    denom = total_masked.to(ce.dtype) / world if total_masked is not None else m.sum()
    return (ce * m).sum() / denom.clamp(min=1), ce


def weighted_coefficients(weights: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-token loss coefficients ``[B, L]`` of :func:`weighted_ce`: ``loss = sum(coef * CE)`` with
    ``coef[b, l] = w_l / B`` (for :func:`hmar.training.fused_ce.linear_cross_entropy`)."""
    return (weights.float() / batch)[None, :].expand(batch, -1)


def masked_coefficients(mask: torch.Tensor, norm: str = "token", total_masked: Optional[torch.Tensor] = None,
                        world: int = 1) -> torch.Tensor:
    """Per-token loss coefficients ``[B, L]`` of :func:`masked_ce` (same normalisations): ``loss = sum(coef * CE)``."""
    m = mask.float()
    if norm == "image":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * m.shape[0])
    if norm != "token":
        raise HMARError(f"unknown masked-loss normalisation {norm!r}: use token or image")
    denom = total_masked.float() / world if total_masked is not None else m.sum()
    return m / denom.clamp(min=1)


def draw_masks(keys: Sequence[Tuple[int, ...]], patch_nums: Sequence[int], gamma: Optional[float] = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Stage-2 masks ``[B, L]`` (True = masked), one independent draw per sample from its ``key``.

    Per sample: ``gamma ~ U(0, 1)`` (or the fixed ``gamma``, e.g. 0.5 for validation); for every scale
    ``k >= 1``, ``n = max(1, ceil(gamma * pn_k^2))`` positions chosen uniformly without replacement.
    Scale 0 is never masked. The draw depends only on the key, not on the batch or the process.
    """
    L = sum(p * p for p in patch_nums)
    u = np.empty((len(keys), L), dtype=np.float32)
    g = np.empty(len(keys), dtype=np.float64)
    for b, key in enumerate(keys):
        r = keyed_rng(*key, 3)
        g[b] = r.random() if gamma is None else gamma
        u[b] = r.random(L, dtype=np.float32)
    u_t = torch.from_numpy(u).to(device)
    g_t = torch.from_numpy(g).to(device)
    mask = torch.zeros(len(keys), L, dtype=torch.bool, device=device)
    start = patch_nums[0] ** 2
    for pn in patch_nums[1:]:
        n = pn * pn
        cnt = torch.ceil(g_t * n).clamp(1, n).long()                 # [B]
        rank = u_t[:, start:start + n].argsort(1).argsort(1)         # rank of each position's key
        mask[:, start:start + n] = rank < cnt[:, None]
        start += n
    return mask


def per_scale_stats(ce: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, patch_nums: Sequence[int],
                    select: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Sums for per-scale metrics: ``ce_sum [S]``, ``correct [S]``, ``count [S]`` over the selected tokens
    (``select`` ``[B, L]`` bool: e.g. masked positions, or valid samples)."""
    sel = torch.ones_like(target, dtype=torch.bool) if select is None else select
    hit = (logits.argmax(-1) == target) & sel
    ce_sel = ce * sel
    out_ce, out_hit, out_n = [], [], []
    start = 0
    for pn in patch_nums:
        sl = slice(start, start + pn * pn)
        out_ce.append(ce_sel[:, sl].sum())
        out_hit.append(hit[:, sl].sum())
        out_n.append(sel[:, sl].sum())
        start += pn * pn
    return {"ce_sum": torch.stack(out_ce).double(), "correct": torch.stack(out_hit).double(),
            "count": torch.stack(out_n).double()}


def split_scales(flat: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """``[B, L]`` indices -> list over scales of ``[B, pn^2]``."""
    return list(flat.split([p * p for p in patch_nums], dim=1))
