"""The token draw of a sampling pass as one Triton kernel (the fast path's; :func:`fused_draw`).

After every transformer pass the sampler turns the head's logits into tokens: the non-finite check, guidance
(``(1 + t) cond - t uncond``), temperature, the top-k and top-p filters, the softmax and one draw per position.
As torch ops (:func:`hmar.sampling.sample_from_logits`) that is about 25 kernels per pass, several of them passes
over fp32 ``[2B, n, V]`` tensors (537 MB at the last 512 px scale, batch 16 with guidance), plus ``torch.topk``.
Here one program per position reads that position's bf16 (or fp32) logits of both guidance rows once and does all
of it in registers:

* the **k-th largest** logit is found by a radix select over the 32-bit order-preserving integer keys of the fp32
  values (32 counting steps, one bit each), so the top-k set is every logit at least that large (ties at the k-th
  value all stay, as in :func:`hmar.sampling.filter_logits`);
* the **top-p** cut is a second radix select over the same keys: a token stays when the probability mass of the
  strictly more likely tokens is below ``top_p`` (so the most likely token always stays, and tokens of equal
  logits stay or go together);
* the **draw** is torch.multinomial's, as in :func:`~hmar.sampling.sample_from_logits`: the argmax of ``p / q``
  over the kept tokens, with ``q ~ Exp(1)`` one per (position, token), drawn by the caller from its generator
  exactly as the torch path draws them (so the generator advances the same, and a seed samples the same tokens
  except where the two paths round a near-tie differently, or where torch.topk keeps exactly k of tied logits).

Outputs: the token, its probability after the filters (the masked steps' confidence) and a per-position flag for
non-finite logits (the sampler's check). Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

try:  # Triton is optional: without it :func:`available` is False and the sampler keeps the torch ops
    import triton
    import triton.language as tl
    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _HAS_TRITON = False

# Triton decides at decoration time whether its kernels run in the CPU interpreter (see hmar.attention.triton_kernel)
_INTERPRETED = _HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


HISTOGRAM_TOP_K = False
"""Find the k-th largest logit with four 8-bit histogram rounds (``tl.histogram``) instead of 32 one-bit counting
steps (an experiment, off: ``benchmarks/bench_draw.py --hist`` times both; the same threshold either way)."""

MAX_VOCAB = 16384
"""The largest vocabulary :class:`hmar.accel.GraphedModel` draws with the kernel by default: one program holds a
position's whole row of logits in registers (checked under the interpreter up to 16384; the H200 ran 4096). Larger
ones keep the torch ops unless ``fused_draw=True`` is asked for."""

NUM_WARPS: Optional[int] = None
"""Warps per program (one position's draw); None: one per 512 logits of the vocabulary, 1-8 (8 at V = 4096, as
measured fastest on the H200 against 4 and 16: BENCHMARKS.md section 3m)."""


def available(device: torch.device) -> bool:
    """Whether :func:`fused_draw` runs on ``device`` (CUDA with Triton, or the CPU under Triton's interpreter)."""
    return _HAS_TRITON and (device.type == "cuda" or (_INTERPRETED and device.type == "cpu"))


if _HAS_TRITON:
    @triton.jit
    def _enough(key, weight, cand, target, BY_MASS: tl.constexpr):
        """Whether the lanes with ``key >= cand`` hold ``target``: that much ``weight`` (``BY_MASS``; 0 on the lanes
        that do not count), or that many lanes (those that do not count hold the key -2^31, below every candidate)."""
        if BY_MASS:
            return tl.sum(tl.where(key >= cand, weight, 0.0), 0) >= target
        return tl.sum((key >= cand).to(tl.int32), 0) >= target

    @triton.jit
    def _largest_key_with(key, weight, target, BY_MASS: tl.constexpr):
        """The largest int32 ``k > -2^31`` such that the lanes with ``key >= k`` hold ``target`` (:func:`_enough`;
        -2^31 if none), built bit by bit from the top (a radix select: 32 steps, int32 only): the sign first, then
        bits 30..0 (for a negative prefix too, setting a lower bit raises the value). Every step reads every lane:
        the kernel is bound by these compares and sums (BENCHMARKS.md section 3m)."""
        zero = tl.full((), 0, tl.int32)
        theta = tl.where(_enough(key, weight, zero, target, BY_MASS), zero, ~tl.full((), 0x7FFFFFFF, tl.int32))
        for b in tl.static_range(30, -1, -1):
            cand = theta | (1 << b)
            theta = tl.where(_enough(key, weight, cand, target, BY_MASS), cand, theta)
        return theta

    @triton.jit
    def _kth_key_by_histograms(key, target):
        """:func:`_largest_key_with` for counting (``BY_MASS=False``) in four rounds of one 256-bin histogram each:
        the keys as unsigned (``key ^ 2^31``: the same order), 8 bits a round from the top. A round puts each lane's
        next byte in its bin when the lane's higher bytes equal the prefix so far, a lane above the prefix in the top
        bin (it is at least every candidate of the round) and one below in bin 0, whose count is never read: the
        largest byte ``d >= 1`` whose lanes, with those above, reach ``target`` extends the prefix, else 0 does
        (the rounds before guarantee it). Padding lanes (key -2^31) are unsigned 0: bin 0 in every round."""
        ukey = key.to(tl.uint32, bitcast=True) ^ 0x80000000
        bins = tl.arange(0, 256)
        prefix = tl.full((), 0, tl.uint32)
        for r in tl.static_range(4):
            shift = 24 - 8 * r   # (a constexpr annotation cannot be reassigned in a static_range on Triton 3.6)
            byte = (ukey >> shift) & 0xFF
            if r == 0:
                digit = byte
            else:
                high = ukey >> (shift + 8)
                digit = tl.where(high == prefix, byte, tl.where(high > prefix, 0xFF, 0))
            hist = tl.histogram(digit.to(tl.int32), 256)
            at_least = tl.flip(tl.cumsum(tl.flip(hist, 0), 0), 0)       # lanes with a byte >= d (and above)
            d = tl.max(tl.where((at_least >= target) & (bins >= 1), bins, 0), 0)
            prefix = (prefix << 8) | d.to(tl.uint32)
        return (prefix ^ 0x80000000).to(tl.int32, bitcast=True)

    @triton.jit
    def _draw_kernel(logits_ptr, q_ptr, tok_ptr, conf_ptr, bad_ptr, rows, V, stride_l, stride_q,
                     weight, temperature, top_k, top_p,
                     GUIDED: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, BLOCK: tl.constexpr,
                     HIST: tl.constexpr, SHIFT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        valid = cols < V
        lc = tl.load(logits_ptr + row * stride_l + cols, mask=valid, other=0.0).to(tl.float32)
        ok = tl.abs(lc) <= 3.4028234663852886e38            # False for NaN and +-inf
        if GUIDED:   # torch.lerp(uncond, cond, weight), weight = 1 + t
            lu = tl.load(logits_ptr + (row + rows) * stride_l + cols, mask=valid, other=0.0).to(tl.float32)
            ok = ok & (tl.abs(lu) <= 3.4028234663852886e38)
            lc = lc - (lc - lu) * (1.0 - weight)
        tl.store(bad_ptr + row, tl.sum((valid & ~ok).to(tl.int32), 0) > 0)
        if SHIFT:   # a tiny temperature (as in the torch draw): the row's max first, so lc / temperature cannot overflow
            lc = lc - tl.max(tl.where(valid, lc, -float("inf")), 0)
        x = tl.where(valid, lc / temperature, -float("inf"))
        bits = x.to(tl.int32, bitcast=True)
        # int32 keys in the order of the float values; -2^31 (a NaN's) on the padding lanes
        key = tl.where(valid, bits ^ ((bits >> 31) & 0x7FFFFFFF), ~tl.full((), 0x7FFFFFFF, tl.int32))
        keep = valid
        if TOP_K:
            if HIST:
                keep = keep & (key >= _kth_key_by_histograms(key, top_k))
            else:
                keep = keep & (key >= _largest_key_with(key, x, top_k, False))   # (counting: x is not read)
        m = tl.max(x, 0)
        e = tl.where(keep, tl.exp(x - m), 0.0)
        if TOP_P:   # drop a token once the tokens strictly more likely than it hold top_p of the mass
            p = e / tl.sum(e, 0)              # (0 outside the top-k set)
            keep = keep & (key >= _largest_key_with(key, p, top_p, True))
            e = tl.where(keep, e, 0.0)
        p = e / tl.sum(e, 0)
        q = tl.load(q_ptr + row * stride_q + cols, mask=valid, other=1.0)
        r = p / q
        score = tl.where(keep & (r == r), r, -1.0)         # (NaN where the logits were not finite)
        j = tl.minimum(tl.argmax(score, 0), V - 1)         # in range whatever the logits were
        tl.store(tok_ptr + row, j.to(tl.int64))
        tl.store(conf_ptr + row, tl.sum(tl.where(cols == j, p, 0.0), 0))


def fused_draw(logits: torch.Tensor, q: torch.Tensor, weight: Optional[float] = None, top_k: int = 0,
               top_p: float = 0.0, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per position of a pass's ``logits`` (the head's output, any float dtype; ``[2B, n, V]`` with the
    guided rows first when ``weight`` is given, ``[B, n, V]`` without), with ``q`` ``[B * n, V]`` fp32 ``Exp(1)``
    draws. ``weight``: the guidance ``1 + t`` (``lerp(uncond, cond, weight)``; None: no guidance). Returns
    (tokens ``[B, n]`` int64, their probabilities after the filters ``[B, n]`` fp32, ``[B, n]`` bool: that
    position's logits, of either guidance row, were not all finite). See the module's docstring for the filters."""
    if not available(logits.device):
        raise ValueError(f"fused_draw runs on CUDA with Triton installed (or on the CPU under TRITON_INTERPRET=1), not "
                         f"on {logits.device} here: set the model's fused_draw = False to draw with torch ops")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    from .sampling import shifted_temperature
    temperature, shift = shifted_temperature(temperature)
    V = logits.shape[-1]
    B2, n = logits.shape[0], logits.numel() // (logits.shape[0] * V)
    B = B2 // 2 if weight is not None else B2
    if weight is not None and B2 % 2:
        raise ValueError(f"guided logits need the cond and uncond rows, an even batch; got {B2}")
    rows = B * n
    flat = logits.reshape(B2 * n, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if q.shape != (rows, V) or q.dtype != torch.float32 or q.stride(-1) != 1:
        raise ValueError(f"q must be fp32 [{rows}, {V}] with a contiguous last dim, got {q.dtype} {tuple(q.shape)}")
    tok = torch.empty(rows, dtype=torch.int64, device=logits.device)
    conf = torch.empty(rows, dtype=torch.float32, device=logits.device)
    bad = torch.empty(rows, dtype=torch.bool, device=logits.device)
    block = triton.next_power_of_2(V)
    warps = 1 if _INTERPRETED else NUM_WARPS or max(1, min(8, block // 512))
    _draw_kernel[(rows,)](flat, q, tok, conf, bad, rows, V, flat.stride(0), q.stride(0),
                          float(1.0 if weight is None else weight), float(temperature), int(top_k), float(top_p),
                          GUIDED=weight is not None, TOP_K=0 < top_k < V, TOP_P=0.0 < top_p < 1.0, BLOCK=block,
                          HIST=HISTOGRAM_TOP_K, SHIFT=shift, num_warps=warps)
    return tok.view(B, n), conf.view(B, n), bad.view(B, n)
