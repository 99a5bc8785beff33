"""VAR's multi-scale residual quantiser.

An encoder feature map ``f`` ([B, Cz, H, W]) is approximated by a sum over scales ``k`` of
``phi_k(up(e[r_k]))``: at every scale the residual left so far is area-resized to ``pn_k x pn_k``,
each position takes its nearest codebook vector, and the code map is bicubic-upsampled back to
``H x W`` and passed through a 3x3 "phi" conv that mixes ``(1-r) h + r conv(h)``.

Everything a transformer needs is a function of the per-scale index maps ``r_k``:
the accumulated reconstruction ``f_hat`` and the inputs of the two transformer branches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..presets import check_patch_nums


class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) * h + r * conv3x3(h)``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


def bicubic_matrix(n: int, size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[size, n]`` matrix ``A`` with ``A @ x @ A.T == F.interpolate(x, (size, size), mode="bicubic")`` for an
    ``n x n`` map ``x`` (align_corners False). PyTorch's bicubic resize is separable (4 taps per axis, indices
    clamped at the border), so one axis of it applied to the identity gives the whole operator."""
    eye = torch.eye(n, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32).view(n, 1, n, 1)
    return F.interpolate(eye, size=(size, 1), mode="bicubic")[:, 0, :, 0].t().to(dtype).contiguous()


def bicubic_up(h: torch.Tensor, size: int, matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bicubic resize of square maps ``[..., n, n] -> [..., size, size]`` as two small matrix products.

    Equal to ``F.interpolate(h, (size, size), mode="bicubic")`` up to float rounding (about 1e-7 relative), and
    much faster on CUDA, where PyTorch's kernel runs one thread per output pixel and loops over batch and
    channels (a 16 x 16 output of 16 x 32 maps: 256 threads; 0.35 ms per call on the H200, 2026-12-01 profile).
    ``matrix``: :func:`bicubic_matrix` of ``(n, size)`` when the caller keeps one. Autocast is off inside: the
    products run in ``h``'s dtype (fp32 for the quantiser), as the interpolation kernel would."""
    a = bicubic_matrix(h.shape[-1], size, h.device, h.dtype) if matrix is None else matrix
    dev = h.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):      # (autocast knows no meta device)
        return a @ h @ a.t()
    with torch.autocast(dev, enabled=False):
        return a @ h @ a.t()


def phi_index_table(num_scales: int, num_phi: int) -> List[int]:
    """Which of ``num_phi`` shared phi convs serves each of ``num_scales`` scales.

    Scale ``si`` sits at ``si / (num_scales - 1)`` in [0, 1] and takes the phi whose tick is nearest,
    ticks being evenly spread inside [0, 1] (margin ``1/(3K)`` for K = 4, else ``1/(2K)``), computed
    in float64 as the official code does (for 10 scales and 4 phis: 0,0,1,1,1,2,2,3,3,3).
    """
    if num_phi <= 1:
        return [0] * num_scales
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(margin, 1 - margin, num_phi)
    if num_scales == 1:
        return [0]
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


class _PhiList(nn.Module):
    """Holds the phi convs under the official key names and maps a scale index to its phi."""

    def __init__(self, channels: int, ratio: float, share: int, num_scales: int):
        super().__init__()
        self.share = share
        if share == 1:
            self.qresi = Phi(channels, ratio)
        else:
            n = num_scales if share == 0 else share
            self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(n)])
        self.set_num_scales(num_scales)

    def set_num_scales(self, num_scales: int) -> None:
        if self.share == 0:
            self.table = list(range(num_scales))
        elif self.share == 1:
            self.table = [0] * num_scales
        else:
            self.table = phi_index_table(num_scales, self.share)

    def __getitem__(self, si: int) -> Phi:
        return self.qresi if self.share == 1 else self.qresi_ls[self.table[si]]


