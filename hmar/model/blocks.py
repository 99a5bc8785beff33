"""VAR's AdaLN transformer block and head, with attention routed through :mod:`hmar.attention`.

Every block linear goes through :func:`dense` and every residual add + LayerNorm + modulation through
:func:`modulated_norm`: the places where the fast paths swap in their kernels. The switches (all off here;
:class:`hmar.accel.GraphedModel` sets the ones measured faster): the blocks' and head's ``fused_norm`` (inference,
:mod:`hmar.model.norm_kernel`), :data:`FUSED_NORM_TRAINING` (its backward), :data:`SKINNY_GEMM_MAX_ROWS`
(:mod:`hmar.model.skinny_gemm`), ``FFN.fused_gelu`` and ``SelfAttention.fused_qk_norm``; fp8 layers
(:mod:`hmar.model.fp8`) replace the linears themselves."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attention as _attn_module
from ..attention import inference_kernel, l2_normalize_qk, packed_attention, unpack_qkv
from .fp8 import linear


Branch = Tuple[torch.Tensor, torch.Tensor]
"""A block's last residual branch, not yet added to the stream: ``(h, mod)``, its FFN output and its modulation
``[B, 6, C]``; the stream is ``x + h * gamma2`` (:func:`branch_gate`). The whole modulation rather than its gamma2
view: a view of another shape is a new input to the compiled block, and dynamo's duck sizing then specialised the
second block of every model (the view's stride, 6C, equals that block's offset in the packed modulation)."""


def branch_gate(branch: Branch) -> torch.Tensor:
    """The gamma2 ``[B, 1, C]`` that multiplies the branch's FFN output."""
    return branch[1][:, None, 1]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` (training)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)
        # the rate as a tensor too (not saved): a compiled block reads it as an input, so blocks of different rates
        # share one compiled graph (``compile_blocks``); a float would be a constant of the graph, one compile each
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.p), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.keep_prob.is_meta:   # built on the meta device, then loaded (hmar.checkpoint): the rate is not saved
            self.keep_prob = torch.tensor(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:   # eval first: a compiled eval block must not depend on p
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(self.keep_prob)
        return x * keep / self.keep_prob


class KVCache:
    """Keys and values of the scales seen so far (VAR inference), preallocated to ``max_len`` tokens so
    that every scale's pass has static shapes (which CUDA graphs need). ``len``: tokens cached."""

    def __init__(self, max_len: int):
        self.max_len, self.len = max_len, 0
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ([B, H, n, D]) after the cached tokens; return all cached keys and values."""
        if self.k is None or self.k.shape[0] != k.shape[0] or self.k.dtype != k.dtype or self.k.device != k.device:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.len + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > {self.max_len}; call reset() between samples")
        self.k[:, :, self.len:end] = k
        self.v[:, :, self.len:end] = v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.len = 0


SKINNY_GEMM_MAX_ROWS = 0
"""In inference on CUDA, the blocks' four linears run :mod:`hmar.model.skinny_gemm`'s Triton GEMM for inputs of at most
this many rows (0: never; an experiment: ``benchmarks/bench_skinny.py`` and the bench modifier ``skinny`` measure it).
"""
SKINNY_GEMM_WIDE_ONLY = False
"""With :data:`SKINNY_GEMM_MAX_ROWS`: only the linears wider out than in (qkv, fc1) take the kernel; proj and fc2,
whose few output columns give it few programs, keep cuBLAS (the bench modifier ``skinnywideN``)."""
_KEEP = object()
_SKINNY_DEVICES = ("cuda",)   # (tests add "cpu" under Triton's interpreter)


def dense(layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = _KEEP,  # type: ignore[assignment]
          gelu: bool = False) -> torch.Tensor:
    """``layer``'s ``x @ W.T + bias`` (``bias``: the layer's own unless given; ``gelu``: the tanh GELU of it, the
    caller's fused epilogue), through :data:`SKINNY_GEMM_MAX_ROWS`'s kernel where it applies, else the layer
    itself, or with ``bias`` :func:`hmar.model.fp8.linear` (an ``nn.Linear`` through ``F.linear``, an fp8 layer
    called with it)."""
    b = getattr(layer, "bias", None) if bias is _KEEP else bias
    if (SKINNY_GEMM_MAX_ROWS and isinstance(layer, nn.Linear) and x.device.type in _SKINNY_DEVICES
            and x.dtype in (torch.float16, torch.bfloat16)   # (an fp32 tl.dot would be TF32 on the GPU)
            and not torch.is_grad_enabled() and x.numel() <= SKINNY_GEMM_MAX_ROWS * x.shape[-1]
            and (not SKINNY_GEMM_WIDE_ONLY or layer.out_features > layer.in_features)):
        return _kernel_ops().skinny_linear(x, layer.weight, b, gelu)
    if gelu:
        if not isinstance(layer, nn.Linear):   # an fp8 fc1: the GELU goes with fc2's input (FFN.forward)
            raise ValueError("dense(gelu=True) takes an nn.Linear")
        h = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), layer.weight.t(), use_gelu=True)
        return h.view(*x.shape[:-1], h.shape[-1])
    return layer(x) if bias is _KEEP else linear(layer, x, bias)


class SelfAttention(nn.Module):
    """Multi-head attention with a bias-free qkv projection plus separate q/v biases (no k bias),
    L2-normalised q and k with a learnable per-head temperature ``exp(min(s, ln 100))`` (init ln 4).

    ``fused_qk_norm`` (None by default: :data:`hmar.attention.FUSED_QK_NORM` decides): whether that normalisation
    runs inside the attention kernels (``attention(..., fuse_qk_norm=)``; the layer hands them its packed projection,
    :func:`hmar.attention.packed_attention`); :class:`hmar.accel.GraphedModel` sets both attributes for sampling, as
    measured fastest, and training sets it (``prepare_training(qk_norm=)``: in the kernels on CUDA by default). ``fused_qk_norm_max_tokens`` (None: no limit): with
    ``fused_qk_norm``, a call over more than this many tokens keeps the normalisation as ops (cuDNN's attention
    beats the Triton kernel on long dense passes, BENCHMARKS.md section 3g).

    A fused pass of one dense block that needs no gradient (a sampling pass) runs the projection without its bias and
    :func:`hmar.attention.inference_kernel`'s kernel, which adds the q / v biases and computes the temperature
    itself: no concatenation of the biases and no temperature kernel in every pass of every block."""

    fused_qk_norm: Optional[bool] = None
    fused_qk_norm_max_tokens: Optional[int] = None
    kernel_constants = True   # False: the sampling passes too concatenate the biases and compute the temperature

    def __init__(self, dim: int, num_heads: int, l2_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.l2_norm = num_heads, dim // num_heads, l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def _packed_qkv(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The packed projection of ``x``, ``[B, L, 3, H, D]``."""
        B, L, _ = x.shape
        qkv = dense(self.mat_qkv, x, bias)   # an nn.Linear or an fp8 one (hmar.model.fp8)
        return qkv.view(B, L, 3, self.num_heads, self.head_dim)

    def _pass_kernel(self, x: torch.Tensor, lengths: Sequence[int], fuse: Optional[bool],
                     cache: Optional[KVCache], backend: Optional[str]):
        """The inference kernel for a fused pass over one block without a cache or a gradient (a sampling pass), or
        None."""
        if cache is not None or len(lengths) != 1 or not (self.kernel_constants and self.l2_norm):
            return None
        if torch.is_grad_enabled() or not (_attn_module.FUSED_QK_NORM if fuse is None else fuse):
            return None
        return inference_kernel(x, self.head_dim, backend)

    def forward(self, x: torch.Tensor, lengths: Sequence[int], pattern: str,
                cache: Optional[KVCache] = None, backend: Optional[str] = None) -> torch.Tensor:
        B, L, C = x.shape
        most = self.fused_qk_norm_max_tokens   # None stays None (FUSED_QK_NORM decides)
        fuse = self.fused_qk_norm and (most is None or L <= most)
        kernel = self._pass_kernel(x, lengths, fuse, cache, backend)
        if kernel is not None:   # a sampling pass: biases and temperature read by the kernel, nothing else launched
            q, k, v = unpack_qkv(self._packed_qkv(x))
            out = kernel(q, k, v, self.scale, self.scale_mul_1H11, self.max_scale_mul, self.q_bias, self.v_bias)
            return dense(self.proj, out.transpose(1, 2).reshape(B, L, C))
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self._packed_qkv(x, bias)
        # the per-head temperature of the L2-normalised attention (the normalisation itself: l2_normalize_qk)
        qk_norm = self.scale_mul_1H11.clamp(max=self.max_scale_mul).exp() if self.l2_norm else None
        if cache is not None:  # VAR inference: queries of this scale see every cached scale
            q, k, v = unpack_qkv(qkv)
            if qk_norm is not None:
                q, k = l2_normalize_qk(q, k, qk_norm)
            k, v = cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:   # (packed: with the normalisation in the Triton kernels, dqkv comes back in the projection's layout)
            out = packed_attention(qkv, lengths=lengths, pattern=pattern, scale=self.scale, backend=backend,
                                   qk_norm=qk_norm, fuse_qk_norm=fuse)
        return dense(self.proj, out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2.

    ``fused_gelu`` (off by default; :class:`hmar.accel.GraphedModel` switches it on): on CUDA without autograd,
    fc1's bias and GELU run in the GEMM's epilogue (``torch._addmm_activation``: cuBLASLt's GELU-bias epilogue, tanh
    approximation, on the fp32 accumulator) instead of as a kernel of their own over fc1's output; torch.compile
    keeps that op as a call into ATen. CUDA only: on the CPU that op computes the exact (erf) GELU, another
    function. With fp8 layers (:mod:`hmar.model.fp8`) the GELU runs in the kernel that quantises fc2's input."""

    fused_gelu = False

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.fc2, nn.Linear):   # fp8 (hmar.model.fp8): the GELU inside fc2's input quantisation
            return self.fc2(self.fc1(x), gelu=True)
        if self.fused_gelu and x.is_cuda and not torch.is_grad_enabled():
            return dense(self.fc2, dense(self.fc1, x, gelu=True))
        return dense(self.fc2, F.gelu(dense(self.fc1, x), approximate="tanh"))


def modulated_norm(ln: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   h: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                   fused: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x', ln(x') * (scale + 1) + shift)`` with ``x' = x + h * gate`` (``x' = x`` without ``h``); ``scale``,
    ``shift`` and ``gate`` are ``[B, 1, C]`` rows of a modulation.

    ``fused=True``: one Triton kernel (:mod:`hmar.model.norm_kernel`) reads ``x`` and ``h`` once and writes ``x'``
    and the output once, computing in fp32 (the ops round each step to the stream's dtype). In inference, the
    blocks' and the head's ``fused_norm`` ask for it (:class:`hmar.accel.GraphedModel` sets it on CUDA); with
    autograd, :data:`FUSED_NORM_TRAINING` does, and the kernel's backward computes the gradients (the output then
    comes in the autocast dtype where autocast is on: the linears after it would cast it to that anyway)."""
    if fused:
        ops = _kernel_ops()
        if torch.is_grad_enabled():   # training: the op with a backward; the output in the autocast dtype, which
            dev = x.device.type       # the linears after it would cast it to anyway
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            xo, y, _ = ops.adaln_norm_train(x, h, gate, scale, shift, ln.eps, dtype)
            return (x if h is None else xo), y
        if h is None:
            return x, ops.adaln_norm(x, scale, shift, ln.eps)
        return ops.adaln_residual_norm(x, h, gate, scale, shift, ln.eps)
    if h is not None:
        x = x + h * gate
    return x, ln(x) * (scale + 1) + shift


FUSED_NORM_TRAINING = False
"""With autograd (training), every AdaLN block and head runs :func:`modulated_norm`'s kernel and its backward
(CUDA with Triton, or the CPU under Triton's interpreter). Off by default: ``benchmarks/bench_train.py --fused-norm``
measures it (BENCHMARKS.md)."""

_KERNEL_OPS = False   # hmar.model.norm_kernel and skinny_gemm imported (their ops registered)


def _kernel_ops():
    """``torch.ops.hmar`` with the ops of :mod:`hmar.model.norm_kernel` and :mod:`hmar.model.skinny_gemm` registered
    (imported at the first call that needs one, not with hmar: importing hmar does not import Triton)."""
    global _KERNEL_OPS
    if not _KERNEL_OPS:
        from . import norm_kernel, skinny_gemm   # noqa: F401
        _KERNEL_OPS = True
    return torch.ops.hmar


def enable_fused_norm(model: nn.Module, on: bool = True) -> int:
    """Set ``fused_norm`` on every :class:`AdaLNBlock` and :class:`AdaLNHead` of ``model`` (see
    :func:`modulated_norm`); returns how many modules were set. Turning it on needs the kernel to run on the
    model's device: CUDA with Triton installed (or the CPU under ``TRITON_INTERPRET=1``, for tests)."""
    if on:
        try:
            _kernel_ops()
            from .norm_kernel import available
        except ImportError as e:
            raise ValueError(f"fused_norm needs Triton (pip install triton): {e}") from None
        device = next(model.parameters()).device
        if not available(device):
            raise ValueError(f"fused_norm: the Triton kernel does not run on {device}; use a CUDA device, or set "
                             f"TRITON_INTERPRET=1 before importing Triton to run it on the CPU")
    mods = [m for m in model.modules() if isinstance(m, (AdaLNBlock, AdaLNHead))]
    for m in mods:
        m.fused_norm = on
    return len(mods)


class AdaLNBlock(nn.Module):
    """Pre-norm block modulated by the class condition: six chunks (gamma1, gamma2, scale1, scale2,
    shift1, shift2) from ``Linear(SiLU(cond))``; LayerNorm without affine parameters."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 l2_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.attn = SelfAttention(dim, num_heads, l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.ln = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)

    chunks = 6           # modulation vectors per condition
    fused_norm = False   # inference: each residual add + LayerNorm + modulation as one kernel (modulated_norm)
    mod_offset: Optional[int] = None   # where this block's modulation sits in a model's packed one

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """``ada_lin(cond)`` as ``[B, 6, C]`` (gamma1, gamma2, scale1, scale2, shift1, shift2)."""
        return self.ada_lin(cond).view(-1, self.chunks, self.dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, lengths: Sequence[int], pattern: str,
                cache: Optional[KVCache] = None, backend: Optional[str] = None, branch: Optional[Branch] = None,
                defer: bool = False):
        """``cond``: the class condition ``[B, C]``, or this block's modulation ``[B, 6, C]`` computed before
        (:func:`modulation_for`).

        ``defer=True`` returns ``(x, (h, gamma2))`` instead of the block's output ``x + h * gamma2``: its last
        residual branch not added yet. ``branch``: such a pair from the block before, added first. The inference
        passes chain blocks this way (``_run(..., defer=True)`` of the transformers): a compiled block
        (:func:`hmar.accel.compile_blocks` compiles each block on its own, so inductor cannot fuse across two) then
        adds the branch inside the kernel of its first LayerNorm instead of in a kernel of its own. The same ops in
        the same order: eager results are unchanged."""
        mod = self.modulation(cond) if cond.dim() == 2 else cond
        g1, g2, s1, s2, b1, b2 = mod[:, None].unbind(2)
        fused = FUSED_NORM_TRAINING if torch.is_grad_enabled() else self.fused_norm
        x, y = modulated_norm(self.ln, x, s1, b1, *(branch[0], branch_gate(branch)) if branch else (), fused=fused)
        a = self.attn(y, lengths, pattern, cache, backend)
        if fused:   # drop_path(a * g1) == a * drop_path(g1): one keep factor per sample, the same draws
            x, y = modulated_norm(self.ln, x, s2, b2, a, self.drop_path(g1), fused=True)
        else:
            x, y = modulated_norm(self.ln, x + self.drop_path(a * g1), s2, b2)
        h = self.drop_path(self.ffn(y))   # (drop_path(h) * g2 == drop_path(h * g2))
        return (x, (h, mod)) if defer else x + h * g2


class AdaLNHead(nn.Module):
    """``LN(x) * (1 + scale) + shift`` with (scale, shift) from ``Linear(SiLU(cond))``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.ln = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    chunks = 2
    fused_norm = False   # as AdaLNBlock's
    mod_offset: Optional[int] = None

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """``ada_lin(cond)`` as ``[B, 2, C]`` (scale, shift)."""
        return self.ada_lin(cond).view(-1, self.chunks, self.dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, branch: Optional[Branch] = None) -> torch.Tensor:
        """``cond``: the class condition ``[B, C]``, or this head's modulation ``[B, 2, C]``; ``branch``: the last
        block's residual branch, added first (:meth:`AdaLNBlock.forward`'s ``defer``)."""
        scale, shift = (self.modulation(cond) if cond.dim() == 2 else cond)[:, None].unbind(2)
        fused = FUSED_NORM_TRAINING if torch.is_grad_enabled() else self.fused_norm
        return modulated_norm(self.ln, x, scale, shift, *(branch[0], branch_gate(branch)) if branch else (),
                              fused=fused)[1]


def modulation_for(module: nn.Module, cond: torch.Tensor) -> torch.Tensor:
    """What ``module`` (an :class:`AdaLNBlock` or :class:`AdaLNHead`) takes as its condition.

    ``cond`` is either the class condition ``[B, C]`` (passed on: the module computes its modulation, as in
    training) or a packed ``[B, K, C]`` tensor of the modulations of every AdaLN module of a model
    (``precompute_condition`` of the transformers), of which this module's ``chunks`` rows start at its
    ``mod_offset``. The modulation depends on the class only, so sampling computes it once per call instead of
    once per pass; slicing here, outside the module, keeps the module's code free of its offset, so one compiled
    block serves every block (``hmar.accel.compile_blocks``)."""
    if cond.dim() == 2:
        return cond
    return cond[:, module.mod_offset:module.mod_offset + module.chunks]
