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

``qk_norm`` (one scale per head): attention of ``F.normalize(q) * qk_norm`` and ``F.normalize(k)``, HMAR's and VAR's
L2-normalised attention. By default the normalisation runs as its own ops before the backend
(:func:`l2_normalize_qk`, the model's numerics). With ``fuse_qk_norm=True``, or :data:`FUSED_QK_NORM` for the calls
that do not say (off by default; also ``HMAR_FUSED_QK_NORM=1``), a backend that can do it inside its kernels does
(the Triton kernel reads q and k raw and normalises them in its prologue and gradient epilogue), for every call it
supports, the dense pattern included. :class:`hmar.accel.GraphedModel` turns it on for the sampling passes where the
H200 measured it faster (those of at most 256 tokens, BENCHMARKS.md section 3g); training turns it on for every
layer on CUDA (``hmar train --qk-norm auto``).

:func:`packed_attention` takes the packed projection ``[B, N, 3, H, D]`` instead of q, k, v. With the normalisation in
the kernels, a backend with a packed form (the Triton kernel) then returns the gradient of the projection itself, in
its layout, so autograd neither stacks three gradients nor copies them for the projection's weight gradient
(BENCHMARKS.md section 2o).
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
# Backends that normalise q and k themselves: fn(q, k, v, lengths, pattern, scale, qk_norm)
_QK_NORM_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {}
# Backends that take the packed projection: fn(qkv, lengths, pattern, scale, qk_norm=None), qkv [B, N, 3, H, D]
_PACKED_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {}

FUSED_QK_NORM: bool = os.environ.get("HMAR_FUSED_QK_NORM", "0").lower() in ("1", "true", "on", "yes")
"""Run ``qk_norm`` inside the kernels of a backend that can (see the module docstring). An experiment: off."""

PACKED_QKV: bool = os.environ.get("HMAR_PACKED_QKV", "1").lower() in ("1", "true", "on", "yes")
""":func:`packed_attention` hands the packed projection to a backend that takes it (on by default; a benchmark
switch, also ``HMAR_PACKED_QKV=0``). Off: it always unpacks q, k, v and calls :func:`attention`."""


def register_backend(name: str, fn: BackendFn,
                     supports: Optional[Callable[[torch.Tensor, Tuple[int, ...], str], bool]] = None,
                     qk_norm_fn: Optional[Callable[..., torch.Tensor]] = None,
                     packed_fn: Optional[Callable[..., torch.Tensor]] = None) -> None:
    """Register an attention backend under ``name`` (``supports(q, lengths, pattern)`` gates auto-choice;
    ``qk_norm_fn(q, k, v, lengths, pattern, scale, qk_norm)``: the same attention with the L2 normalisation of q
    and k done inside, for :data:`FUSED_QK_NORM`; ``packed_fn(qkv, lengths, pattern, scale, qk_norm=None)``: the
    same attention of a packed ``[B, N, 3, H, D]`` projection, for :func:`packed_attention`)."""
    _BACKENDS[name] = fn
    if supports is not None:
        _SUPPORTS[name] = supports
    if qk_norm_fn is not None:
        _QK_NORM_BACKENDS[name] = qk_norm_fn
    if packed_fn is not None:
        _PACKED_BACKENDS[name] = packed_fn


def l2_normalize_qk(q: torch.Tensor, k: torch.Tensor, qk_norm: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``F.normalize(q, dim=-1) * qk_norm`` and ``F.normalize(k, dim=-1)``: the attention inputs of HMAR and VAR
    (``qk_norm``: the per-head temperature, broadcast against ``[B, H, N, D]``, e.g. ``[1, H, 1, 1]``)."""
    return F.normalize(q, dim=-1) * qk_norm, F.normalize(k, dim=-1)


def available_backends() -> Tuple[str, ...]:
    """Names of the registered backends."""
    _maybe_load_triton()
    return tuple(_BACKENDS)


def _levels(lengths: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Block index of every position, ``[N]``, from arithmetic on ``arange`` only (no data-dependent shapes,
    so it traces under ``torch.compile``)."""
    pos = torch.arange(sum(lengths), device=device)
    level = torch.zeros_like(pos)
    start = 0
    for n in lengths[:-1]:
        start += n
        level = level + (pos >= start).long()
    return level


def _build_mask(lengths: Tuple[int, ...], pattern: str, device: torch.device) -> torch.Tensor:
    level = _levels(lengths, device)
    if pattern == "block_diagonal":
        return level[:, None] == level[None, :]
    if pattern == "block_causal":
        return level[:, None] >= level[None, :]
    return torch.ones(len(level), len(level), dtype=torch.bool, device=device)


@lru_cache(maxsize=64)
def _mask_cpu(lengths: Tuple[int, ...], pattern: str) -> torch.Tensor:
    return _build_mask(lengths, pattern, torch.device("cpu"))


_MASKS: Dict[Tuple[Tuple[int, ...], str, torch.device], torch.Tensor] = {}


def block_mask(lengths: Sequence[int], pattern: Pattern, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[N, N]`` mask: ``True`` where query ``i`` may attend to key ``j``.

    Eager calls are cached per ``(lengths, pattern, device)``. Inside ``torch.compile`` the mask is built from
    ``arange`` and comparisons with constants instead (no cache lookup, so no graph break and no guard on a
    global dictionary of tensors); the compiler folds or fuses that small computation.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; use one of {PATTERNS}")
    lengths = tuple(int(n) for n in lengths)
    if torch.compiler.is_compiling():
        return _build_mask(lengths, pattern, torch.device(device))
    key = (lengths, pattern, torch.device(device))
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


# Below this many attention scores per call (``B * H * N * N``, the dense score matrix) one masked-SDPA launch
# (``"reference"``) beats the fused kernel on CUDA: there the kernel is launch- and host-bound (three launches and
# an autograd round trip through Python for ~0.2 ms of GPU work), and the dense matrix is still small. H200,
# forward+backward, bf16 (benchmarks/results/2026-11-29-h200-attention-*.log, final code):
#   block-diagonal N=680: B=4 H=16 (3.0e7 scores) masked SDPA 0.17 ms vs ours 0.38; B=4 H=30 (5.5e7) 0.32 vs
#   0.54; B=16 H=16 (1.2e8) 0.61 vs 0.44 (ours wins from here on, and the dense matrix only grows with N);
#   block-causal N=680: B=16 H=16 (1.2e8) 0.61 vs 0.65 (masked SDPA still wins), B=16 H=30 (2.2e8) 1.09 vs 0.63.
# The fused kernel wins by skipping invisible tiles; block-causal has about half as many to skip, so its
# crossover is about twice as high. A d16 training step (B=32, H=16, N=680: 2.4e8 scores per call) is on the
# fused side for both patterns.
SMALL_DENSE_SCORES = {"block_diagonal": 1 << 26, "block_causal": 1 << 27}


def prefers_masked_sdpa(shape: Sequence[int], pattern: str) -> bool:
    """The size rule of :func:`choose_backend` on CUDA: ``True`` when a ``[B, H, N, D]`` call is small enough
    that one masked-SDPA launch beats the fused kernel (``B * H * N^2 < SMALL_DENSE_SCORES[pattern]``)."""
    B, H, N = shape[0], shape[1], shape[2]
    return B * H * N * N < SMALL_DENSE_SCORES.get(pattern, 0)


TRAINING_BACKENDS = ("auto", "reference", "per_scale", "triton")


def _forced_backend() -> Optional[str]:
    """The backend ``HMAR_ATTN_BACKEND`` forces, or None (unset or ``auto``)."""
    forced = os.environ.get("HMAR_ATTN_BACKEND")
    return forced if forced and forced != "auto" else None


def choose_backend(q: torch.Tensor, lengths: Sequence[int], pattern: Pattern) -> str:
    """Automatic backend (``HMAR_ATTN_BACKEND`` in the environment overrides it).

    * ``dense`` pattern, or the CPU: ``"reference"`` (one SDPA call, with the boolean mask for block patterns).
    * CUDA, small calls (``B * H * N^2 < SMALL_DENSE_SCORES[pattern]``): ``"reference"`` (see the comment there).
    * CUDA otherwise: the fused ``"triton"`` kernel where it supports the call (fp16/bf16, head dim 64/128), for
      both patterns: it beats per-scale SDPA for block-diagonal everywhere measured (1.4-7x) and for block-causal
      up to N=2240 (1.6-5x); at N=9451 block-causal is dominated by the dense lower-triangle tiles and the two are
      at parity (0.99-1.14x), so the kernel is kept there too. Else ``"per_scale"`` (FlashAttention per block).
    """
    forced = _forced_backend()
    if forced:
        return forced
    if pattern == "dense":
        return "reference"
    if q.is_cuda:
        if prefers_masked_sdpa(q.shape, pattern):
            return "reference"
        _maybe_load_triton()
        sup = _SUPPORTS.get("triton")
        if "triton" in _BACKENDS and sup is not None and sup(q, tuple(lengths), pattern):
            return "triton"
        return "per_scale"
    return "reference"


def check_backend(name: Optional[str], device: torch.device | str) -> Optional[str]:
    """Validate a training ``--attention-backend`` for ``device``: returns ``None`` for ``auto`` (choose per
    call), else the name; raises ``ValueError`` with the reason when it cannot run there.

    Call it before ``torch.compile`` traces the model: it also imports the Triton backend where it may be
    chosen (an import inside the traced region would break the graph)."""
    if name == "triton" or torch.device(device).type == "cuda":
        _maybe_load_triton()
    if name is None or name == "auto":
        return None
    if name not in TRAINING_BACKENDS and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(TRAINING_BACKENDS)}")
    if name == "triton":
        _maybe_load_triton()
        if "triton" not in _BACKENDS:
            raise ValueError("attention backend 'triton' needs the triton package (pip install triton)")
        from . import triton_kernel as tk
        if torch.device(device).type != "cuda" and not tk._interpret():
            raise ValueError("attention backend 'triton' runs on CUDA (or on the CPU under TRITON_INTERPRET=1, "
                             "for tests); use auto, reference or per_scale here")
    return name


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on this device type, or None where it is off (autocast knows no meta device)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def triton_kernel_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with the triton package, or the CPU under
    ``TRITON_INTERPRET=1`` (tests)."""
    _maybe_load_triton()
    if "triton" not in _BACKENDS:
        return False
    from . import triton_kernel as tk
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and tk._interpret())


def _fused_qk_norm_call(q, k, v, lengths, pattern, scale, backend, qk_norm, qkv=None):
    """The attention through a backend that normalises q and k itself (:data:`FUSED_QK_NORM`), or None where no
    such backend supports the call. The dense pattern runs as one block of the block-diagonal one. With ``qkv`` (the
    packed projection q, k, v are views of): through the backend's packed form, or None where it has none."""
    if pattern == "dense":
        pattern, lengths = "block_diagonal", (q.shape[2],)
    name = backend or _forced_backend() or "triton"
    _maybe_load_triton()
    fn, sup = (_QK_NORM_BACKENDS if qkv is None else _PACKED_BACKENDS).get(name), _SUPPORTS.get(name)
    if fn is None or (sup is not None and not sup(q, lengths, pattern)) or qk_norm.numel() != q.shape[1]:
        return None   # (the kernels take one scale per head; another broadcast shape runs as ops)
    return fn(q, k, v, lengths, pattern, scale, qk_norm) if qkv is None else fn(qkv, lengths, pattern, scale, qk_norm)


def unpack_qkv(qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (``[B, H, N, D]`` views) of a packed projection ``qkv`` (``[B, N, 3, H, D]``)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"packed attention: qkv must be [B, N, 3, H, D] (q, k, v along dim 2), got "
                         f"{tuple(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def packed_attention(qkv: torch.Tensor, *, lengths: Sequence[int], pattern: Pattern = "block_diagonal",
                     scale: float = 1.0, backend: Optional[str] = None, qk_norm: Optional[torch.Tensor] = None,
                     fuse_qk_norm: Optional[bool] = None) -> torch.Tensor:
    """:func:`attention` of the packed projection ``qkv`` (``[B, N, 3, H, D]``, e.g. ``mat_qkv(x).view(B, N, 3, H,
    D)``): the same arguments and values. Where the L2 normalisation runs in the kernels (``fuse_qk_norm`` /
    :data:`FUSED_QK_NORM`) of a backend with a packed form (the Triton kernel), and :data:`PACKED_QKV` is on, the
    backward writes the gradient of ``qkv`` itself, in the projection's layout: no normalisation ops, and no
    stacking of dq, dk, dv into a copy for the projection's weight gradient. Everywhere else: unpacked and
    :func:`attention`. Returns ``[B, H, N, D]``."""
    q, k, v = unpack_qkv(qkv)
    fuse = qk_norm is not None and (FUSED_QK_NORM if fuse_qk_norm is None else fuse_qk_norm)
    lengths = tuple(int(n) for n in lengths)
    if PACKED_QKV and fuse and pattern in PATTERNS and sum(lengths) == q.shape[2]:   # (else attention() says why not)
        dt = _autocast_dtype(qkv.device.type)
        packed = qkv if dt is None else qkv.to(dt)
        out = _fused_qk_norm_call(*unpack_qkv(packed), lengths, pattern, scale, backend, qk_norm, qkv=packed)
        if out is not None:
            return out
    return attention(q, k, v, lengths=lengths, pattern=pattern, scale=scale, backend=backend, qk_norm=qk_norm,
                     fuse_qk_norm=fuse_qk_norm)


def inference_kernel(x: torch.Tensor, head_dim: int,
                     backend: Optional[str] = None) -> Optional[Callable[..., torch.Tensor]]:
    """The kernel that runs one dense pass of the L2-normalised attention straight from a bias-free qkv projection of
    ``x`` (the biases and the temperature read inside it:
    :func:`hmar.attention.triton_kernel.dense_inference_attention`),
    or None where it cannot: no Triton, not CUDA (nor the interpreter), a dtype other than fp16/bf16 (after autocast),
    a head dim other than 64/128, another backend asked for (``backend`` or ``HMAR_ATTN_BACKEND``), or the kernel
    switched off (``triton_kernel.DENSE_INFERENCE``). The caller checks that no gradient is needed."""
    name = backend or _forced_backend() or "triton"
    if name != "triton":
        return None
    _maybe_load_triton()
    if "triton" not in _BACKENDS:
        return None
    from . import triton_kernel as tk
    dev = x.device.type
    dt = _autocast_dtype(dev) or x.dtype
    if not tk.DENSE_INFERENCE or dt not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128):
        return None
    if not (x.is_cuda or (tk._INTERPRETED and dev == "cpu")):
        return None
    return tk.dense_inference_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lengths: Sequence[int],
              pattern: Pattern = "block_diagonal", scale: float = 1.0, backend: Optional[str] = None,
              qk_norm: Optional[torch.Tensor] = None, fuse_qk_norm: Optional[bool] = None) -> torch.Tensor:
    """Attention of ``q, k, v`` (``[B, H, N, D]``) over blocks of sizes ``lengths`` with ``pattern``.

    ``scale`` multiplies ``q @ k^T`` before the softmax. ``qk_norm`` (one scale per head, broadcast against
    ``[B, H, N, D]``): attention of the L2-normalised q times ``qk_norm`` and the L2-normalised k (see the module
    docstring). ``fuse_qk_norm``: whether a backend that can normalises q and k inside its kernels (None: as
    :data:`FUSED_QK_NORM` says). Returns ``[B, H, N, D]``.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; use one of {PATTERNS}")
    lengths = tuple(int(n) for n in lengths)
    if sum(lengths) != q.shape[2] or any(n < 0 for n in lengths):   # (min(default=) breaks a compiled graph)
        raise ValueError(f"attention: the scale lengths {lengths} must be non-negative and sum to the "
                         f"sequence length {q.shape[2]} (they sum to {sum(lengths)})")
    dt = _autocast_dtype(q.device.type)
    if qk_norm is not None and (FUSED_QK_NORM if fuse_qk_norm is None else fuse_qk_norm):
        out = _fused_qk_norm_call(*((q, k, v) if dt is None else (q.to(dt), k.to(dt), v.to(dt))),
                                  lengths, pattern, scale, backend, qk_norm)
        if out is not None:
            return out
    if qk_norm is not None:
        q, k = l2_normalize_qk(q, k, qk_norm)
        if dt is None and q.dtype != v.dtype:   # half inputs, an fp32 scale: q came back in fp32
            q, k = q.to(v.dtype), k.to(v.dtype)
    if dt is not None:
        # What autocast does to SDPA's inputs, done before the choice so every backend sees one dtype: under bf16
        # autocast the L2-normalised q (and, on CUDA, k) arrive in fp32 (norm/exp run in fp32), and the fused
        # kernel only takes one half dtype for q, k and v (it used to decline such calls: per-scale SDPA ran).
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    name = backend or choose_backend(q, lengths, pattern)
    if name not in _BACKENDS:
        _maybe_load_triton()
    fn = _BACKENDS.get(name)
    if fn is None:
        raise ValueError(f"attention backend {name!r} is not available here; available: {available_backends()}")
    return fn(q, k, v, lengths, pattern, scale)


__all__ = ["attention", "packed_attention", "unpack_qkv", "block_mask", "register_backend", "available_backends",
           "choose_backend", "check_backend", "inference_kernel", "l2_normalize_qk", "triton_kernel_runs_on",
           "prefers_masked_sdpa", "PATTERNS", "TRAINING_BACKENDS", "SMALL_DENSE_SCORES"]
# (FUSED_QK_NORM and PACKED_QKV are switches: set them as hmar.attention.FUSED_QK_NORM, not on imported copies)
