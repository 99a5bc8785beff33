"""Convolutional encoder and decoder of VAR's VQ-VAE (LDM/taming layout, fused qkv attention).

Module names follow the official checkpoint so that its state dict loads strictly.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm_from_channel_stats(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                                  eps: float) -> torch.Tensor:
    """``F.group_norm`` of an ``[B, C, H, W]`` tensor, with the group statistics combined from per-channel ones.

    Each channel's mean and variance come from one reduction over the positions of ``x`` seen as ``[B, H*W, C]``
    (a view when ``x`` is channels_last, so the reduction reads whole rows of contiguous channels), and a group's
    mean and variance follow exactly from its channels' (equal counts: the mean of the means, and the mean of the
    variances plus the variance of the means). The direct reduction over a group reads, in channels_last, only
    C / groups contiguous channels per position (5 of 160 in VAR's decoder). Computed in fp32 at least (fp64
    stays fp64), returned in ``x``'s dtype."""
    B, C, H, W = x.shape
    f = torch.promote_types(x.dtype, torch.float32)
    var_c, mean_c = torch.var_mean(x.permute(0, 2, 3, 1).reshape(B, H * W, C).to(f), dim=1, correction=0)
    mean_c, var_c = mean_c.view(B, groups, -1), var_c.view(B, groups, -1)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = var_c.mean(-1, keepdim=True) + (mean_c - mean_g).square().mean(-1, keepdim=True)
    scale = torch.rsqrt(var_g + eps) * weight.to(f).view(groups, -1)            # [B, groups, C / groups]
    shift = bias.to(f).view(groups, -1) - mean_g * scale
    return (x.to(f) * scale.view(B, C, 1, 1) + shift.view(B, C, 1, 1)).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict); with ``channel_stats`` set (what
    ``FastDecoder(nhwc_kernels=True)`` does) it runs :func:`group_norm_from_channel_stats` instead, which
    torch.compile turns into kernels that read channels_last tensors along their contiguous channels."""

    channel_stats: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_stats and x.dim() == 4:
            return group_norm_from_channel_stats(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def _norm(ch: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> (dropout) -> conv3x3, plus a (1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with one fused 1x1 qkv conv."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        # [B, 1, HW, C] each: one head of width C, softmax scale C^-0.5
        h = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])
        return x + self.proj_out(h[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _two_taps(w: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """The 3 taps (offsets -1, 0, +1) of a conv along ``dim`` after nearest x2 up-sampling, as the 2 taps that output
    rows of ``phase`` (0: even, 1: odd) apply to the low-resolution input: offsets (-1, 0) for even rows, (0, +1)
    for odd ones (each high-resolution offset lands on one low-resolution row, so taps sharing one add up)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t0, t1 + t2) if phase == 0 else (t0 + t1, t2), dim)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv.

    :meth:`fuse_subpixel` (inference; what ``FastDecoder(subpixel=True)`` does) computes the same function as one
    2x2 conv on the low-resolution input with 4x the output channels, one group per output phase (even / odd row
    and column), interleaved after: 16 instead of 36 multiply-adds per output pixel and channel pair, and the 4x
    larger up-sampled input is never written. The fused weights are buffers outside the state dict, computed from
    the conv's weights at that moment (call it again after changing them).

    With ``nhwc`` set (``FastDecoder(nhwc_kernels=True)``), a channels_last input is up-sampled as the
    ``[B, H, W, C]`` array it is in memory (each position's channels copied whole, the output written in order)
    instead of through ``F.interpolate``'s index arithmetic, and with :meth:`fuse_subpixel` too the phases are
    interleaved as whole channel rows of that array, into a channels_last output; the same values."""

    nhwc: bool = False

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)
        self.register_buffer("subpixel_weight", None, persistent=False)
        self.register_buffer("subpixel_bias", None, persistent=False)

    def fuse_subpixel(self) -> None:
        w = self.conv.weight.detach()
        k = torch.cat([_two_taps(_two_taps(w.double(), a, 2), b, 3) for a in (0, 1) for b in (0, 1)])
        self.subpixel_weight = k.to(w.dtype)
        self.subpixel_bias = self.conv.bias.detach().repeat(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subpixel_weight is None:
            if self.nhwc and x.is_contiguous(memory_format=torch.channels_last):
                B, C, H, W = x.shape
                up = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(B, H, 2, W, 2, C)
                return self.conv(up.reshape(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2))
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        B, _, H, W = x.shape
        # output [i', j'] of phase (a, b) reads input rows i'-1+a .. i'+a: a 2x2 conv with padding 1 gives every
        # phase on an (H+1) x (W+1) grid, and phase (a, b) is its crop starting at (a, b)
        y = F.conv2d(x, self.subpixel_weight, self.subpixel_bias, padding=1)
        if self.nhwc and y.is_contiguous(memory_format=torch.channels_last):
            # the same interleave on the [B, H+1, W+1, 4C] array in memory: each output position copies one
            # contiguous row of C channels, and the output is channels_last too
            yp = y.permute(0, 2, 3, 1).view(B, H + 1, W + 1, 2, 2, -1)
            rows = [torch.stack([yp[:, a:a + H, b:b + W, a, b] for b in (0, 1)], 3) for a in (0, 1)]
            return torch.stack(rows, 2).reshape(B, 2 * H, 2 * W, -1).permute(0, 3, 1, 2)   # [B, H, 2, W, 2, C]
        y = y.view(B, 2, 2, -1, H + 1, W + 1)
        rows = [torch.stack([y[:, a, b, :, a:a + H, b:b + W] for b in (0, 1)], -1) for a in (0, 1)]
        return torch.stack(rows, -3).reshape(B, -1, 2 * H, 2 * W)   # [B, C, H, 2, W, 2] -> [B, C, 2H, 2W]


class _Level(nn.Module):
    """One resolution level: a list of resblocks, optional attention after each, optional resampling."""


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True, groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        last = len(ch_mult) - 1
        cin = ch
        for i, m in enumerate(ch_mult):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * in_mult[i], ch * m
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, dropout, groups))
                cin = cout
                if i == last and using_sa:
                    level.attn.append(AttnBlock(cin, groups))
            if i != last:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, dropout, groups)
        self.mid.attn_1 = AttnBlock(cin, groups) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin, dropout, groups)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True, groups: int = 32):
        super().__init__()
        last = len(ch_mult) - 1
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, dropout, groups)
        self.mid.attn_1 = AttnBlock(cin, groups) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin, dropout, groups)
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout, dropout, groups))
                cin = cout
                if i == last and using_sa:
                    level.attn.append(AttnBlock(cin, groups))
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] is level i (up[0] = full resolution)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

    @staticmethod
    def _level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(level.block):
            h = block(h)
            if len(level.attn):
                h = level.attn[i](h)
        return h

    def low_res(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder up to the last up-sampling: every level but the full-resolution one."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for k in range(len(self.up) - 1, 0, -1):      # up[L-1] .. up[1]; up[1]'s up-sampling opens the last part
            h = self._level(self.up[k], h)
            if k > 1:
                h = self.up[k].upsample(h)
        return h

    def full_res(self, h: torch.Tensor) -> torch.Tensor:
        """The rest: the last up-sampling, the full-resolution level and the output convolution, where the largest
        activations are (:class:`hmar.accel.FastDecoder` runs it on chunks of the batch)."""
        if len(self.up) > 1:
            h = self.up[1].upsample(h)
        h = self._level(self.up[0], h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.full_res(self.low_res(z))
