"""Fused block-sparse attention in Triton (FlashAttention-2 style), forward and backward.

One kernel launch covers every scale and every ``(batch, head)`` pair: the grid is
``(B*H, tiles)``. A *tile* is a run of at most ``BLOCK`` consecutive positions on the "outer" axis
(query rows in the forward and dQ passes, key rows in the dK/dV pass) together with the
range of positions on the "inner" axis it has to visit. The tile list (the *work list*) is built
on the host, once per ``(lengths, pattern, tile sizes, device)``, and cached:

* **Which rows form a tile.** Two tilings are costed and the cheaper one is kept:

  - *packed*: consecutive whole blocks smaller than ``BLOCK`` are packed into one tile (so the
    1, 4, 9, 16 ... token scales share a tile instead of each wasting a 128-row tile), and blocks
    of ``BLOCK`` rows or more are cut into ``BLOCK``-row tiles starting at the block boundary (so
    no tile of a large block straddles into the next block);
  - *contiguous*: plain ``BLOCK``-row tiles from position 0 (sometimes cheaper for
    ``block_causal``, whose ranges grow monotonically).

* **Which inner positions a tile visits.** With ``lo[i] <= j < hi[i]`` the set of positions ``j``
  that outer position ``i`` interacts with (both patterns give one interval per position, and the
  interval bounds never decrease with ``i``), a tile of outer positions ``[s, e)`` visits inner
  positions ``[min lo, max hi)`` only; everything else is never loaded. Inside that range the
  positions ``[max lo, min hi)`` are visible to *every* row of the tile. The range is cut into
  three phases, ``[p0, p1)`` masked, ``[p1, p2)`` unmasked and ``[p2, p3)`` masked, where the
  unmasked phase is made of whole inner tiles only: those tiles are loaded without bounds checks
  and need no mask at all. Only the ragged ends pay for the mask.

* **Order.** Tiles are sorted by estimated cost, heaviest first, and the grid's fastest axis is
  ``B*H``: so the hardware scheduler starts the longest tiles of every head first
  (longest-processing-time-first), which evens out the tail at the end of the launch.

The backward pass is one preprocessing launch (``delta = rowsum(dO * O)``) and one main launch
whose work list holds both *dK/dV tiles* (a tile of key rows looping over the query tiles that
see it) and *dQ tiles* (a tile of query rows looping over the key tiles it sees). Every output
element is written by exactly one program: no atomics, no zero-fill, no second pass. The dQ tiles
recompute the scores and probabilities that the dK/dV tiles computed; with :data:`DQ_ATOMIC` (opt-in,
``HMAR_TRITON_DQ_ATOMIC=on|tune``) the dK/dV tiles instead add their share of dQ into a zeroed fp32
buffer with atomics, and a last launch (``_dq_finish_kernel``) scales it and stores it.

Numerics: ``exp2`` with ``log2(e)`` folded into the softmax scale; the forward stores the base-2
log-sum-exp per row; all ``tl.dot`` operands are in the input dtype (fp16 or bf16) with fp32
accumulation; outputs and gradients are stored in the input dtype.

Tile sizes / warps / stages: on CUDA a small candidate set is timed on the first call for each
``(lengths, pattern, head dim, dtype, B*H)`` and the fastest kept (set ``HMAR_TRITON_AUTOTUNE=0``
to use the defaults). Triton's own ``triton.autotune`` is not used because the work list depends
on the tile size, which ``triton.autotune`` would only choose inside the launch. Under
``TRITON_INTERPRET=1`` (CPU) small 16x16 tiles are used so tests stay fast.

Layouts: ``q, k, v`` and ``dO`` may each be any strided ``[B, H, N, D]`` view with a contiguous last
dim (e.g. of one packed qkv projection, or normalised q/k beside a strided v); only a tensor whose
last dim is not contiguous is copied. The output is stored as ``[B, N, H, D]`` and returned as its
``[B, H, N, D]`` transpose, so the ``out.transpose(1, 2).reshape(B, N, H * D)`` that follows every
attention layer is free; the gradients are contiguous ``[B, H, N, D]``. The
per-call host work is one dictionary lookup for the cached plan (configuration, work list,
bounds), a few allocations and three launches (forward; delta and backward).

L2-normalised attention (``qk_norm``, one scale ``s_h`` per head; :data:`hmar.attention.FUSED_QK_NORM`): the
attention of ``F.normalize(q) * s_h`` and ``F.normalize(k)`` from the raw q and k. ``_rows_kernel`` writes the
row norms of q and k (fp32 ``[2, B, H, N]``, kept for the backward); the scores are the raw dot products times
``s_h / max(|q|, eps)`` per row and ``1 / max(|k|, eps)`` per column; the backward's dK and dQ products use the
normalised tiles (bounded, so tiny rows cannot overflow), and its epilogue maps the gradients of the normalised q
and k to those of the raw ones (``_normalize_grad``, F.normalize's derivative) and writes ``<u, dq_hat>`` per row
for the head scale's gradient. ``QK_NORM`` is a compile-time flag: without it the kernels are unchanged.

Inference (``_dense_kernel``): a call over one block that needs no gradient (every sampling pass: one scale, dense)
runs a kernel of its own instead: grid ``(query tiles, B*H)``, no work list and no log-sum-exp, tiles no larger than
the pass (:func:`dense_candidates`, autotuned per pass shape), q and k normalised on the tiles in registers (rounded
to the input dtype, as the normalisation ops' output would be). :func:`dense_inference_attention` also adds the
layer's q / v biases and computes its temperature inside it, so that a sampling pass launches nothing else for them
(BENCHMARKS.md section 3k: 2.1-2.2x less attention time per block than the training forward at 256 px).

Only language features present in Triton 3.6 are used (plain pointer arithmetic, ``tl.dot`` with
an accumulator, ``tl.trans``, ``tl.exp2``, ``tl.where``, runtime ``if`` on a loaded scalar).
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

try:  # Triton is optional: without it this module registers nothing.
    import triton
    import triton.language as tl
    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _HAS_TRITON = False

PATTERNS = ("block_diagonal", "block_causal")
_LOG2E = 1.4426950408889634
_TAB_W = 8  # ints per work-list row: (kind, outer_start, outer_end, p0, p1, p2, p3, unused)
_KIND_DKDV = 0
_KIND_DQ = 1


# Triton decides at decoration time (i.e. when this module is imported) whether the kernels run
# in its CPU interpreter, so the module remembers that state rather than re-reading the variable.
_INTERPRETED = _HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpret() -> bool:
    return _INTERPRETED


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FwdConfig:
    block_m: int = 128   # query rows per program
    block_n: int = 64    # key rows per inner step
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class BwdConfig:
    block_m1: int = 32    # dK/dV pass: query rows per inner step
    block_n1: int = 128   # dK/dV pass: key rows per program
    block_m2: int = 128   # dQ pass: query rows per program
    block_n2: int = 32    # dQ pass: key rows per inner step
    num_warps: int = 4
    num_stages: int = 3
    dq_atomic: bool = False   # dQ added by the dK/dV programs into an fp32 buffer (atomics), no dQ tiles


_INTERP_FWD = FwdConfig(16, 16, 1, 1)
_INTERP_BWD = BwdConfig(16, 16, 16, 16, 1, 1)

# Defaults and candidates from a sweep on one H200 (Triton 3.6, bf16, D=64, N in 680/2240/9451):
# 4 warps won everywhere; 64-row forward tiles win at N=680, 128-row ones from N=2240; the
# backward likes 32-row query steps, 64-key tiles up to N~2240 and 128-key tiles at N=9451.
# A forward sweep over 36 tiles at the sampler's dense passes (benchmarks/sweep_attention_fwd.py, B=32, N 169-1024,
# H 16/30; BENCHMARKS.md section 3g) found 128x32 tiles best at N <= 256 (130 instead of 147 us at N=256 H=30), so
# they are candidates too; a second run put the same shapes 25 % apart, so at these sizes the choice is near noise.
_DEFAULT_FWD = {64: FwdConfig(128, 64, 4, 3), 128: FwdConfig(128, 64, 8, 3)}
_DEFAULT_BWD = {64: BwdConfig(32, 128, 128, 32, 4, 3), 128: BwdConfig(32, 64, 64, 32, 4, 2)}

_FWD_CANDIDATES = {
    64: [FwdConfig(128, 64, 4, 3), FwdConfig(128, 64, 8, 3), FwdConfig(64, 64, 4, 3),
         FwdConfig(64, 32, 4, 4), FwdConfig(128, 32, 4, 3), FwdConfig(128, 32, 8, 3)],
    128: [FwdConfig(128, 64, 8, 3), FwdConfig(128, 64, 4, 2), FwdConfig(64, 64, 4, 3),
          FwdConfig(64, 32, 4, 3), FwdConfig(128, 32, 4, 3)],
}
_BWD_CANDIDATES = {
    64: [BwdConfig(32, 128, 128, 32, 4, 3), BwdConfig(32, 64, 64, 32, 4, 3),
         BwdConfig(16, 64, 64, 16, 4, 3), BwdConfig(32, 64, 128, 32, 4, 3),
         BwdConfig(32, 128, 128, 32, 4, 4), BwdConfig(64, 64, 64, 64, 4, 3)],
    128: [BwdConfig(32, 64, 64, 32, 4, 2), BwdConfig(32, 64, 64, 32, 4, 3),
          BwdConfig(16, 64, 64, 16, 4, 2), BwdConfig(32, 128, 128, 32, 8, 2),
          BwdConfig(64, 64, 64, 64, 8, 2)],
}

# The inference kernel (dense, one block, no log-sum-exp): tiles no larger than the pass itself needs (a 1-token
# pass runs 16x16 tiles on one warp, not a 128-row tile on four), the same shapes as the forward's otherwise.
_DENSE_SHAPES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                 (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 2))


def dense_candidates(n: int, head_dim: int = 64) -> List[FwdConfig]:
    """The tile configurations the inference kernel tries for a pass of ``n`` tokens (the first is its default
    without autotuning): each shape of ``_DENSE_SHAPES`` clipped to ``n`` rounded up to a power of two (at least
    16, ``tl.dot``'s smallest), with one warp per 16 rows below 64 rows."""
    p = max(16, triton.next_power_of_2(n) if _HAS_TRITON else 16)
    out: List[FwdConfig] = []
    for bm, bn, w, st in _DENSE_SHAPES:
        bm, bn = min(bm, p), min(bn, p)
        if head_dim > 64 and bn > 64:
            continue
        cfg = FwdConfig(bm, bn, w if bm >= 64 else bm // 16, st)
        if cfg not in out:
            out.append(cfg)
    return out


_FORCE_FWD: Optional[FwdConfig] = None
_FORCE_BWD: Optional[BwdConfig] = None


@contextmanager
def use_config(fwd: Optional[FwdConfig] = None, bwd: Optional[BwdConfig] = None):
    """Force the tile configuration inside the ``with`` block (tests and benchmarks; not
    thread-safe). It is read when each launch happens, so a backward run after the block ends
    uses whatever is in force then."""
    global _FORCE_FWD, _FORCE_BWD
    old = (_FORCE_FWD, _FORCE_BWD)
    _FORCE_FWD, _FORCE_BWD = fwd, bwd
    try:
        yield
    finally:
        _FORCE_FWD, _FORCE_BWD = old


# --------------------------------------------------------------------------------------------
# Work lists (host side, cached)
# --------------------------------------------------------------------------------------------
def _bounds_lists(lengths: Tuple[int, ...], pattern: str):
    """Per position: row_lo, row_hi (keys seen by query i) and col_lo, col_hi (queries that see key j)."""
    n = sum(lengths)
    row_lo: List[int] = []
    row_hi: List[int] = []
    col_lo: List[int] = []
    col_hi: List[int] = []
    start = 0
    for ln in lengths:
        end = start + ln
        row_lo += [start if pattern == "block_diagonal" else 0] * ln
        row_hi += [end] * ln
        col_lo += [start] * ln
        col_hi += [end if pattern == "block_diagonal" else n] * ln
        start = end
    return row_lo, row_hi, col_lo, col_hi


def _packed_segments(lengths: Tuple[int, ...], block: int) -> List[Tuple[int, int]]:
    """Whole small blocks packed together; large blocks cut at their own boundary."""
    segs: List[Tuple[int, int]] = []
    start = 0
    cur_s, cur_e = None, None  # the pack being filled
    for ln in lengths:
        end = start + ln
        if ln == 0:
            continue
        if ln >= block:
            if cur_s is not None:
                segs.append((cur_s, cur_e))
                cur_s = None
            s = start
            while s < end:
                segs.append((s, min(s + block, end)))
                s += block
        elif cur_s is not None and end - cur_s <= block:
            cur_e = end
        else:
            if cur_s is not None:
                segs.append((cur_s, cur_e))
            cur_s, cur_e = start, end
        start = end
    if cur_s is not None:
        segs.append((cur_s, cur_e))
    return segs


def _contiguous_segments(n: int, block: int) -> List[Tuple[int, int]]:
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def _phases(p0: int, ulo: int, uhi: int, p3: int, step: int) -> Tuple[int, int, int, int]:
    """Cut ``[p0, p3)`` into masked ``[p0,p1)``, unmasked ``[p1,p2)`` (whole ``step`` tiles inside
    ``[ulo, uhi)``, on the grid ``p0 + k*step``) and masked ``[p2,p3)``."""
    p1 = p0 + -(-max(ulo - p0, 0) // step) * step
    if uhi - p1 >= step:
        p2 = p1 + (uhi - p1) // step * step
    else:
        p1 = p2 = p0
    return p0, p1, p2, p3


def _tiles_for(segs, lo, hi, outer_block: int, step: int, kind: int):
    rows = []
    for s, e in segs:
        p0 = min(lo[s:e])
        p3 = max(hi[s:e])
        ulo = max(lo[s:e])
        uhi = min(hi[s:e])
        rows.append((kind, s, e) + _phases(p0, ulo, uhi, p3, step))
    return rows


def _cost(rows, outer_block: int, step: int, weight: float = 1.0) -> float:
    c = 0.0
    for r in rows:
        _, _, _, p0, p1, p2, p3 = r
        masked = -(-(p1 - p0) // step) + -(-(p3 - p2) // step)
        unmasked = (p2 - p1) // step
        # a tile also pays a fixed prologue/epilogue (loads of the outer tile, the store)
        c += weight * outer_block * step * (unmasked + 1.15 * masked) + 2.0 * outer_block * 64
    return c


def _best_tiles(lengths, lo, hi, outer_block: int, step: int, kind: int):
    n = sum(lengths)
    best = None
    for segs in (_packed_segments(lengths, outer_block), _contiguous_segments(n, outer_block)):
        rows = _tiles_for(segs, lo, hi, outer_block, step, kind)
        c = _cost(rows, outer_block, step)
        if best is None or c < best[0]:
            best = (c, rows)
    return best[1]


def _row_cost(r, outer_block: int, step: int, weight: float) -> float:
    return _cost([r], outer_block, step, weight)


def build_fwd_worklist(lengths: Tuple[int, ...], pattern: str, block_m: int, block_n: int):
    """Forward / dQ-style work list: one row per query tile, heaviest first (host lists)."""
    row_lo, row_hi, _, _ = _bounds_lists(lengths, pattern)
    rows = _best_tiles(lengths, row_lo, row_hi, block_m, block_n, _KIND_DQ)
    rows.sort(key=lambda r: -_row_cost(r, block_m, block_n, 1.0))
    return [list(r) + [0] for r in rows]


def build_bwd_worklist(lengths: Tuple[int, ...], pattern: str, cfg: BwdConfig):
    """Backward work list: dK/dV tiles (key rows) and dQ tiles (query rows), heaviest first."""
    row_lo, row_hi, col_lo, col_hi = _bounds_lists(lengths, pattern)
    kv = _best_tiles(lengths, col_lo, col_hi, cfg.block_n1, cfg.block_m1, _KIND_DKDV)
    # dK/dV does four matrix products per visited tile (five with ``dq_atomic``, and then no dQ tiles), dQ three
    costed = [(_row_cost(r, cfg.block_n1, cfg.block_m1, 5.0 if cfg.dq_atomic else 4.0), r) for r in kv]
    if not cfg.dq_atomic:
        dq = _best_tiles(lengths, row_lo, row_hi, cfg.block_m2, cfg.block_n2, _KIND_DQ)
        costed += [(_row_cost(r, cfg.block_m2, cfg.block_n2, 3.0), r) for r in dq]
    costed.sort(key=lambda t: -t[0])
    return [list(r) + [0] for _, r in costed]


_CACHE: Dict[tuple, torch.Tensor] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key, make) -> torch.Tensor:
    t = _CACHE.get(key)
    if t is None:
        with _CACHE_LOCK:
            t = _CACHE.get(key)
            if t is None:
                if len(_CACHE) > 256:
                    _CACHE.clear()
                t = make()
                _CACHE[key] = t
    return t


def _bounds_tensor(lengths, pattern, device) -> torch.Tensor:
    def make():
        return torch.tensor(_bounds_lists(lengths, pattern), dtype=torch.int32).to(device).contiguous()
    return _cached(("bounds", lengths, pattern, device), make)


def _fwd_table(lengths, pattern, cfg: FwdConfig, device) -> torch.Tensor:
    def make():
        rows = build_fwd_worklist(lengths, pattern, cfg.block_m, cfg.block_n)
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, _TAB_W).to(device).contiguous()
    return _cached(("fwd", lengths, pattern, cfg.block_m, cfg.block_n, device), make)


def _bwd_table(lengths, pattern, cfg: BwdConfig, device) -> torch.Tensor:
    def make():
        rows = build_bwd_worklist(lengths, pattern, cfg)
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, _TAB_W).to(device).contiguous()
    return _cached(("bwd", lengths, pattern, cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2,
                    cfg.dq_atomic, device), make)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        # UPCAST is set only under TRITON_INTERPRET=1 with bf16 inputs: the CPU interpreter
        # multiplies bf16 operands as their raw 16-bit patterns, so it is given the (exactly
        # representable) fp32 values instead. On the GPU the operands stay fp16/bf16.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b)

    @triton.jit
    def _dot_acc(a, b, acc, UPCAST: tl.constexpr):
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc)

    @triton.jit
    def _inv_norm(n_base, offs, ok, MASKED: tl.constexpr):
        # 1 / max(||x||, eps) of rows ``offs`` from the stored row norms, as F.normalize divides
        if MASKED:
            n = tl.load(n_base + offs, mask=ok, other=1.0)
        else:
            n = tl.load(n_base + offs)
        return 1.0 / tl.maximum(n, 1e-12)

    @triton.jit
    def _normalize_grad(x, g, n, scale):
        # the gradient through ``F.normalize(x) * scale`` of the gradient ``g`` at its output, rows ``x`` with norms
        # ``n``: scale / max(n, eps) * (g - u <u, g>), u = x / max(n, eps) (no projection below eps, as
        # F.normalize's clamp); also returns <u, g> per row (the scale's gradient, summed over rows outside)
        inv = 1.0 / tl.maximum(n, 1e-12)
        u = x.to(tl.float32) * inv[:, None]
        c = tl.sum(u * g, 1)
        proj = tl.where(n >= 1e-12, c, 0.0)
        return (scale * inv)[:, None] * (g - u * proj[:, None]), c

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, s, v_ptrs, n_ok, MASKED: tl.constexpr, UPCAST: tl.constexpr):
        # the online-softmax update of a key tile's base-2 scores s, then acc += p @ v: (acc, l_i, m_i)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        return _dot_acc(p.to(v.dtype), v, acc, UPCAST), l_i, m_new

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, lo, hi, start, end, kmax, qk_scale, nk_base, fq,
                   BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                   QK_NORM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_D)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
            n_ok = offs_n < kmax
            if MASKED:
                k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
            s = _dot(q, tl.trans(k), UPCAST) * qk_scale
            if QK_NORM:  # scores of the L2-normalised q (times its head scale) and k: row and column factors
                s = s * (fq[:, None] * _inv_norm(nk_base, offs_n, n_ok, MASKED)[None, :])
            if MASKED:
                ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
                s = tl.where(ok, s, float("-inf"))
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v_ptrs, n_ok, MASKED, UPCAST)
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, TAB, BND, NRM, HS, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    H, N, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                    UPCAST: tl.constexpr, QK_NORM: tl.constexpr):
        bh = tl.program_id(0)
        t = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        row = TAB + t * 8
        os_ = tl.load(row + 1)
        oe_ = tl.load(row + 2)
        p0 = tl.load(row + 3)
        p1 = tl.load(row + 4)
        p2 = tl.load(row + 5)
        p3 = tl.load(row + 6)

        offs_m = os_ + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_D)
        m_ok = offs_m < oe_
        # each of q, k, v, o has its own strides (last dim contiguous): no layout copies around the call
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        lo = tl.load(BND + offs_m, mask=m_ok, other=0)
        hi = tl.load(BND + N + offs_m, mask=m_ok, other=0)

        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # finite start: a row that has seen only masked keys so far keeps alpha = 1, p = 0
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        # QK_NORM: q, k are raw; NRM holds their row norms ([2, B, H, N]) and HS the per-head scale of q
        nrm_row = NRM + bh.to(tl.int64) * N
        nk_base = nrm_row + tl.num_programs(0).to(tl.int64) * N
        if QK_NORM:
            fq = _inv_norm(nrm_row, offs_m, m_ok, True) * tl.load(HS + h)
        else:
            fq = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, lo, hi, p0, p1, p3,
                                   qk_scale, nk_base, fq, BLOCK_N, HEAD_D, True, UPCAST, QK_NORM)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, lo, hi, p1, p2, p3,
                                   qk_scale, nk_base, fq, BLOCK_N, HEAD_D, False, UPCAST, QK_NORM)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, lo, hi, p2, p3, p3,
                                   qk_scale, nk_base, fq, BLOCK_N, HEAD_D, True, UPCAST, QK_NORM)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_base = O + b * sob + h * soh
        tl.store(o_base + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None])
        tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_safe), mask=m_ok)

    @triton.jit
    def _row_block(H, N, BLOCK: tl.constexpr, HEAD_D: tl.constexpr):
        # a row kernel's program (grid: B * H, row blocks): (b * H + h, b, h, its rows, the head dims, rows < N)
        bh = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), offs_m, tl.arange(0, HEAD_D), offs_m < N

    @triton.jit
    def _rows_kernel(X, Y, OUT, sxb, sxh, sxn, syb, syh, syn, H, N, BLOCK: tl.constexpr, HEAD_D: tl.constexpr,
                     NORMS: tl.constexpr):
        # per row n of two strided [B, H, N, D] tensors, into fp32 OUT (contiguous [B, H, N] planes):
        #   NORMS=False: OUT[b, h, n] = <x, y> (the backward's delta = <o, dO>)
        #   NORMS=True:  OUT[0, b, h, n] = ||x||, OUT[1, b, h, n] = ||y|| (the row norms of q and k)
        bh, b, h, offs_m, offs_d, ok = _row_block(H, N, BLOCK, HEAD_D)
        x = tl.load(X + b * sxb + h * sxh + offs_m[:, None] * sxn + offs_d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        y = tl.load(Y + b * syb + h * syh + offs_m[:, None] * syn + offs_d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        row = bh.to(tl.int64) * N + offs_m
        if NORMS:
            tl.store(OUT + row, tl.sqrt(tl.sum(x * x, 1)), mask=ok)
            tl.store(OUT + tl.num_programs(0).to(tl.int64) * N + row, tl.sqrt(tl.sum(y * y, 1)), mask=ok)
        else:
            tl.store(OUT + row, tl.sum(x * y, 1), mask=ok)

    @triton.jit
    def _dense_step(acc, l_i, m_i, q, k_base, v_base, skn, svn, n0, N, qk_scale,
                    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                    QK_NORM: tl.constexpr):
        # one key tile [n0, n0 + BLOCK_N) of the inference kernel
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_D)
        n_ok = offs_n < N
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if QK_NORM:  # the L2-normalised key rows, rounded to the input dtype as F.normalize's output would be
            kf = k.to(tl.float32)
            k = (kf * (1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), 1e-12))[:, None]).to(k.dtype)
        s = _dot(q, tl.trans(k), UPCAST) * qk_scale
        if MASKED:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        return _softmax_pv(acc, l_i, m_i, s, v_ptrs, n_ok, MASKED, UPCAST)

    @triton.jit
    def _dense_kernel(Q, K, V, O, HS, QB, VB, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, H, N,
                      qk_scale, hs_max, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                      UPCAST: tl.constexpr, QK_NORM: tl.constexpr, HS_LOG: tl.constexpr, HAS_QB: tl.constexpr,
                      HAS_VB: tl.constexpr):
        # Inference: dense attention over all N rows of each (batch, head), no log-sum-exp, with QK_NORM the L2
        # normalisation of q (times HS[h]; with HS_LOG, HS holds the log-temperature: exp(min(HS[h], hs_max))) and
        # k done on the tiles in registers. HAS_QB / HAS_VB: the q and v biases ([H * D]) added here, so that the
        # projection before needs no bias (the sampler's passes; the v bias after the softmax: its rows sum to 1).
        # Grid (query tiles, B*H): the query tiles of one head run next to each other, so its keys and values are
        # read from L2 after the first.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_d = tl.arange(0, HEAD_D)
        m_ok = offs_m < N
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        if HAS_QB:
            qf = q.to(tl.float32) + tl.load(QB + h * HEAD_D + offs_d).to(tl.float32)[None, :]
        else:
            qf = q.to(tl.float32)
        if QK_NORM:
            hs = tl.load(HS + h).to(tl.float32)
            if HS_LOG:
                hs = tl.exp(tl.minimum(hs, hs_max))
            qf = qf * (hs / tl.maximum(tl.sqrt(tl.sum(qf * qf, 1)), 1e-12))[:, None]
        if HAS_QB or QK_NORM:
            q = qf.to(q.dtype)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        n_full = N // BLOCK_N * BLOCK_N
        for n0 in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _dense_step(acc, l_i, m_i, q, k_base, v_base, skn, svn, n0, N, qk_scale,
                                        BLOCK_N, HEAD_D, False, UPCAST, QK_NORM)
        if n_full < N:
            acc, l_i, m_i = _dense_step(acc, l_i, m_i, q, k_base, v_base, skn, svn, n_full, N, qk_scale,
                                        BLOCK_N, HEAD_D, True, UPCAST, QK_NORM)
        out = acc / l_i[:, None]   # every row saw key 0, so l_i >= 1
        if HAS_VB:
            out += tl.load(VB + h * HEAD_D + offs_d).to(tl.float32)[None, :]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None])

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, dl_base, sqn, sdn, clo, chi,
                    start, end, qmax, qk_scale, nq_base, hsc, rk, dqa_base, kh,
                    BLOCK_M1: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                    QK_NORM: tl.constexpr, DQ_ATOMIC: tl.constexpr):
        offs_d = tl.arange(0, HEAD_D)
        for m0 in range(start, end, BLOCK_M1):
            offs_m = m0 + tl.arange(0, BLOCK_M1)
            q_ptrs = q_base + offs_m[:, None] * sqn + offs_d[None, :]
            do_ptrs = do_base + offs_m[:, None] * sdn + offs_d[None, :]
            m_ok = offs_m < qmax
            if MASKED:
                q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
                lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
            else:
                q = tl.load(q_ptrs)
                lse = tl.load(lse_base + offs_m)
            s_t = _dot(k, tl.trans(q), UPCAST) * qk_scale          # [BLOCK_N1, BLOCK_M1]
            if QK_NORM:
                fq = _inv_norm(nq_base, offs_m, m_ok, MASKED) * hsc
                s_t = s_t * (rk[:, None] * fq[None, :])
            p_t = tl.exp2(s_t - lse[None, :])
            if MASKED:
                ok = (offs_m[None, :] >= clo[:, None]) & (offs_m[None, :] < chi[:, None])
                p_t = tl.where(ok, p_t, 0.0)
                do = tl.load(do_ptrs, mask=m_ok[:, None], other=0.0)
                dl = tl.load(dl_base + offs_m, mask=m_ok, other=0.0)
            else:
                do = tl.load(do_ptrs)
                dl = tl.load(dl_base + offs_m)
            dv = _dot_acc(p_t.to(do.dtype), do, dv, UPCAST)
            dp_t = _dot(v, tl.trans(do), UPCAST)
            ds_t = (p_t * (dp_t - dl[None, :])).to(k.dtype)
            if DQ_ATOMIC:  # this key tile's share of dq_hat = dS k_hat (kh: the normalised k tile), added in fp32
                dqa_ptrs = dqa_base + offs_m[:, None] * HEAD_D + offs_d[None, :]
                if MASKED:
                    tl.atomic_add(dqa_ptrs, _dot(tl.trans(ds_t), kh, UPCAST), mask=m_ok[:, None], sem="relaxed")
                else:
                    tl.atomic_add(dqa_ptrs, _dot(tl.trans(ds_t), kh, UPCAST), sem="relaxed")
            if QK_NORM:  # dk_hat = dS^T q_hat, q_hat the normalised q tile (bounded: no overflow for tiny rows)
                q = (q.to(tl.float32) * fq[:, None]).to(k.dtype)
            dk = _dot_acc(ds_t, q, dk, UPCAST)
        return dk, dv

    @triton.jit
    def _dq_inner(dq, q, do, lse, dl, k_base, v_base, skn, svn, lo, hi, start, end, kmax, qk_scale, nk_base, fq,
                  BLOCK_N2: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                  QK_NORM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_D)
        for n0 in range(start, end, BLOCK_N2):
            offs_n = n0 + tl.arange(0, BLOCK_N2)
            k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
            n_ok = offs_n < kmax
            if MASKED:
                k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = _dot(q, tl.trans(k), UPCAST) * qk_scale             # [BLOCK_M2, BLOCK_N2]
            if QK_NORM:
                rk = _inv_norm(nk_base, offs_n, n_ok, MASKED)
                s = s * (fq[:, None] * rk[None, :])
            p = tl.exp2(s - lse[:, None])
            if MASKED:
                ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
                p = tl.where(ok, p, 0.0)
            dp = _dot(do, tl.trans(v), UPCAST)
            ds = p * (dp - dl[:, None])
            if QK_NORM:  # dq_hat = dS k_hat, k_hat the normalised k tile
                k = (k.to(tl.float32) * rk[:, None]).to(v.dtype)
            dq = _dot_acc(ds.to(k.dtype), k, dq, UPCAST)
        return dq

    @triton.jit
    def _bwd_kernel(Q, K, V, DO, G, LSE, DELTA, TAB, BND, NRM, HS, DHS, DQA, sqb, sqh, sqn, skb, skh, skn, svb, svh,
                    svn, sdb, sdh, sdn, sgp, sgb, sgh, sgn, H, N, qk_scale,
                    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, HEAD_D: tl.constexpr,
                    UPCAST: tl.constexpr, QK_NORM: tl.constexpr, DQ_ATOMIC: tl.constexpr):
        bh = tl.program_id(0)
        t = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        row = TAB + t * 8
        kind = tl.load(row)
        os_ = tl.load(row + 1)
        oe_ = tl.load(row + 2)
        p0 = tl.load(row + 3)
        p1 = tl.load(row + 4)
        p2 = tl.load(row + 5)
        p3 = tl.load(row + 6)

        offs_d = tl.arange(0, HEAD_D)
        sm_scale = qk_scale * 0.6931471805599453  # undo the log2(e) folded into qk_scale
        # q, k, v and dO each have their own strides (last dim contiguous)
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        row0 = bh.to(tl.int64) * N
        do_base = DO + b * sdb + h * sdh
        lse_base = LSE + row0
        dl_base = DELTA + row0
        # G is a strided [3, B, H, N, D] view (dq, dk, dv; last dim contiguous): a buffer of its own, or the
        # gradient of the packed [B, N, 3, H, D] projection itself
        DQ = G + b * sgb + h * sgh
        DK = DQ + sgp
        DV = DK + sgp
        # QK_NORM: row norms of q and k ([2, B, H, N]), q's head scale; DHS gets <u, dq_hat> per query row
        nq_base = NRM + row0
        nk_base = nq_base + tl.num_programs(0).to(tl.int64) * N
        if QK_NORM:
            hsc = tl.load(HS + h)
        else:
            hsc = 0.0

        if kind == 0:
            # ---- dK, dV for key rows [os_, oe_), over the query rows that see them ----
            offs_n = os_ + tl.arange(0, BLOCK_N1)
            n_ok = offs_n < oe_
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            clo = tl.load(BND + 2 * N + offs_n, mask=n_ok, other=0)
            chi = tl.load(BND + 3 * N + offs_n, mask=n_ok, other=0)
            dk = tl.zeros([BLOCK_N1, HEAD_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N1, HEAD_D], dtype=tl.float32)
            if QK_NORM:
                rk = _inv_norm(nk_base, offs_n, n_ok, True)
            else:
                rk = tl.zeros([BLOCK_N1], dtype=tl.float32)
            # DQ_ATOMIC: dq_hat += dS k_hat into DQA (fp32 [B, H, N, D], zeroed), finished by _dq_finish_kernel
            dqa_base = DQA + row0 * HEAD_D
            if DQ_ATOMIC and QK_NORM:
                kh = (k.to(tl.float32) * rk[:, None]).to(k.dtype)
            else:
                kh = k
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, dl_base, sqn, sdn, clo, chi,
                                 p0, p1, p3, qk_scale, nq_base, hsc, rk, dqa_base, kh, BLOCK_M1, HEAD_D, True, UPCAST,
                                 QK_NORM, DQ_ATOMIC)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, dl_base, sqn, sdn, clo, chi,
                                 p1, p2, p3, qk_scale, nq_base, hsc, rk, dqa_base, kh, BLOCK_M1, HEAD_D, False, UPCAST,
                                 QK_NORM, DQ_ATOMIC)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, dl_base, sqn, sdn, clo, chi,
                                 p2, p3, p3, qk_scale, nq_base, hsc, rk, dqa_base, kh, BLOCK_M1, HEAD_D, True, UPCAST,
                                 QK_NORM, DQ_ATOMIC)
            g_ptrs = offs_n[:, None] * sgn + offs_d[None, :]
            tl.store(DV + g_ptrs, dv.to(G.dtype.element_ty), mask=n_ok[:, None])
            dk = dk * sm_scale
            if QK_NORM:  # through k's normalisation: dk_hat -> dk_raw
                nk = tl.load(nk_base + offs_n, mask=n_ok, other=1.0)
                dk, _ = _normalize_grad(k, dk, nk, 1.0)
            tl.store(DK + g_ptrs, dk.to(G.dtype.element_ty), mask=n_ok[:, None])
        else:
            # ---- dQ for query rows [os_, oe_), over the key rows they see ----
            offs_m = os_ + tl.arange(0, BLOCK_M2)
            m_ok = offs_m < oe_
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
            dl = tl.load(dl_base + offs_m, mask=m_ok, other=0.0)
            lo = tl.load(BND + offs_m, mask=m_ok, other=0)
            hi = tl.load(BND + N + offs_m, mask=m_ok, other=0)
            dq = tl.zeros([BLOCK_M2, HEAD_D], dtype=tl.float32)
            if QK_NORM:
                nq = tl.load(nq_base + offs_m, mask=m_ok, other=1.0)
                fq = hsc / tl.maximum(nq, 1e-12)
            else:
                fq = tl.zeros([BLOCK_M2], dtype=tl.float32)
            dq = _dq_inner(dq, q, do, lse, dl, k_base, v_base, skn, svn, lo, hi, p0, p1, p3, qk_scale,
                           nk_base, fq, BLOCK_N2, HEAD_D, True, UPCAST, QK_NORM)
            dq = _dq_inner(dq, q, do, lse, dl, k_base, v_base, skn, svn, lo, hi, p1, p2, p3, qk_scale,
                           nk_base, fq, BLOCK_N2, HEAD_D, False, UPCAST, QK_NORM)
            dq = _dq_inner(dq, q, do, lse, dl, k_base, v_base, skn, svn, lo, hi, p2, p3, p3, qk_scale,
                           nk_base, fq, BLOCK_N2, HEAD_D, True, UPCAST, QK_NORM)
            dq = dq * sm_scale
            if QK_NORM:  # through q's normalisation and head scale: dq_hat -> dq_raw, and <u, dq_hat> per row
                dq, c = _normalize_grad(q, dq, nq, hsc)
                tl.store(DHS + row0 + offs_m, c, mask=m_ok)
            tl.store(DQ + offs_m[:, None] * sgn + offs_d[None, :], dq.to(G.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _dq_finish_kernel(DQA, Q, G, NRM, HS, DHS, sqb, sqh, sqn, sgb, sgh, sgn, H, N, sm_scale,
                          BLOCK: tl.constexpr, HEAD_D: tl.constexpr, QK_NORM: tl.constexpr):
        # the dq rows of a DQ_ATOMIC backward: DQA's fp32 sums times the softmax scale, with QK_NORM mapped through
        # q's normalisation and head scale (and <u, dq_hat> per row into DHS), stored into G's dq slot
        bh, b, h, offs_m, offs_d, ok = _row_block(H, N, BLOCK, HEAD_D)
        row = bh.to(tl.int64) * N + offs_m
        dq = tl.load(DQA + row[:, None] * HEAD_D + offs_d[None, :], mask=ok[:, None], other=0.0) * sm_scale
        if QK_NORM:
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=ok[:, None], other=0.0)
            nq = tl.load(NRM + row, mask=ok, other=1.0)
            dq, c = _normalize_grad(q, dq, nq, tl.load(HS + h))
            tl.store(DHS + row, c, mask=ok)
        tl.store(G + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :], dq.to(G.dtype.element_ty),
                 mask=ok[:, None])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _upcast(q: torch.Tensor) -> bool:
    return _INTERPRETED and q.dtype == torch.bfloat16