class MultiScaleQuantizer(nn.Module):
    """Codebook, phi convs and the residual multi-scale algorithms (all in fp32)."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: Sequence[int], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.patch_nums = check_patch_nums(patch_nums)
        # codebook hit statistics (tokenizer training only); kept for checkpoint compatibility
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.quant_resi = _PhiList(z_channels, quant_resi, share_quant_resi, len(self.patch_nums))
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self._bicubic: dict = {}   # (n, size, device, dtype) -> bicubic_matrix, built on first use

    # ------------------------------------------------------------------ helpers
    def set_patch_nums(self, patch_nums: Sequence[int]) -> None:
        """Use another scale schedule (same latent size) without touching the weights."""
        patch_nums = check_patch_nums(patch_nums)
        if patch_nums != self.patch_nums:
            self.patch_nums = patch_nums
            self.quant_resi.set_num_scales(len(patch_nums))
            self.ema_vocab_hit_SV = self.ema_vocab_hit_SV.new_zeros(len(patch_nums), self.vocab_size)

    def _full(self, h: torch.Tensor, size: int) -> torch.Tensor:
        """Bicubic up-sampling of a code map to ``size x size`` (:func:`bicubic_up`; its matrices are kept)."""
        n = h.shape[-1]
        if n == size:
            return h
        key = (n, size, h.device, h.dtype)
        a = self._bicubic.get(key)
        if a is None:
            a = self._bicubic[key] = bicubic_matrix(n, size, h.device, h.dtype)
        return bicubic_up(h, size, a)

    @staticmethod
    def _area(f: torch.Tensor, pn: int) -> torch.Tensor:
        return f if f.shape[-1] == pn else F.interpolate(f, size=(pn, pn), mode="area")

    def lookup(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """Code vectors of a flat index map ``[B, pn*pn]`` as ``[B, Cz, pn, pn]``."""
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.z_channels, pn, pn)

    def scale_contribution(self, si: int, h_small: torch.Tensor, size: int) -> torch.Tensor:
        """``phi_si(bicubic_up(h))``: what scale ``si``'s code map adds to ``f_hat`` (``[B, Cz, size, size]``)."""
        return self.quant_resi[si](self._full(h_small, size))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (L2) for every position of ``z`` ([B, Cz, h, w]) -> [B, h*w]."""
        B, C = z.shape[:2]
        zf = z.permute(0, 2, 3, 1).reshape(-1, C)
        e = self.embedding.weight
        d = torch.addmm((zf * zf).sum(1, keepdim=True) + (e * e).sum(1), zf, e.t(), alpha=-2)
        return d.argmin(1).view(B, -1)

    # ------------------------------------------------------------------ algorithms
    @torch.no_grad()
    def encode(self, f: torch.Tensor) -> List[torch.Tensor]:
        """Residual quantisation of ``f`` ([B, Cz, H, W]) -> list over scales of ``[B, pn*pn]`` indices."""
        f = f.float()
        size = f.shape[-1]
        if size != self.patch_nums[-1]:
            raise ValueError(f"latent is {size}x{size} but the last scale is {self.patch_nums[-1]}: "
                             f"images must be {self.patch_nums[-1]}x the downsampling factor")
        rest, out = f.clone(), []
        for si, pn in enumerate(self.patch_nums):
            idx = self.nearest(self._area(rest, pn))
            out.append(idx)
            rest -= self.scale_contribution(si, self.lookup(idx, pn), size)
        return out

    def contributions(self, indices: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per-scale contributions ``phi_k(up(e[r_k]))`` at full latent size; their sum is ``f_hat``."""
        size = self.patch_nums[-1]
        return [self.scale_contribution(si, self.lookup(idx, pn), size)
                for si, (idx, pn) in enumerate(zip(indices, self.patch_nums))]

    def indices_to_fhat(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Accumulated reconstruction ``f_hat`` of all given scales (a prefix of the schedule is fine)."""
        f_hat = None
        for c in self.contributions(indices):
            f_hat = c if f_hat is None else f_hat + c
        return f_hat

    def next_scale_inputs(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the next-scale branch: for every scale k >= 1, ``f_hat`` of scales
        < k area-resized to ``pn_k``, flattened row-major and concatenated: ``[B, L - 1, Cz]``."""
        size = self.patch_nums[-1]
        B = indices[0].shape[0]
        f_hat = torch.zeros(B, self.z_channels, size, size, device=indices[0].device)
        out = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.scale_contribution(si, self.lookup(indices[si], self.patch_nums[si]), size)
            out.append(self._area(f_hat, self.patch_nums[si + 1]).flatten(2).transpose(1, 2))
        return torch.cat(out, 1) if out else f_hat.new_zeros(B, 0, self.z_channels)

    def masked_inputs(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the masked branch: for every scale k >= 1, that scale's *own*
        contribution ``area(phi_k(up(e[r_k])), pn_k)`` (not accumulated): ``[B, L - 1, Cz]``."""
        size = self.patch_nums[-1]
        out = []
        for si in range(1, len(self.patch_nums)):
            pn = self.patch_nums[si]
            c = self.scale_contribution(si, self.lookup(indices[si], pn), size)
            out.append(self._area(c, pn).flatten(2).transpose(1, 2))
        return torch.cat(out, 1)

    def current_scale_input(self, si: int, idx: torch.Tensor) -> torch.Tensor:
        """The masked-branch input of one scale at inference: ``[B, pn*pn, Cz]``."""
        pn, size = self.patch_nums[si], self.patch_nums[-1]
        return self._area(self.scale_contribution(si, self.lookup(idx, pn), size), pn).flatten(2).transpose(1, 2)

    def add_scale(self, si: int, f_hat: torch.Tensor, h_small: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Inference step: add scale ``si``'s code map to ``f_hat`` and return the next scale's
        next-scale-branch input ``[B, pn_{si+1}^2, Cz]`` (``None`` after the last scale)."""
        f_hat = f_hat + self.scale_contribution(si, h_small, f_hat.shape[-1])
        if si + 1 == len(self.patch_nums):
            return f_hat, None
        return f_hat, self._area(f_hat, self.patch_nums[si + 1]).flatten(2).transpose(1, 2)

    def forward(self, f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Training pass: returns (straight-through ``f_hat``, codebook+commitment loss,
        per-scale code hit counts ``[S, V]``, indices). Losses are averaged over scales on the running
        ``f_hat``: ``beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2``."""
        f = f.float()
        size = f.shape[-1]
        f_det = f.detach()
        rest = f_det.clone()
        f_hat = torch.zeros_like(f)
        loss = f.new_zeros(())
        hits, idxs = [], []
        for si, pn in enumerate(self.patch_nums):
            with torch.no_grad():
                idx = self.nearest(self._area(rest, pn))
            idxs.append(idx)
            hits.append(torch.bincount(idx.flatten(), minlength=self.vocab_size).float())
            h = self.scale_contribution(si, self.lookup(idx, pn), size)
            f_hat = f_hat + h
            rest = rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_det)
        loss = loss / len(self.patch_nums)
        f_st = f + (f_hat - f).detach()  # straight-through: the decoder's gradient reaches the encoder
        return f_st, loss, torch.stack(hits), idxs
