"""The Triton kernel of :func:`hmar.model.fp8.quantize_rows`: one row per program, read once (with the tanh GELU
applied first for fc2's input), its absolute maximum, the row scaled to +-448 and rounded to e4m3, and its scale.
Registered as the custom op ``hmar::fp8_quantize_rows`` so that torch.compile keeps it as one call. Imported by
:mod:`hmar.model.fp8` when the first fp8 layer is built; under ``TRITON_INTERPRET=1`` it runs on CPU tensors
(tests), storing fp32 that torch rounds to e4m3 (the interpreter's own fp8 rounding is wrong)."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from .fp8 import E4M3

# Triton decides at decoration time whether its kernels run in the CPU interpreter (see hmar.attention.triton_kernel)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or (_INTERPRETED and device.type == "cpu")


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, N, stride, GELU: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: (GELU,) its absolute maximum, the row scaled to +-448 and rounded to e4m3."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=keep, other=0.0).to(tl.float32)
    if GELU:   # tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / 448.0
    y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    if FP8:
        tl.store(q_ptr + row * N + cols, y.to(tl.float8e4nv), mask=keep)
    else:   # the CPU interpreter rounds to fp8 wrongly: fp32 out, rounded by torch below
        tl.store(q_ptr + row * N + cols, y, mask=keep)
    tl.store(s_ptr + row, scale)


def quantize_with_kernel(x: torch.Tensor, gelu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of ``x`` ([M, K], last dim contiguous or copied so) as :func:`hmar.model.fp8.quantize_ops`."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, N = x.shape
    fp8 = not _INTERPRETED
    q = torch.empty((M, N), dtype=E4M3 if fp8 else torch.float32, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(N)
    _quantize_kernel[(M,)](x, q, scale, N, x.stride(0), GELU=gelu, FP8=fp8, BLOCK=block,
                           num_warps=1 if _INTERPRETED else max(1, min(16, block // 512)))
    return (q if fp8 else q.to(E4M3)), scale


def _register_op() -> None:
    from torch.library import custom_op
    if hasattr(torch.ops.hmar, "fp8_quantize_rows"):
        return   # module imported again (a test's copy): the op calls the first one's kernel

    @custom_op("hmar::fp8_quantize_rows", mutates_args=())
    def _op(x: torch.Tensor, gelu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return quantize_with_kernel(x, gelu)

    @_op.register_fake
    def _(x, gelu):
        return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


_register_op()