def _strides(*ts):
    """The (batch, head, position) strides of each [B, H, N, D] tensor, one flat tuple."""
    return tuple(st for t in ts for st in t.stride()[:3])


def _new_out(q):
    """An empty [B, H, N, D] output stored as [B, N, H, D]: ``out.transpose(1, 2).reshape(B, N, H * D)``,
    which every attention layer does next, is then a view instead of a copy."""
    B, H, N, D = q.shape
    return torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def _launch_fwd(q, k, v, o, lse, tab, bnd, scale, cfg: FwdConfig, nrm=None, hs=None):
    """q, k, v, o strided [B, H, N, D] (last dim contiguous); lse contiguous [B, H, N]. With ``nrm`` (the row norms
    of q and k, :func:`_launch_rownorm`) and ``hs`` (q's per-head scale, fp32 [H]): attention of the L2-normalised
    q (times ``hs``) and k."""
    B, H, N, D = q.shape
    _fwd_kernel[(B * H, tab.shape[0])](
        q, k, v, o, lse, tab, bnd, lse if nrm is None else nrm, lse if hs is None else hs,
        *_strides(q, k, v, o), H, N, scale * _LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=D, UPCAST=_upcast(q), QK_NORM=nrm is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_dense(q, k, v, o, hs, scale, cfg: FwdConfig, qb=None, vb=None, hs_log_max=None):
    """The inference kernel: dense attention of strided [B, H, N, D] q, k, v into o; with ``hs`` ([H]) of the
    L2-normalised q (times ``hs``, or with ``hs_log_max`` times ``exp(min(hs, hs_log_max))``) and k; ``qb`` /
    ``vb`` ([H * D]): biases added to q and v."""
    B, H, N, D = q.shape
    step = max(1, GRID_Y_MAX // H)   # (batch, head) pairs go on the grid's second axis, which CUDA caps
    for b0 in range(0, B, step):
        qs, ks, vs, os_ = (t[b0:b0 + step] for t in (q, k, v, o))
        _dense_kernel[(triton.cdiv(N, cfg.block_m), qs.shape[0] * H)](
            qs, ks, vs, os_, os_ if hs is None else hs, os_ if qb is None else qb, os_ if vb is None else vb,
            *_strides(qs, ks, vs, os_), H, N, scale * _LOG2E, 0.0 if hs_log_max is None else float(hs_log_max),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=D, UPCAST=_upcast(q), QK_NORM=hs is not None,
            HS_LOG=hs_log_max is not None, HAS_QB=qb is not None, HAS_VB=vb is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


GRID_Y_MAX = 65535
"""CUDA's limit on a grid's second axis: the inference kernel launches once per slice of the batch whose
``batch * heads`` fits (e.g. more than 1,092 guided images at 30 heads need two launches)."""


def _launch_rows(x, y, out, norms: bool):
    """:func:`_rows_kernel` over strided [B, H, N, D] ``x``, ``y`` into fp32 ``out``."""
    B, H, N, D = x.shape
    block = 16 if _INTERPRETED else 64
    if out.numel():
        _rows_kernel[(B * H, triton.cdiv(N, block))](x, y, out, *_strides(x, y), H, N, BLOCK=block, HEAD_D=D,
                                                      NORMS=norms, num_warps=1 if _INTERPRETED else 4)


def _launch_rownorm(q, k):
    """The L2 norms of the rows of q and k (strided [B, H, N, D]): one fp32 [2, B, H, N] tensor."""
    nrm = torch.empty((2,) + tuple(q.shape[:3]), dtype=torch.float32, device=q.device)
    _launch_rows(q, k, nrm, True)
    return nrm


def _launch_delta(o, do, delta):
    """o, do strided [B, H, N, D] (last dim contiguous); delta contiguous [B, H, N] fp32."""
    _launch_rows(o, do, delta, False)


def _launch_bwd(q, k, v, do, g, lse, delta, tab, bnd, scale, cfg: BwdConfig, nrm=None, hs=None, dhs=None):
    """q, k, v, do strided (last dim contiguous); g the strided [3, B, H, N, D] dq/dk/dv view (last dim contiguous:
    a buffer of its own, or the packed projection's gradient, :func:`_packed_bwd_impl`). With ``nrm``/``hs`` (as
    :func:`_launch_fwd`): g gets the gradients of the raw q and k, and ``dhs`` (fp32 [B, H, N]) the per-row terms
    of the head scale's gradient."""
    B, H, N, D = q.shape
    dqa = torch.zeros((B, H, N, D), dtype=torch.float32, device=q.device) if cfg.dq_atomic else None
    _bwd_kernel[(B * H, tab.shape[0])](
        q, k, v, do, g, lse, delta, tab, bnd, lse if nrm is None else nrm, lse if hs is None else hs,
        lse if dhs is None else dhs, lse if dqa is None else dqa, *_strides(q, k, v, do), *g.stride()[:4], H, N,
        scale * _LOG2E, BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
        HEAD_D=D, UPCAST=_upcast(q), QK_NORM=nrm is not None, DQ_ATOMIC=cfg.dq_atomic, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if dqa is not None:   # g[0] is dq
        _dq_finish_kernel[(B * H, triton.cdiv(N, 64))](
            dqa, q, g[0], lse if nrm is None else nrm, lse if hs is None else hs, lse if dhs is None else dhs,
            *q.stride()[:3], *g.stride()[1:4], H, N, scale, BLOCK=64, HEAD_D=D, QK_NORM=nrm is not None,
            num_warps=1 if _INTERPRETED else 4)


# --------------------------------------------------------------------------------------------
# Plans: configuration + work list per (lengths, pattern, D, dtype, B*H, device), tuned on CUDA
# --------------------------------------------------------------------------------------------
# key -> (FwdConfig, work-list tensor, bounds tensor) and key -> (BwdConfig, work-list tensor)
_FWD_PLANS: Dict[tuple, tuple] = {}
_BWD_PLANS: Dict[tuple, tuple] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("HMAR_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def _time_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _pick(candidates, run):
    best, best_t = None, math.inf
    for cfg in candidates:
        try:
            t = _time_ms(lambda: run(cfg))
        except Exception:  # e.g. out of shared memory for this tile shape on this GPU
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best


def _tune_key(q, lengths, pattern):
    B, H, N, D = q.shape
    return (lengths, pattern, D, q.dtype, B * H, q.device)


def _fwd_plan(q, k, v, lengths, pattern, scale):
    key = _tune_key(q, lengths, pattern)
    plan = None if _FORCE_FWD is not None else _FWD_PLANS.get(key)
    if plan is not None:
        return plan
    dev, D = q.device, q.shape[-1]
    bnd = _bounds_tensor(lengths, pattern, dev)
    if _FORCE_FWD is not None:
        cfg = _FORCE_FWD
    elif _INTERPRETED or not q.is_cuda:
        cfg = _INTERP_FWD
    elif not _autotune_enabled():
        cfg = _DEFAULT_FWD[D]
    else:
        o = _new_out(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
        cfg = _pick(_FWD_CANDIDATES[D], lambda c: _launch_fwd(
            q, k, v, o, lse, _fwd_table(lengths, pattern, c, dev), bnd, scale, c)) or _DEFAULT_FWD[D]
    plan = (cfg, _fwd_table(lengths, pattern, cfg, dev), bnd)
    if _FORCE_FWD is None:
        _FWD_PLANS[key] = plan
    return plan


DQ_ATOMIC_MODES = ("off", "on", "tune")
# How the backward computes dq (env HMAR_TRITON_DQ_ATOMIC): "off", dQ tiles of its own that recompute the scores
# and probabilities (deterministic, no atomics; the default); "on", the dK/dV programs add their share of dq into an
# fp32 buffer with atomics (per score one matrix product instead of the dQ tiles' three and their exp: the
# backward's work drops from 14 to 10 n m D FLOPs; not deterministic: the sums' order varies); "tune", the autotuner
# times both forms of each candidate on CUDA. torch.use_deterministic_algorithms(True) always gets "off".
DQ_ATOMIC = os.environ.get("HMAR_TRITON_DQ_ATOMIC", "off").lower()


def _dq_atomic_mode() -> str:
    if DQ_ATOMIC not in DQ_ATOMIC_MODES:
        raise ValueError(f"HMAR_TRITON_DQ_ATOMIC / triton_kernel.DQ_ATOMIC: {DQ_ATOMIC!r} is not one of "
                         f"{', '.join(DQ_ATOMIC_MODES)}")
    return "off" if torch.are_deterministic_algorithms_enabled() else DQ_ATOMIC


def _bwd_candidates(D: int, mode: str) -> List[BwdConfig]:
    atomic = [replace(c, dq_atomic=True) for c in _BWD_CANDIDATES[D]]
    return {"off": _BWD_CANDIDATES[D], "on": atomic, "tune": _BWD_CANDIDATES[D] + atomic}[mode]


def _bwd_key(q, lengths, pattern):
    return _tune_key(q, lengths, pattern) + (_dq_atomic_mode(),)


def _bwd_plan(q, k, v, do, lse, delta, lengths, pattern, scale):
    key = _bwd_key(q, lengths, pattern)
    plan = None if _FORCE_BWD is not None else _BWD_PLANS.get(key)
    if plan is not None:
        return plan
    dev, D, atomic = q.device, q.shape[-1], key[-1] == "on"
    if _FORCE_BWD is not None:
        cfg = _FORCE_BWD
    elif _INTERPRETED or not q.is_cuda:
        cfg = replace(_INTERP_BWD, dq_atomic=atomic)
    elif not _autotune_enabled():
        cfg = replace(_DEFAULT_BWD[D], dq_atomic=atomic)
    else:
        g = torch.empty((3,) + tuple(q.shape), dtype=q.dtype, device=dev)
        bnd = _bounds_tensor(lengths, pattern, dev)
        cfg = _pick(_bwd_candidates(D, key[-1]), lambda c: _launch_bwd(
            q, k, v, do, g, lse, delta, _bwd_table(lengths, pattern, c, dev), bnd, scale, c)
        ) or replace(_DEFAULT_BWD[D], dq_atomic=atomic)
    plan = (cfg, _bwd_table(lengths, pattern, cfg, dev))
    if _FORCE_BWD is None:
        _BWD_PLANS[key] = plan
    return plan


_DENSE_PLANS: Dict[tuple, FwdConfig] = {}


def _dense_plan(q, k, v, hs, scale) -> FwdConfig:
    B, H, N, D = q.shape
    if _FORCE_FWD is not None:
        return _FORCE_FWD
    if _INTERPRETED or not q.is_cuda:
        return _INTERP_FWD
    key = (N, D, q.dtype, B * H, hs is not None, q.device)
    cfg = _DENSE_PLANS.get(key)
    if cfg is None:
        cands = dense_candidates(N, D)
        if _autotune_enabled():
            o = _new_out(q)
            cfg = _pick(cands, lambda c: _launch_dense(q, k, v, o, hs, scale, c))
        cfg = _DENSE_PLANS[key] = cfg or cands[0]
    return cfg


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _check(q, k, v, lengths, pattern):
    if pattern not in PATTERNS:
        raise ValueError(f"triton attention: pattern {pattern!r} is not supported (use one of {PATTERNS})")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"triton attention: q, k, v must share one [B, H, N, D] shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"triton attention: fp16/bf16 q, k, v of one dtype required, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"triton attention: head dim must be 64 or 128, got {q.shape[-1]}")
    if q.device != k.device or q.device != v.device:
        raise ValueError("triton attention: q, k, v must be on one device")
    if not (q.is_cuda or (_INTERPRETED and q.device.type == "cpu")):
        # without this, Triton fails later with an unrelated message ("0 active drivers" / "cpu tensor?")
        raise ValueError(f"triton attention: CUDA tensors required (CPU tensors only under TRITON_INTERPRET=1), "
                         f"got {q.device}")
    if any(n < 0 for n in lengths):   # (not min(lengths, default=0): dynamo breaks the compiled graph there)
        # a negative length can still sum to N; its work list reads past the rows of a head (silently wrong or NaN)
        raise ValueError(f"triton attention: scale lengths must be non-negative, got {lengths}")


def _dense_rows(*ts):
    """The tensors with a contiguous last dim, which is all the kernels need (each is copied only if not)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _fwd_impl(q, k, v, hs, lengths, pattern, scale):
    """The forward launches: ``(o, lse, nrm)``, ``nrm`` the row norms of q and k when ``hs`` (q's per-head scale,
    fp32 ``[H]``) asks for the L2-normalised attention, else an empty tensor."""
    q, k, v = _dense_rows(q, k, v)
    cfg, tab, bnd = _fwd_plan(q, k, v, lengths, pattern, scale)
    B, H, N, D = q.shape
    o = _new_out(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    nrm = lse.new_empty(0) if hs is None else _launch_rownorm(q, k)
    if o.numel():
        _launch_fwd(q, k, v, o, lse, tab, bnd, scale, cfg, None if hs is None else nrm, hs)
    return o, lse, nrm


def _bwd_impl(q, k, v, o, lse, nrm, hs, do, lengths, pattern, scale, g=None):
    """The backward launches: ``(g, dhs)``, g the ``[3, B, H, N, D]`` dq/dk/dv gradients (written into ``g`` when
    given: any strided view with a contiguous last dim; else a contiguous buffer) and dhs the gradient of ``hs``
    (fp32 ``[H]``; an empty tensor without ``hs``)."""
    q, k, v, o, do = _dense_rows(q, k, v, o, do.to(q.dtype))
    lse = lse.contiguous()
    if g is None:
        g = torch.empty((3,) + tuple(q.shape), dtype=q.dtype, device=q.device)
    rows = lse.new_zeros(lse.shape if hs is not None else 0)   # <u, dq_hat> per query row, summed below
    if g.numel():
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
        _launch_delta(o, do, delta)
        cfg, tab = _bwd_plan(q, k, v, do, lse, delta, lengths, pattern, scale)
        _launch_bwd(q, k, v, do, g, lse, delta, tab, _bounds_tensor(lengths, pattern, q.device), scale, cfg,
                    None if hs is None else nrm, hs, None if hs is None else rows)
    return g, (rows if hs is None else rows.sum((0, 2)))


def _dense_impl(q, k, v, hs, scale, qb=None, vb=None, hs_log_max=None):
    """The inference kernel's launch (no autograd): the attention of one dense block, as ``[B, H, N, D]``."""
    q, k, v = _dense_rows(q, k, v)
    o = _new_out(q)
    if o.numel():
        _launch_dense(q, k, v, o, hs, scale, _dense_plan(q, k, v, hs, scale), qb, vb, hs_log_max)
    return o


DENSE_INFERENCE = True
"""Calls that need no gradient over one block (every sampling pass) run the inference kernel
(:func:`_dense_impl`: no log-sum-exp, no work list, the q/k normalisation on the tiles). Off: they run the
training forward (a benchmark switch)."""


def _inference_call(q, k, v, hs, lengths) -> bool:
    if not DENSE_INFERENCE or len(lengths) != 1:
        return False
    if not torch.is_grad_enabled():
        return True
    return not (q.requires_grad or k.requires_grad or v.requires_grad or (hs is not None and hs.requires_grad))


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, hs, lengths, pattern, scale):
        o, lse, nrm = _fwd_impl(q, k, v, hs, lengths, pattern, scale)
        ctx.save_for_backward(q, k, v, o, lse, nrm, hs)
        ctx.lengths, ctx.pattern, ctx.scale = lengths, pattern, scale
        return o

    @staticmethod
    @once_differentiable  # the kernels have no derivative: a double backward raises instead of dropping terms
    def backward(ctx, do):
        q, k, v, o, lse, nrm, hs = ctx.saved_tensors
        g, dhs = _bwd_impl(q, k, v, o, lse, nrm, hs, do, ctx.lengths, ctx.pattern, ctx.scale)
        return g[0], g[1], g[2], None if hs is None else dhs, None, None, None


def _unpack(qkv):
    """q, k, v: the ``[B, H, N, D]`` views of a packed ``[B, N, 3, H, D]`` projection."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _packed_fwd_impl(qkv, hs, lengths, pattern, scale):
    return _fwd_impl(*_unpack(qkv), hs, lengths, pattern, scale)


def _packed_bwd_impl(qkv, o, lse, nrm, hs, do, lengths, pattern, scale):
    """``(dqkv, dhs)``: the kernel writes dq, dk and dv straight into the ``[B, N, 3, H, D]`` gradient of the packed
    projection, the layout its weight-gradient GEMM reads (no stacking of three gradients, no copy)."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _, dhs = _bwd_impl(*_unpack(qkv), o, lse, nrm, hs, do, lengths, pattern, scale, g=dqkv.permute(2, 0, 3, 1, 4))
    return dqkv, dhs


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, hs, lengths, pattern, scale):
        o, lse, nrm = _packed_fwd_impl(qkv, hs, lengths, pattern, scale)
        ctx.save_for_backward(qkv, o, lse, nrm, hs)
        ctx.lengths, ctx.pattern, ctx.scale = lengths, pattern, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        qkv, o, lse, nrm, hs = ctx.saved_tensors
        dqkv, dhs = _packed_bwd_impl(qkv, o, lse, nrm, hs, do, ctx.lengths, ctx.pattern, ctx.scale)
        return dqkv, None if hs is None else dhs, None, None, None


# --------------------------------------------------------------------------------------------
# torch.compile: the same launches behind two opaque custom ops
# --------------------------------------------------------------------------------------------
# Dynamo cannot trace the autograd.Function above (the plan cache, the autotuner and the work-list tensors are
# host-side Python), so inside torch.compile the attention goes through ``hmar::block_sparse_attn_fwd`` /
# ``hmar::block_sparse_attn_bwd``: custom ops with fake (shape-only) implementations and a registered autograd
# formula. The compiler sees two opaque calls per attention layer and compiles everything around them; at run
# time they run the same plans and kernels as the eager path (autotuning included). Eager calls keep using the
# autograd.Function (no custom-op dispatch overhead on the host-bound small sizes).
def _register_ops() -> None:
    from torch.library import custom_op, register_autograd

    if hasattr(torch.ops.hmar, "block_sparse_attn_fwd"):
        return  # module re-imported (tests reload it under the interpreter): the ops call module globals

    @custom_op("hmar::block_sparse_attn_fwd", mutates_args=())
    def _op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hs: Optional[torch.Tensor], lengths: List[int],
                pattern: str, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fwd_impl(q, k, v, hs, tuple(lengths), pattern, scale)

    @_op_fwd.register_fake
    def _fwd_fake(q, k, v, hs, lengths, pattern, scale):
        nrm = q.new_empty((2,) + tuple(q.shape[:3]) if hs is not None else (0,), dtype=torch.float32)
        return _new_out(q), q.new_empty(q.shape[:3], dtype=torch.float32), nrm

    @custom_op("hmar::block_sparse_attn_bwd", mutates_args=())
    def _op_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                nrm: torch.Tensor, hs: Optional[torch.Tensor], do: torch.Tensor, lengths: List[int], pattern: str,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _bwd_impl(q, k, v, o, lse, nrm, hs, do, tuple(lengths), pattern, scale)

    @_op_bwd.register_fake
    def _(q, k, v, o, lse, nrm, hs, do, lengths, pattern, scale):
        return q.new_empty((3,) + tuple(q.shape)), q.new_empty(q.shape[1] if hs is not None else 0,
                                                              dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        q, k, v, hs, lengths, pattern, scale = inputs
        o, lse, nrm = output
        ctx.save_for_backward(q, k, v, o, lse, nrm, hs)
        ctx.lengths, ctx.pattern, ctx.scale = list(lengths), pattern, scale

    def backward(ctx, do, dlse, dnrm):
        q, k, v, o, lse, nrm, hs = ctx.saved_tensors
        g, dhs = torch.ops.hmar.block_sparse_attn_bwd(q, k, v, o, lse, nrm, hs, do, ctx.lengths, ctx.pattern,
                                                      ctx.scale)
        return g[0], g[1], g[2], None if hs is None else dhs, None, None, None

    register_autograd("hmar::block_sparse_attn_fwd", backward, setup_context=setup_context)

    # the packed form (packed_triton_attention): one [B, N, 3, H, D] input, its gradient in that layout
    @custom_op("hmar::packed_attn_fwd", mutates_args=())
    def _op_packed_fwd(qkv: torch.Tensor, hs: Optional[torch.Tensor], lengths: List[int], pattern: str,
                       scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _packed_fwd_impl(qkv, hs, tuple(lengths), pattern, scale)

    @_op_packed_fwd.register_fake
    def _(qkv, hs, lengths, pattern, scale):
        return _fwd_fake(*_unpack(qkv), hs, lengths, pattern, scale)

    @custom_op("hmar::packed_attn_bwd", mutates_args=())
    def _op_packed_bwd(qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, nrm: torch.Tensor,
                       hs: Optional[torch.Tensor], do: torch.Tensor, lengths: List[int], pattern: str,
                       scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _packed_bwd_impl(qkv, o, lse, nrm, hs, do, tuple(lengths), pattern, scale)

    @_op_packed_bwd.register_fake
    def _(qkv, o, lse, nrm, hs, do, lengths, pattern, scale):
        return (torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device),
                qkv.new_empty(qkv.shape[3] if hs is not None else 0, dtype=torch.float32))

    def setup_packed(ctx, inputs, output):
        qkv, hs, lengths, pattern, scale = inputs
        o, lse, nrm = output
        ctx.save_for_backward(qkv, o, lse, nrm, hs)
        ctx.lengths, ctx.pattern, ctx.scale = list(lengths), pattern, scale

    def backward_packed(ctx, do, dlse, dnrm):
        qkv, o, lse, nrm, hs = ctx.saved_tensors
        dqkv, dhs = torch.ops.hmar.packed_attn_bwd(qkv, o, lse, nrm, hs, do, ctx.lengths, ctx.pattern, ctx.scale)
        return dqkv, None if hs is None else dhs, None, None, None

    register_autograd("hmar::packed_attn_fwd", backward_packed, setup_context=setup_packed)

    @custom_op("hmar::dense_attn_infer", mutates_args=())
    def _op_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hs: Optional[torch.Tensor], scale: float,
                  qb: Optional[torch.Tensor] = None, vb: Optional[torch.Tensor] = None,
                  hs_log_max: Optional[float] = None) -> torch.Tensor:
        return _dense_impl(q, k, v, hs, scale, qb, vb, hs_log_max)

    @_op_dense.register_fake
    def _(q, k, v, hs, scale, qb=None, vb=None, hs_log_max=None):
        return _new_out(q)


def _apply(q, k, v, hs, lengths, pattern, scale):
    if _inference_call(q, k, v, hs, lengths):   # one block, no gradient (the sampler's passes)
        if torch.compiler.is_compiling():
            return torch.ops.hmar.dense_attn_infer(q, k, v, hs, scale)
        return _dense_impl(q, k, v, hs, scale)
    if torch.compiler.is_compiling():
        return torch.ops.hmar.block_sparse_attn_fwd(q, k, v, hs, list(lengths), pattern, scale)[0]
    return _BlockSparseAttention.apply(q, k, v, hs, lengths, pattern, scale)


def _apply_packed(qkv, hs, lengths, pattern, scale):
    if not (torch.is_grad_enabled() and (qkv.requires_grad or (hs is not None and hs.requires_grad))):
        return _apply(*_unpack(qkv), hs, lengths, pattern, scale)   # no gradient to pack (the inference routes)
    if torch.compiler.is_compiling():
        return torch.ops.hmar.packed_attn_fwd(qkv, hs, list(lengths), pattern, scale)[0]
    return _PackedAttention.apply(qkv, hs, lengths, pattern, scale)


def _head_scale(qk_norm, q):
    """``qk_norm`` (one value per head, any shape with H elements, e.g. the model's ``[1, H, 1, 1]``) as fp32 [H]."""
    if qk_norm.numel() != q.shape[1]:
        raise ValueError(f"triton attention: qk_norm needs one scale per head ({q.shape[1]}), got shape "
                         f"{tuple(qk_norm.shape)}")
    return qk_norm.reshape(q.shape[1]).float()


def _check_call(q, k, v, lengths, pattern):
    """The checks of a direct call (the registered backends get calls that :func:`hmar.attention.attention` checked)."""
    if not _HAS_TRITON:
        raise RuntimeError("triton attention: Triton is not installed")
    _check(q, k, v, lengths, pattern)
    if sum(lengths) != q.shape[2]:
        raise ValueError(f"triton attention: lengths {lengths} do not sum to N={q.shape[2]}")


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                     pattern: str = "block_diagonal", scale: float = 1.0,
                     qk_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-sparse attention of ``q, k, v`` (``[B, H, N, D]``) over blocks ``lengths``.

    ``qk_norm`` (one scale per head): attention of ``F.normalize(q, dim=-1) * qk_norm`` and ``F.normalize(k,
    dim=-1)`` with the normalisation inside the kernels (q and k are read raw; no normalised copies), gradients
    for q, k, v and ``qk_norm``."""
    if type(lengths) is not tuple:
        lengths = tuple(int(n) for n in lengths)
    _check_call(q, k, v, lengths, pattern)
    hs = None if qk_norm is None else _head_scale(qk_norm, q)
    return _apply(q, k, v, hs, lengths, pattern, float(scale))


def packed_triton_attention(qkv: torch.Tensor, lengths: Sequence[int], pattern: str = "block_diagonal",
                            scale: float = 1.0, qk_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`triton_attention` of the packed projection ``qkv`` (``[B, N, 3, H, D]``, q, k, v along dim 2, the
    layout of ``mat_qkv(x).view(B, N, 3, H, D)``): the same values, but the backward writes the gradient of
    ``qkv`` itself, in that layout, where unpacking into q, k, v would make autograd stack three gradients and copy
    them into the projection's layout. Returns ``[B, H, N, D]``."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"packed triton attention: qkv must be [B, N, 3, H, D], got {tuple(qkv.shape)}")
    lengths = tuple(int(n) for n in lengths)
    _check_call(*_unpack(qkv), lengths, pattern)
    return _backend_packed(qkv, lengths, pattern, scale, qk_norm)


def dense_inference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              log_temperature: torch.Tensor, max_log_temperature: float,
                              q_bias: Optional[torch.Tensor] = None, v_bias: Optional[torch.Tensor] = None
                              ) -> torch.Tensor:
    """One dense block of HMAR's L2-normalised attention, for inference (no autograd), straight from a bias-free qkv
    projection: the attention of ``F.normalize(q + q_bias) * exp(min(log_temperature, max_log_temperature))`` and
    ``F.normalize(k)`` over ``v + v_bias`` (``q, k, v``: ``[B, H, N, D]`` views, e.g. of the packed projection;
    ``log_temperature``: H values, the model's ``scale_mul_1H11``; biases ``[H * D]``). Every per-call constant of
    the layer (the biases, the temperature) is read by the kernel itself, so a sampling pass launches nothing else
    for them."""
    if not _HAS_TRITON:
        raise RuntimeError("triton attention: Triton is not installed")
    _check(q, k, v, (q.shape[2],), "block_diagonal")
    ls = log_temperature.reshape(-1)
    if ls.numel() != q.shape[1]:
        raise ValueError(f"dense_inference_attention: one log-temperature per head ({q.shape[1]}), got shape "
                         f"{tuple(log_temperature.shape)}")
    for name, t in (("q_bias", q_bias), ("v_bias", v_bias)):
        if t is not None and (t.dim() != 1 or t.numel() != q.shape[1] * q.shape[3] or not t.is_contiguous()):
            raise ValueError(f"dense_inference_attention: {name} must be a contiguous [H * D] vector, got "
                             f"{tuple(t.shape)}")
    args = (q, k, v, ls, float(scale), q_bias, v_bias, float(max_log_temperature))
    return torch.ops.hmar.dense_attn_infer(*args) if torch.compiler.is_compiling() else _dense_impl(*args)


def supports(q: torch.Tensor, lengths: Sequence[int], pattern: str) -> bool:
    """True when the fused kernel can run this call."""
    if not _HAS_TRITON or pattern not in PATTERNS:
        return False
    if not (q.is_cuda or (_INTERPRETED and q.device.type == "cpu")):
        return False
    if q.dim() != 4 or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        return False
    return sum(int(n) for n in lengths) == q.shape[2]


def _backend(q, k, v, lengths, pattern, scale, qk_norm=None):
    # hmar.attention.attention has already made lengths a tuple of ints summing to N
    _check(q, k, v, lengths, pattern)
    return _apply(q, k, v, None if qk_norm is None else _head_scale(qk_norm, q), lengths, pattern, float(scale))


def _backend_packed(qkv, lengths, pattern, scale, qk_norm=None):
    # hmar.attention.packed_attention has already made lengths a tuple of ints summing to N
    q, k, v = _unpack(qkv)
    _check(q, k, v, lengths, pattern)
    return _apply_packed(qkv, None if qk_norm is None else _head_scale(qk_norm, q), lengths, pattern, float(scale))


if _HAS_TRITON:
    from . import register_backend

    _register_ops()

    register_backend("triton", _backend, supports, qk_norm_fn=_backend, packed_fn=_backend_packed)

__all__ = ["triton_attention", "packed_triton_attention", "dense_inference_attention", "supports", "FwdConfig",
           "BwdConfig", "use_config", "dense_candidates", "build_fwd_worklist", "build_bwd_worklist"]
