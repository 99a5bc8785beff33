"""FP8 inference for the blocks' GEMMs (opt-in): e4m3 weights, activations quantised per token on the fly.

:func:`to_float8` swaps each AdaLN block's four big linears (``mat_qkv``, ``proj``, ``fc1``, ``fc2``: all but a
few MB of a model's matmul weights) for :class:`Float8Linear`. A weight keeps one fp32 scale per output channel
(its row's absolute maximum / 448, the largest e4m3 value); each input row (token) gets its own scale the same way
at every call, and ``torch._scaled_mm`` multiplies the two e4m3 matrices and applies both scales and the bias to
its fp32 accumulator (on Hopper GPUs at twice the bf16 rate; the CPU build runs it too, for tests). The output
head, the AdaLN ``ada_lin`` layers and the embeddings stay as they are.

Inference only (``_scaled_mm`` has no backward), and a one-way conversion: the fp8 weights replace the originals
in memory, and the converted model's state dict has other keys (``weight_fp8``, ``weight_scale``). Convert a
loaded model right before sampling (:class:`hmar.accel.GraphedModel`'s ``fp8``, ``hmar sample --fast --fp8``).
With the blocks compiled (``--compile``), torch.compile fuses each row's quantisation into the LayerNorm or GELU
kernel before it; eager, it costs a few small kernels per layer. BENCHMARKS.md measures its speed and its error
against bf16."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0   # torch.finfo(torch.float8_e4m3fn).max
_KEEP = object()   # Float8Linear.forward's "use my own bias"
LAYERS = ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2")   # the linears of an AdaLN block that to_float8 converts


def quantize_rows(x: torch.Tensor):
    """``x`` ([M, K]) as e4m3 with one fp32 scale per row: ``(q, scale)``, ``q * scale ~ x``, ``scale`` [M, 1]."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """An ``nn.Linear`` for inference with its weight in e4m3 (one scale per output channel) and its input quantised
    per row at each call. ``fast_accum``: ``_scaled_mm``'s faster, less exact accumulation on Hopper.

    The fp8 weight is kept as its uint8 bytes, so that ``model.to(dtype)`` (which converts every floating point
    tensor, fp8 included) leaves it alone; the output has the input's dtype."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fast_accum = linear.in_features, linear.out_features, fast_accum
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight_fp8", (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8))
        self.register_buffer("weight_scale", scale[None].contiguous())   # [1, N] fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 ([N, K]): what the original weight rounded to."""
        return self.weight_fp8.view(E4M3).float() * self.weight_scale.float().t()

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = _KEEP) -> torch.Tensor:   # type: ignore
        """``x @ W.T + bias``; ``bias`` overrides the layer's own (None: none)."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Float8Linear is for inference (torch._scaled_mm has no backward): run the model "
                               "under torch.no_grad(), or train the model before hmar.model.fp8.to_float8")
        bias = self.bias if bias is _KEEP else bias
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        dtype = torch.bfloat16 if x.is_cuda else x.dtype   # CUDA's row-wise scaled GEMM writes bf16 only
        out = torch._scaled_mm(q, self.weight_fp8.view(E4M3).t(), scale, self.weight_scale.float(),
                               bias=None if bias is None else bias.to(dtype), out_dtype=dtype,
                               use_fast_accum=self.fast_accum)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, fast_accum={self.fast_accum}"


def linear(layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``layer``'s product with ``x`` plus ``bias`` in place of the layer's own: an ``nn.Linear``'s weight through
    ``F.linear``; any other layer (a :class:`Float8Linear`) is called as ``layer(x, bias)``."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, layer.weight, bias)
    return layer(x, bias)


def supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device``: the CPU, or a CUDA GPU of compute capability 8.9 or more
    (Ada, Hopper and later)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def to_float8(model: nn.Module, fast_accum: bool = False) -> int:
    """Swap every AdaLN block's ``mat_qkv``, ``proj``, ``fc1`` and ``fc2`` for :class:`Float8Linear` in place
    (see the module's doc). Layers whose sizes are not multiples of 16 (which ``_scaled_mm`` needs) stay.
    Returns how many layers were converted. Raises on a device without fp8 GEMMs."""
    from .blocks import AdaLNBlock
    device = next(model.parameters()).device
    if not supported(device):
        raise ValueError(f"to_float8: {device} has no fp8 GEMMs (torch._scaled_mm needs compute capability 8.9+, "
                         f"e.g. an H100 / H200 / L4 / RTX 40xx); sample in bf16 instead (leave fp8 off)")
    converted = 0
    for block in (m for m in model.modules() if isinstance(m, AdaLNBlock)):
        for path in LAYERS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, name)
            if isinstance(layer, nn.Linear) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
                setattr(parent, name, Float8Linear(layer, fast_accum).to(device))
                converted += 1
    return converted
