"""FP8 training for the blocks' GEMMs (opt-in, ``hmar train --fp8``): the tensorwise recipe of torchao's float8
training, written for hmar's four block linears.

:func:`to_float8_training` turns each AdaLN block's ``mat_qkv``, ``proj``, ``fc1`` and ``fc2`` into a
:class:`Float8TrainingLinear` in place: the same module with the same fp32 parameters (the state dict, the
optimiser and the checkpoints are unchanged; a model trained this way saves and samples as any other), whose
training forward multiplies in fp8:

* forward ``y = x @ W.T``: ``x`` and ``W`` as e4m3 with one scale per tensor (its absolute maximum / 448);
* backward ``dx = dy @ W`` and ``dW = dy.T @ x``: ``dy`` as e5m2 (its wider range, max 57344) with one scale,
  the saved e4m3 ``x`` and ``W`` reused (so each of these layers keeps half the activation bytes of bf16).

``torch._scaled_mm`` multiplies, applies both scales to its fp32 accumulator and writes the autocast dtype
(``dW``: the weight's fp32). On Hopper GPUs its e4m3 / e5m2 GEMMs run at up to twice the bf16 rate; under
torch.compile inductor fuses each absolute maximum and cast into the kernels around it. The bias is added as an
ordinary op. Without gradients (validation, the sample grids) and for shapes ``_scaled_mm`` does not take (a
dimension that is not a multiple of 16, e.g. batch x tokens), the layer is a plain ``nn.Linear``.

Scaling per tensor is the fastest of torchao's recipes and the least exact: one outlier sets the scale of the
whole tensor. BENCHMARKS.md 2i and 2j measure the speed on an H100: at hmar-d30 (width 1920) the step is 1.09x
faster than bf16's; at width 1024 the casts and the backward's transposed copies cost more than the fp8 GEMMs save
(hmar-d16 0.93x, hmar-d16-512 0.96x), while the peak memory is up to 18 % lower. ``tests/test_fp8_training.py``
checks the products against the rounded operands and training against bf16."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8 import E4M3, E4M3_MAX, block_linears, check_supported

E5M2 = torch.float8_e5m2
E5M2_MAX = 57344.0   # torch.finfo(torch.float8_e5m2).max
_KEEP = object()     # Float8TrainingLinear.forward's "use my own bias"
TRAIN_INSTEAD = "train in bf16 instead (leave --fp8 off)"


def quantize_tensor(x: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` in the fp8 ``dtype`` (e4m3 or e5m2) with one fp32 scale for the whole tensor: ``(q, scale)``,
    ``q * scale ~ x``, ``scale`` a 0-d tensor (the largest magnitude maps to the format's largest value)."""
    top = E4M3_MAX if dtype == E4M3 else E5M2_MAX
    xf = x.float()
    scale = xf.abs().amax().clamp(min=1e-12) / top
    return (xf / scale).clamp(-top, top).to(dtype), scale


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column (what ``_scaled_mm`` needs of its second operand)."""
    return t.t().contiguous().t()


def _mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * sa) @ (b * sb)`` of two fp8 matrices, ``a`` row-major, ``b`` column-major."""
    return torch._scaled_mm(a, b, sa, sb, out_dtype=out_dtype)


class _Float8MatMul(torch.autograd.Function):
    """``x @ W.T`` with fp8 operands in the forward and the backward (the module's doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        xq, sx = quantize_tensor(x, E4M3)
        wq, sw = quantize_tensor(weight, E4M3)
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.dtype, weight.dtype, out_dtype
        return _mm(xq, sx, wq.t(), sw, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        gq, sg = quantize_tensor(dy, E5M2)
        dx = dw = None   # (a frozen weight, e.g. stage 2's stage-1 blocks: no dW)
        if ctx.needs_input_grad[0]:
            dx = _mm(gq, sg, _col_major(wq), sw, ctx.out_dtype).to(ctx.x_dtype)                 # [M, N] @ [N, K]
        if ctx.needs_input_grad[1]:
            dw = _mm(gq.t().contiguous(), sg, _col_major(xq), sx, torch.float32).to(ctx.w_dtype)  # [N, M] @ [M, K]
        return dx, dw, None


def fp8_shapes_ok(rows: int, in_features: int, out_features: int) -> bool:
    """Whether ``_scaled_mm`` takes this layer's three GEMMs: every dimension (rows = batch x tokens, the inner
    dimension of ``dW``'s product) a multiple of 16."""
    return rows % 16 == 0 and in_features % 16 == 0 and out_features % 16 == 0


class Float8TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward and backward multiply in fp8 (the module's doc); the same
    parameters and state dict. Made by :func:`to_float8_training` (which changes a layer's class in place)."""

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = _KEEP) -> torch.Tensor:  # type: ignore
        """``x @ W.T + bias`` (``bias``: overrides the layer's own; None: none)."""
        bias = self.bias if bias is _KEEP else bias
        x2 = x.reshape(-1, self.in_features)
        if not (torch.is_grad_enabled() and fp8_shapes_ok(x2.shape[0], self.in_features, self.out_features)):
            return F.linear(x, self.weight, bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        y = _Float8MatMul.apply(x2, self.weight, out_dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def to_float8_training(model: nn.Module) -> int:
    """Make every AdaLN block's ``mat_qkv``, ``proj``, ``fc1`` and ``fc2`` a :class:`Float8TrainingLinear` in place
    (the class changes; parameters, hooks and state dict stay). Call it before compiling or wrapping the model.
    Returns how many layers changed. Raises on a device without fp8 GEMMs."""
    check_supported(next(model.parameters()).device, TRAIN_INSTEAD)
    changed = 0
    for _, _, layer in block_linears(model):
        if type(layer) is nn.Linear:
            layer.__class__ = Float8TrainingLinear
            changed += 1
    return changed
