"""One Triton kernel for an AdaLN block's residual add + LayerNorm + modulation (inference; training with a backward):

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
runs on CPU tensors (tests). BENCHMARKS.md section 3o measures it against inductor's kernels.

For training (:data:`hmar.model.blocks.FUSED_NORM_TRAINING`, off by default), ``hmar::adaln_norm_train`` also keeps
each row's mean and 1 / std, and its registered backward (``hmar::adaln_norm_train_bwd``, :func:`adaln_norm_backward`)
computes the gradients of ``x`` and ``h`` per row and those of ``gate``, ``scale`` and ``shift`` as per-sample sums
over chunks of rows."""
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
    warps = max(warps, min(16, per * block // 1024))   # wider rows than the sweep's: at most 32 elements a thread
    return ROWS or per, NUM_WARPS or warps


@triton.jit
def _adaln_kernel(x_ptr, h_ptr, gate_ptr, scale_ptr, shift_ptr, xo_ptr, y_ptr, stats_ptr, M, L, C,
                  stride_x, stride_h, stride_gate, stride_scale, stride_shift, eps,
                  BRANCH: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
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
    if STATS:   # for the backward (training): mean and 1 / std per row
        tl.store(stats_ptr + rows, mean, mask=rows < M)
        tl.store(stats_ptr + M + rows, rstd, mask=rows < M)
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
                      h: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None, stats: bool = False):
    """``(x + h * gate, LN(x + h * gate) * (1 + scale) + shift)`` for ``x`` ``[B, L, C]`` (see the module's doc);
    without ``h`` the first is ``x`` itself. Outputs contiguous, ``x'`` in ``x``'s dtype, the second in ``out_dtype``
    (default: ``x``'s). ``stats=True`` (training) also returns the rows' fp32 mean and 1 / std as ``[2, B * L]``."""
    if x.dim() != 3:
        raise ValueError(f"adaln_norm: x has shape {tuple(x.shape)}; expected [B, L, C]")
    B, L, C = x.shape
    xr = _rows(x)
    scale, s_scale = _sample_rows(scale, B, C, "scale")
    shift, s_shift = _sample_rows(shift, B, C, "shift")
    y = torch.empty((B, L, C), dtype=out_dtype or x.dtype, device=x.device)
    st = torch.empty((2, B * L) if stats else (0,), dtype=torch.float32, device=x.device)
    branch = h is not None
    if branch:
        if h.shape != x.shape or gate is None:
            raise ValueError(f"adaln_norm: the branch h {tuple(h.shape)} must match x {tuple(x.shape)}, with a gate")
        hr = _rows(h)
        gate, s_gate = _sample_rows(gate, B, C, "gate")
        xo = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    else:
        hr, gate, s_gate, xo = xr, scale, 0, x   # unused by the kernel
    M = B * L
    if M:
        per, warps = launch_config(M, C)
        _adaln_kernel[(triton.cdiv(M, per),)](
            xr, hr, gate, scale, shift, xo, y, st, M, L, C, xr.stride(0), hr.stride(0), s_gate, s_scale, s_shift,
            eps, BRANCH=branch, STATS=stats, BLOCK=triton.next_power_of_2(C), ROWS=per, num_warps=warps)
    return (xo, y, st) if stats else (xo, y)


@triton.jit
def _adaln_bwd_kernel(xs_ptr, h_ptr, gate_ptr, scale_ptr, stats_ptr, dy_ptr, dxo_ptr, dx_ptr, dh_ptr, part_ptr,
                      M, L, C, CHUNK, stride_gate, stride_scale,
                      BRANCH: tl.constexpr, HAS_DXO: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """The backward of :func:`_adaln_kernel` over ``CHUNK`` rows of one sample (program (sample, chunk)): ``dx``
    (the gradient of ``x'``: ``dxo`` + the LayerNorm's), ``dh = dx * gate``, and this chunk's partial sums of the
    gradients of gate, scale and shift (``part`` [3, B, chunks, C], summed by the caller)."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    ckeep = cols < C
    scale = tl.load(scale_ptr + b * stride_scale + cols, mask=ckeep, other=0.0).to(tl.float32)
    acc_scale = tl.zeros([BLOCK], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK], dtype=tl.float32)
    if BRANCH:
        gate = tl.load(gate_ptr + b * stride_gate + cols, mask=ckeep, other=0.0).to(tl.float32)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for r0 in range(start, end, ROWS):
        local = r0 + tl.arange(0, ROWS)
        rkeep = local < end
        rows = b * L + local
        keep = rkeep[:, None] & ckeep[None, :]
        at = rows[:, None] * C + cols[None, :]
        mean = tl.load(stats_ptr + rows, mask=rkeep, other=0.0)
        rstd = tl.load(stats_ptr + M + rows, mask=rkeep, other=0.0)
        xs = tl.load(xs_ptr + at, mask=keep, other=0.0).to(tl.float32)
        xhat = tl.where(keep, (xs - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + at, mask=keep, other=0.0).to(tl.float32)
        acc_scale += tl.sum(dy * xhat, 0)
        acc_shift += tl.sum(dy, 0)
        dyh = dy * (1.0 + scale[None, :])
        c1 = tl.sum(xhat * dyh, 1) / C
        c2 = tl.sum(dyh, 1) / C
        dx = (dyh - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DXO:
            dx += tl.load(dxo_ptr + at, mask=keep, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=keep)
        if BRANCH:
            h = tl.load(h_ptr + at, mask=keep, other=0.0).to(tl.float32)
            acc_gate += tl.sum(tl.where(keep, dx * h, 0.0), 0)
            tl.store(dh_ptr + at, (dx * gate[None, :]).to(dh_ptr.dtype.element_ty), mask=keep)
    part = (b * chunks + chunk) * C + cols
    plane = tl.num_programs(0) * chunks * C
    tl.store(part_ptr + part, acc_gate, mask=ckeep)
    tl.store(part_ptr + plane + part, acc_scale, mask=ckeep)
    tl.store(part_ptr + 2 * plane + part, acc_shift, mask=ckeep)


BWD_CHUNK_ROWS: Optional[int] = None
"""Rows of one sample per backward program (None: 16 tiles of :func:`launch_config`'s rows)."""


def adaln_norm_backward(xs: torch.Tensor, scale: torch.Tensor, stats: torch.Tensor, dy: torch.Tensor,
                        dxo: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None,
                        gate: Optional[torch.Tensor] = None):
    """Gradients of :func:`adaln_norm_kernel` (``stats=True``'s): ``(dx, dh, dgate, dscale, dshift)`` given the
    output's ``dy``, ``x'``'s ``dxo`` (None: unused) and the saved ``x'`` (``xs``), ``stats``, ``h`` and ``gate``
    (None without a branch: ``dh`` and ``dgate`` are None). ``dgate`` / ``dscale`` / ``dshift`` are fp32 ``[B, C]``,
    one row per sample (:func:`_grad_like` folds them to the inputs' shapes)."""
    B, L, C = xs.shape
    scale, s_scale = _sample_rows(scale, B, C, "scale")
    branch = h is not None
    if branch:
        gate, s_gate = _sample_rows(gate, B, C, "gate")
        h = h.contiguous()
    else:
        gate, s_gate = scale, 0
    xs, dy = xs.contiguous(), dy.contiguous()
    dxo = None if dxo is None else dxo.contiguous()
    dx = torch.empty_like(xs)
    dh = torch.empty_like(h) if branch else dx
    per = launch_config(B * L, C)[0]
    rows = BWD_CHUNK_ROWS or (4 if _INTERPRETED else 16 * per)
    chunks = triton.cdiv(L, rows)
    part = torch.empty((3, B, chunks, C), dtype=torch.float32, device=xs.device)
    if B * L:
        _adaln_bwd_kernel[(B, chunks)](
            xs, h if branch else xs, gate, scale, stats, dy, xs if dxo is None else dxo, dx, dh, part,
            B * L, L, C, rows, s_gate, s_scale, BRANCH=branch, HAS_DXO=dxo is not None,
            BLOCK=triton.next_power_of_2(C), ROWS=per, num_warps=1 if _INTERPRETED else 4)
    else:
        part.zero_()
    dgate, dscale, dshift = (part[i].sum(1) for i in range(3))   # [B, C] each (separate tensors: op outputs)
    return dx, dh if branch else None, dgate if branch else None, dscale, dshift


def _grad_like(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample gradient ``[B, C]`` as the gradient of the modulation vector ``like`` (``[B or 1, (1,) C]``)."""
    if like.shape[0] == 1 and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    return g.view(like.shape).to(like.dtype)


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


def _register_training_ops() -> None:
    """``hmar::adaln_norm_train`` (the forward, also returning the rows' statistics) and its backward
    ``hmar::adaln_norm_train_bwd``, joined by a registered autograd formula."""
    from torch.library import custom_op, register_autograd
    if hasattr(torch.ops.hmar, "adaln_norm_train"):
        return

    @custom_op("hmar::adaln_norm_train", mutates_args=())
    def _train(x: torch.Tensor, h: Optional[torch.Tensor], gate: Optional[torch.Tensor], scale: torch.Tensor,
               shift: torch.Tensor, eps: float, out_dtype: torch.dtype
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xo, y, st = adaln_norm_kernel(x, scale, shift, eps, h, gate, out_dtype, stats=True)
        return (xo if h is not None else x.new_empty(0)), y, st   # (no branch: x' is x, not returned)

    @_train.register_fake
    def _(x, h, gate, scale, shift, eps, out_dtype):
        B, L, C = x.shape
        xo = torch.empty_like(x, memory_format=torch.contiguous_format) if h is not None else x.new_empty(0)
        return xo, x.new_empty((B, L, C), dtype=out_dtype), x.new_empty((2, B * L), dtype=torch.float32)

    @custom_op("hmar::adaln_norm_train_bwd", mutates_args=())
    def _train_bwd(xs: torch.Tensor, h: Optional[torch.Tensor], gate: Optional[torch.Tensor], scale: torch.Tensor,
                   stats: torch.Tensor, dy: torch.Tensor, dxo: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dx, dh, dg, ds, db = adaln_norm_backward(xs, scale, stats, dy, dxo, h, gate)
        return dx, xs.new_empty(0) if dh is None else dh, xs.new_empty(0) if dg is None else dg, ds, db

    @_train_bwd.register_fake
    def _(xs, h, gate, scale, stats, dy, dxo):
        B, L, C = xs.shape
        per_sample = xs.new_empty((B, C), dtype=torch.float32)
        return (torch.empty_like(xs, memory_format=torch.contiguous_format),
                xs.new_empty(0) if h is None else torch.empty_like(h, memory_format=torch.contiguous_format),
                xs.new_empty(0) if h is None else torch.empty_like(per_sample), per_sample, torch.empty_like(per_sample))

    def setup_context(ctx, inputs, output):
        x, h, gate, scale, shift, eps, out_dtype = inputs
        xo, y, st = output
        ctx.save_for_backward(x if h is None else xo, h, gate, scale, shift, st)

    def backward(ctx, dxo, dy, dstats):
        xs, h, gate, scale, shift, st = ctx.saved_tensors
        branch = h is not None
        if dy is None:
            dy = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device)
        dx, dh, dg, ds, db = torch.ops.hmar.adaln_norm_train_bwd(xs, h, gate, scale, st, dy,
                                                                 dxo if branch else None)
        return (dx.to(xs.dtype), dh if branch else None, _grad_like(dg, gate) if branch else None,
                _grad_like(ds, scale), _grad_like(db, shift), None, None)

    register_autograd("hmar::adaln_norm_train", backward, setup_context=setup_context)


_register_ops()
_register_training_ops()
