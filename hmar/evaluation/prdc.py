"""Precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019), plus density and coverage
(Naeem et al. 2020) from the same distances. Distances are computed in row blocks, so memory stays
``O(block * N)`` for any set size."""
from __future__ import annotations

from typing import Dict, Optional, Union

import numpy as np
import torch

from ..errors import HMARError

Array = Union[np.ndarray, torch.Tensor]


def _as_tensor(x: Array, device: Optional[Union[str, torch.device]]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device or "cpu", dtype=torch.float32)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def knn_sq_radii(x: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row."""
    if len(x) <= k:
        raise HMARError(f"k-NN radii need more than k={k} points, got {len(x)}; use more images or a smaller k")
    x_sq = (x * x).sum(1)
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), block):
        d = _sq_dists(x[i:i + block], x, x_sq)
        rows = torch.arange(i, min(i + block, len(x)), device=x.device)
        d[rows - i, rows] = -1.0  # exclude the point itself (it would be its own nearest neighbour)
        out[i:i + block] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def precision_recall(real: Array, fake: Array, k: int = 3, block: int = 1024,
                     device: Optional[Union[str, torch.device]] = None) -> Dict[str, float]:
    """``precision``, ``recall``, ``density`` and ``coverage`` of ``fake [M, D]`` against ``real [N, D]``.

    precision: share of fake points inside the union of real k-NN balls; recall: share of real
    points inside the union of fake k-NN balls (a point lies inside a ball when its distance to the
    centre is at most the centre's k-th neighbour distance).
    """
    r, f = _as_tensor(real, device), _as_tensor(fake, device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise HMARError(f"features must be [N, D] with equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    centre = r.mean(0, keepdim=True)  # centring reduces cancellation in |a|^2 + |b|^2 - 2ab
    r, f = r - centre, f - centre
    r_rad, f_rad = knn_sq_radii(r, k, block), knn_sq_radii(f, k, block)
    r_sq = (r * r).sum(1)
    in_real = 0
    density_hits = 0
    real_covered_by_fake = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    nearest_fake = torch.full((len(r),), float("inf"), device=r.device)
    for j in range(0, len(f), block):
        d = _sq_dists(f[j:j + block], r, r_sq)  # [b, N]: fake rows, real columns
        inside = d <= r_rad[None, :]
        in_real += int(inside.any(1).sum())
        density_hits += int(inside.sum())
        real_covered_by_fake |= (d <= f_rad[j:j + block, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    return {
        "precision": in_real / len(f),
        "recall": int(real_covered_by_fake.sum()) / len(r),
        "density": density_hits / (k * len(f)),
        "coverage": int((nearest_fake <= r_rad).sum()) / len(r),
    }
