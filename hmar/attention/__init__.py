"""Block-sparse attention over a scale schedule: one entry point, several backends.

A sequence of ``N = sum(lengths)`` tokens is split into consecutive blocks (one per scale).
Two patterns are supported:

* ``"block_diagonal"`` (HMAR): a token attends only to tokens of its own block.
* ``"block_causal"`` (VAR): a token attends to its own block and every earlier block.
* ``"dense"``: no mask at all (one scale at inference).

Backends (``q, k, v`` are ``[B, H, N, D]``):

* ``"reference"``: ``scaled_dot_product_attention`` with a dense boolean mask. Any device,
  any dtype, forward and backward. The ground truth every other backend is tested against.
* ``"per_scale"``: one dense SDPA call per block (FlashAttention through SDPA on GPU); no mask
  is materialised. Launch-bound at small scales, but exact.
* ``"triton"``: the fused block-sparse kernel (one launch for all scales), registered by
  :mod:`hmar.attention.triton_kernel` when Triton and CUDA are present.

``backend=None`` picks automatically (see :func:`choose_backend`); ``HMAR_ATTN_BACKEND`` in the
environment overrides the automatic choice.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Dict, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Pattern = Literal["block_diagonal", "block_causal", "dense"]
PATTERNS = ("block_diagonal", "block_causal", "dense")
BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[int, ...], str, float], torch.Tensor]

_BACKENDS: Dict[str, BackendFn] = {}
# A backend may declare when it can run; the automatic choice asks it.
_SUPPORTS: Dict[str, Callable[[torch.Tensor, Tuple[int, ...], str], bool]] = {}


def register_backend(name: str, fn: BackendFn,
                     supports: Optional[Callable[[torch.Tensor, Tuple[int, ...], str], bool]] = None) -> None:
    """Register an attention backend under ``name`` (``supports(q, lengths, pattern)`` gates auto-choice)."""
    _BACKENDS[name] = fn
    if supports is not None:
        _SUPPORTS[name] = supports


def available_backends() -> Tuple[str, ...]:
    """Names of the registered backends."""
    _maybe_load_triton()
    return tuple(_BACKENDS)


@lru_cache(maxsize=64)
def _mask_cpu(lengths: Tuple[int, ...], pattern: str) -> torch.Tensor:
    level = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if pattern == "block_diagonal":
        return level[:, None] == level[None, :]
    if pattern == "block_causal":
        return level[:, None] >= level[None, :]
    return torch.ones(len(level), len(level), dtype=torch.bool)


_MASKS: Dict[Tuple[Tuple[int, ...], str, torch.device], torch.Tensor] = {}


def block_mask(lengths: Sequence[int], pattern: Pattern, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[N, N]`` mask: ``True`` where query ``i`` may attend to key ``j``."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; use one of {PATTERNS}")
    key = (tuple(int(n) for n in lengths), pattern, torch.device(device))
    m = _MASKS.get(key)
    if m is None:
        m = _mask_cpu(key[0], pattern).to(key[2])
        if len(_MASKS) > 64:
            _MASKS.clear()
        _MASKS[key] = m
    return m


def _reference(q, k, v, lengths, pattern, scale):
    if pattern == "dense":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask(lengths, pattern, q.device), scale=scale)


def _per_scale(q, k, v, lengths, pattern, scale):
    if pattern == "dense" or len(lengths) == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    outs, start = [], 0
    for n in lengths:
        end = start + n
        k0 = start if pattern == "block_diagonal" else 0
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, k0:end], v[:, :, k0:end], scale=scale))
        start = end
    return torch.cat(outs, dim=2)


register_backend("reference", _reference)
register_backend("per_scale", _per_scale)

_triton_tried = False


def _maybe_load_triton() -> None:
    global _triton_tried
    if _triton_tried:
        return
    _triton_tried = True
    try:  # registers itself; absent or broken Triton simply leaves the slot empty
        from . import triton_kernel  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        pass


def choose_backend(q: torch.Tensor, lengths: Sequence[int], pattern: Pattern) -> str:
    """Automatic backend: fused Triton kernel on CUDA where it supports the call, then per-scale
    SDPA on CUDA, and the boolean-mask reference on the CPU."""
    forced = os.environ.get("HMAR_ATTN_BACKEND")
    if forced:
        return forced
    if pattern == "dense":
        return "reference"
    if q.is_cuda:
        _maybe_load_triton()
        sup = _SUPPORTS.get("triton")
        if "triton" in _BACKENDS and sup is not None and sup(q, tuple(lengths), pattern):
            return "triton"
        return "per_scale"
    return "reference"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lengths: Sequence[int],
              pattern: Pattern = "block_diagonal", scale: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """Attention of ``q, k, v`` (``[B, H, N, D]``) over blocks of sizes ``lengths`` with ``pattern``.

    ``scale`` multiplies ``q @ k^T`` before the softmax. Returns ``[B, H, N, D]``.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; use one of {PATTERNS}")
    lengths = tuple(int(n) for n in lengths)
    if sum(lengths) != q.shape[2]:
        raise ValueError(f"attention: the scale lengths {lengths} sum to {sum(lengths)}, "
                         f"but the sequence has {q.shape[2]} tokens")
    name = backend or choose_backend(q, lengths, pattern)
    if name not in _BACKENDS:
        _maybe_load_triton()
    fn = _BACKENDS.get(name)
    if fn is None:
        raise ValueError(f"attention backend {name!r} is not available here; available: {available_backends()}")
    return fn(q, k, v, lengths, pattern, scale)


__all__ = ["attention", "block_mask", "register_backend", "available_backends", "choose_backend", "PATTERNS"]
