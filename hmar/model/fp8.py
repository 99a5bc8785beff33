"""FP8 inference for the blocks' GEMMs (opt-in): e4m3 weights, activations quantised per token on the fly.

:func:`to_float8` swaps each AdaLN block's four big linears (``mat_qkv``, ``proj``, ``fc1``, ``fc2``: all but a
few MB of a model's matmul weights) for :class:`Float8Linear`. A weight keeps one fp32 scale per output channel
(its row's absolute maximum / 448, the largest e4m3 value); each input row (token) gets its own scale the same way
at every call, and ``torch._scaled_mm`` multiplies the two e4m3 matrices and applies both scales and the bias to
its fp32 accumulator (on Hopper GPUs at up to twice the bf16 rate; on the CPU, for tests, the same product of the
rounded operands in fp32). FFNs quantise fc2's input and apply the GELU before it in one Triton kernel. The output
head, the AdaLN ``ada_lin`` layers and the embeddings stay as they are.

Inference only (``_scaled_mm`` has no backward), and a one-way conversion: the fp8 weights replace the originals
in memory, and the converted model's state dict has other keys (``weight_fp8``, ``weight_scale``). Convert a
loaded model right before sampling (:class:`hmar.accel.GraphedModel`'s ``fp8``, ``hmar sample --fast --fp8``).
With the blocks compiled (``--compile``), torch.compile fuses the quantisation of the qkv, proj and fc1 inputs into
the LayerNorm + modulation kernel before qkv and fc1, and makes one kernel of its own over the attention output for
proj; eager on CUDA, each quantisation is one launch of the Triton kernel. BENCHMARKS.md section 3n measures the speed and the error against bf16."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0   # torch.finfo(torch.float8_e4m3fn).max
_KEEP = object()   # Float8Linear.forward's "use my own bias"
FAST_ACCUM_MIN_ROWS = 256
"""``fast_accum`` applies to GEMMs of at least this many rows: smaller ones are latency-bound anyway, and on the
H200 (torch 2.11) cuBLAS had no fast-accumulation kernel for one of them (M = 32, K = 7680, N = 1920 with a bias:
hmar-d30's fc2 at the first scale), raising CUBLAS_STATUS_NOT_SUPPORTED."""
LAYERS = ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2")   # the linears of an AdaLN block that to_float8 converts


def quantize_ops(x: torch.Tensor, gelu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` as torch ops (the reference of the Triton kernel)."""
    xf = x.float()
    if gelu:
        xf = F.gelu(xf, approximate="tanh")
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


_UNSET = object()
_KERNEL: Any = _UNSET   # hmar.model.fp8_kernel once imported, None without Triton


def _kernel():
    """:mod:`hmar.model.fp8_kernel` (its import registers the custom op), or None without Triton. Imported when the
    first :class:`Float8Linear` is built, not with hmar: importing hmar does not import Triton."""
    global _KERNEL
    if _KERNEL is _UNSET:
        try:
            from . import fp8_kernel
            _KERNEL = fp8_kernel
        except ImportError:   # pragma: no cover - depends on the machine
            _KERNEL = None
    return _KERNEL


def kernel_available(device: torch.device) -> bool:
    """Whether :func:`quantize_rows` uses the Triton kernel on ``device``: on CUDA, with Triton installed. (On the
    CPU it keeps the torch ops; tests run the kernel itself there under Triton's interpreter.)"""
    return torch.device(device).type == "cuda" and _kernel() is not None


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` ([M, K]; with ``gelu``: its tanh GELU in fp32 first) as e4m3 with one fp32 scale per row:
    ``(q, scale)``, ``q * scale ~ x``, ``scale`` [M, 1].

    With ``gelu`` on CUDA, one Triton kernel reads each row once (inductor makes two passes over rows this long, a
    4x-wider FFN row, at a fraction of the bandwidth); so does every quantisation in eager code on CUDA. Under
    torch.compile the others stay torch ops, which inductor fuses into the LayerNorm kernel before them."""
    if kernel_available(x.device) and (gelu or not torch.compiler.is_compiling()):
        return torch.ops.hmar.fp8_quantize_rows(x, gelu)
    return quantize_ops(x, gelu)


class Float8Linear(nn.Module):
    """An ``nn.Linear`` for inference with its weight in e4m3 (one scale per output channel) and its input quantised
    per row at each call. ``fast_accum``: ``_scaled_mm``'s faster, less exact accumulation on Hopper (in GEMMs of
    at least :data:`FAST_ACCUM_MIN_ROWS` rows).

    The fp8 weight is kept as its uint8 bytes, so that ``model.to(dtype)`` (which converts every floating point
    tensor, fp8 included) leaves it alone; the output has the input's dtype."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fast_accum = linear.in_features, linear.out_features, fast_accum
        _kernel()   # the quantisation op registered before any compile traces a forward
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight_fp8", (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8))
        self.register_buffer("weight_scale", scale[None].contiguous())   # [1, N] fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 ([N, K]): what the original weight rounded to."""
        return self.weight_fp8.view(E4M3).float() * self.weight_scale.float().t()

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = _KEEP,   # type: ignore
                gelu: bool = False) -> torch.Tensor:
        """``x @ W.T + bias`` (``gelu``: ``GELU_tanh(x) @ W.T + bias``, the GELU fused into the quantisation);
        ``bias`` overrides the layer's own (None: none)."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Float8Linear is for inference (torch._scaled_mm has no backward): run the model "
                               "under torch.no_grad(), or train the model before hmar.model.fp8.to_float8")
        bias = self.bias if bias is _KEEP else bias
        q, scale = quantize_rows(x.reshape(-1, self.in_features), gelu)
        if x.is_cuda:   # (its row-wise scaled GEMM writes bf16 only)
            out = torch._scaled_mm(q, self.weight_fp8.view(E4M3).t(), scale, self.weight_scale.float(),
                                   bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                                   use_fast_accum=self.fast_accum and q.shape[0] >= FAST_ACCUM_MIN_ROWS)
        else:   # the same product of the rounded operands in fp32 (CPU builds before torch 2.13 scale per tensor only)
            out = (q.float() * scale) @ self.dequantized_weight().t()
            out = out if bias is None else out + bias.float()
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, fast_accum={self.fast_accum}"


def linear(layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``layer``'s product with ``x`` plus ``bias`` in place of the layer's own: an ``nn.Linear``'s weight through
    ``F.linear``; any other layer (a :class:`Float8Linear`, a
    :class:`hmar.model.fp8_training.Float8TrainingLinear`) is called as ``layer(x, bias)``."""
    if type(layer) is nn.Linear:
        return nn.functional.linear(x, layer.weight, bias)
    return layer(x, bias)


def supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device``: the CPU, or a CUDA GPU of compute capability 8.9 or more
    (Ada, Hopper and later)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_supported(device: torch.device, instead: str) -> None:
    """Raise ValueError (saying to ``instead``) unless :func:`supported`."""
    if not supported(device):
        raise ValueError(f"{device} has no fp8 GEMMs (torch._scaled_mm needs compute capability 8.9+, e.g. an H100 "
                         f"/ H200 / L4 / RTX 40xx); {instead}")


def to_float8(model: nn.Module, fast_accum: bool = False) -> int:
    """Swap every AdaLN block's ``mat_qkv``, ``proj``, ``fc1`` and ``fc2`` for :class:`Float8Linear` in place
    (see the module's doc). Layers whose sizes are not multiples of 16 (which ``_scaled_mm`` needs) stay.
    Returns how many layers were converted. Raises on a device without fp8 GEMMs."""
    device = next(model.parameters()).device
    check_supported(device, "sample in bf16 instead (leave fp8 off)")
    converted = 0
    for parent, name, layer in block_linears(model):
        if isinstance(layer, nn.Linear) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
            setattr(parent, name, Float8Linear(layer, fast_accum).to(device))
            converted += 1
    return converted


def block_linears(model: nn.Module):
    """``(parent, name, layer)`` of each of :data:`LAYERS` in every AdaLN block of ``model``."""
    from .blocks import AdaLNBlock
    for block in (m for m in model.modules() if isinstance(m, AdaLNBlock)):
        for path in LAYERS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            yield parent, name, getattr(parent, name)
