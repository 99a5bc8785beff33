"""A Triton GEMM for the sampler's small passes (an experiment, off by default): ``y = x @ W.T + bias`` (optionally
the tanh GELU of it) for inputs of few rows.

The passes over the first scales multiply 32-1,152 rows (2 x batch x tokens) by each block's weights. There the GEMMs
are bound by reading the weights (8 MB for hmar-d16's fc1, 29 MB for hmar-d30's), and cuBLAS takes about 8.7 us at
M = 32, K = 1024, N = 4096 (the performance issue's figure) where the bytes take about 2 us. This kernel gives every
program a narrow block of output columns (and so of weight rows) and the whole K loop, so that there are enough
programs to stream the weight at the memory's rate; the bias and GELU are applied to the fp32 accumulator as
cuBLASLt's epilogue does.

:data:`hmar.model.blocks.SKINNY_GEMM_MAX_ROWS` (0: off) routes the blocks' four linears through it in inference for
inputs of at most that many rows (``hmar.model.blocks.dense``). Registered as the custom op ``hmar::skinny_linear``,
so a compiled block keeps it as one call. Autotuned on CUDA over a few tile shapes per (rows bucket, N, K); under
``TRITON_INTERPRET=1`` one small tile runs on CPU tensors (tests). ``benchmarks/bench_skinny.py`` times it against
``F.linear`` at the sampler's shapes."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether its kernels run in the CPU interpreter (see hmar.attention.triton_kernel)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or (_INTERPRETED and device.type == "cpu")


def _configs():
    if _INTERPRETED:
        return [triton.Config({"BN": 16, "BK": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bn in (16, 32, 64) for bk in (64, 128) for w in (4,) for s in (3, 4)]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "GELU", "PRECISION"])
@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, M_BUCKET,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    """One (row block, column block) of the output: the whole K loop, then bias and GELU in fp32."""
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_w + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:   # tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact fp32 products for fp32 unless torch's own matmuls may use TF32; 16-bit inputs
    keep Triton's default (the flag is for fp32 operands)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def skinny_linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         gelu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` (``gelu``: its tanh GELU) for ``x`` ``[..., K]`` and ``weight`` ``[N, K]`` (last dims
    contiguous, or copied so), in ``x``'s dtype. fp32 products are exact fp32 unless
    ``torch.backends.cuda.matmul.allow_tf32`` is on (then TF32, as ``F.linear`` does)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"skinny_linear: x has {K} features but the weight is {tuple(weight.shape)}")
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    if _INTERPRETED and x.dtype != torch.float32:   # the interpreter's bf16 dot is wrong: fp32 in, rounded after
        y = skinny_linear_kernel(x2.float(), weight.float(), None if bias is None else bias.float(), gelu)
        return y.to(x.dtype).view(*x.shape[:-1], N)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        bm = 16 if _INTERPRETED else min(64, max(16, triton.next_power_of_2(M)))
        grid = lambda meta: (triton.cdiv(N, meta["BN"]), triton.cdiv(M, bm))  # noqa: E731
        _skinny_kernel[grid](x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0),
                             weight.stride(0), y.stride(0), triton.next_power_of_2(M),
                             HAS_BIAS=bias is not None, GELU=gelu, PRECISION=_precision(x.dtype), BM=bm)
    return y.view(*x.shape[:-1], N)


def _register_op() -> None:
    from torch.library import custom_op
    if hasattr(torch.ops.hmar, "skinny_linear"):
        return

    @custom_op("hmar::skinny_linear", mutates_args=())
    def _op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
        return skinny_linear_kernel(x, weight, bias, gelu)

    @_op.register_fake
    def _(x, weight, bias, gelu):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


_register_op()
