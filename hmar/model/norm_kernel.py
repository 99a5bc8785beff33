"""One Triton kernel for an AdaLN block's residual add + LayerNorm + modulation in inference:

    x' = x + h * gate        (the residual branch; optional)
    y  = LN(x') * (1 + scale) + shift

reading ``x`` and ``h`` once and writing ``x'`` and ``y`` once, a tile of whole rows per program. ``gate``,
``scale`` and ``shift`` are ``[B, C]`` rows of a block's modulation (one per sample; the row ``r`` of ``x`` viewed as
``[B * L, C]`` takes sample ``r // L``'s). Statistics in fp32 over ``x'`` as stored (rounded to ``x``'s dtype), so the
normalisation sees the stream the next layer reads.

Registered as the custom ops ``hmar::adaln_norm`` (no branch) and ``hmar::adaln_residual_norm``, so that
torch.compile keeps each as one call inside a compiled block. :class:`hmar.accel.GraphedModel` switches them on
(``fused_norm``); :meth:`hmar.model.blocks.AdaLNBlock.forward` and :class:`~hmar.model.blocks.AdaLNHead` call them
(:func:`hmar.model.blocks.modulated_norm`). Imported with that switch, not with hmar. Under ``TRITON_INTERPRET=1`` it
runs on CPU tensors (tests). BENCHMARKS.md section 3o measures it against inductor's kernels."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether its kernels run in the CPU interpreter (see hmar.attention.triton_kernel)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

ROWS: Optional[int] = None
"""Rows per program (None: :func:`launch_config` picks). Set by ``benchmarks/bench_norm.py``'s sweep."""
NUM_WARPS: Optional[int] = None
"""Warps per program (None: :func:`launch_config` picks)."""


def available(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or (_INTERPRETED and device.type == "cpu")


def launch_config(rows: int, width: int) -> Tuple[int, int]:
    """``(rows per program, warps)`` for ``rows`` rows of ``width`` channels: the fastest of a sweep on the H200 at
    widths 1024 and 1920 over every pass size of a guided batch of 16 (``benchmarks/bench_norm.py --sweep``,
    BENCHMARKS.md section 3o). :data:`ROWS` / :data:`NUM_WARPS` override it."""
    if _INTERPRETED:
        return 2, 1
    block = triton.next_power_of_2(width)
    if rows <= 128:
        per, warps = 1, 8
    elif rows <= 1152:
        per, warps = 1, 4
    elif block <= 1024 and rows >= 8192:
        per, warps = (2 if rows >= 16384 else 1), 4
    else:
        per, warps = 1, 2
    return ROWS or per, NUM_WARPS or warps


@triton.jit
def _adaln_kernel(x_ptr, h_ptr, gate_ptr, scale_ptr, shift_ptr, xo_ptr, y_ptr, M, L, C,
                  stride_x, stride_h, stride_gate, stride_scale, stride_shift, eps,
                  BRANCH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    keep = (rows < M)[:, None] & (cols < C)[None, :]
    sample = (rows // L)[:, None]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=keep, other=0.0)
    if BRANCH:
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + sample * stride_gate + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + h * gate).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + rows[:, None] * C + cols[None, :], x, mask=keep)
    x = x.to(tl.float32)
    mean = tl.sum(x, 1) / C
    d = tl.where(keep, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
    scale = tl.load(scale_ptr + sample * stride_scale + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + sample * stride_shift + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * (1.0 + scale) + shift
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=keep)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ([..., C]) as ``[M, C]`` with unit stride along C (a view where one exists)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.contiguous().view(-1, t.shape[-1])


def _sample_rows(v: torch.Tensor, batch: int, width: int, name: str) -> Tuple[torch.Tensor, int]:
    """A modulation vector ``[B or 1, C]`` (or ``[B or 1, 1, C]``) and its stride between samples (0: shared)."""
    v = v.reshape(v.shape[0], width) if v.dim() == 3 else v
    if v.dim() != 2 or v.shape[1] != width or v.shape[0] not in (1, batch):
        raise ValueError(f"adaln_norm: {name} has shape {tuple(v.shape)}; expected [{batch} or 1, {width}]")
    v = v if v.stride(1) == 1 else v.contiguous()
    return v, (0 if v.shape[0] == 1 else v.stride(0))


def adaln_norm_kernel(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                      h: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x + h * gate, LN(x + h * gate) * (1 + scale) + shift)`` for ``x`` ``[B, L, C]`` (see the module's doc);
    without ``h`` the first is ``x`` itself. Outputs in ``x``'s dtype, contiguous."""
    if x.dim() != 3:
        raise ValueError(f"adaln_norm: x has shape {tuple(x.shape)}; expected [B, L, C]")
    B, L, C = x.shape
    xr = _rows(x)
    scale, s_scale = _sample_rows(scale, B, C, "scale")
    shift, s_shift = _sample_rows(shift, B, C, "shift")
    y = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    branch = h is not None
    if branch:
        if h.shape != x.shape or gate is None:
            raise ValueError(f"adaln_norm: the branch h {tuple(h.shape)} must match x {tuple(x.shape)}, with a gate")
        hr = _rows(h)
        gate, s_gate = _sample_rows(gate, B, C, "gate")
        xo = torch.empty_like(y)
    else:
        hr, gate, s_gate, xo = xr, scale, 0, x   # unused by the kernel
    M = B * L
    if M:
        per, warps = launch_config(M, C)
        _adaln_kernel[(triton.cdiv(M, per),)](
            xr, hr, gate, scale, shift, xo, y, M, L, C, xr.stride(0), hr.stride(0), s_gate, s_scale, s_shift, eps,
            BRANCH=branch, BLOCK=triton.next_power_of_2(C), ROWS=per, num_warps=warps)
    return xo, y


def _register_ops() -> None:
    from torch.library import custom_op
    if hasattr(torch.ops.hmar, "adaln_norm"):
        return   # module imported again (a test's copy): the ops call the first one's kernel

    @custom_op("hmar::adaln_norm", mutates_args=())
    def _norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
        return adaln_norm_kernel(x, scale, shift, eps)[1]

    @_norm.register_fake
    def _(x, scale, shift, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @custom_op("hmar::adaln_residual_norm", mutates_args=())
    def _residual_norm(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return adaln_norm_kernel(x, scale, shift, eps, h, gate)

    @_residual_norm.register_fake
    def _(x, h, gate, scale, shift, eps):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))


_register_ops()
