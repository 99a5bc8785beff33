"""Output head + weighted cross-entropy, computed in chunks of tokens.

The plain training path computes ``logits = head(h).float()`` (``[B, L, V]`` in fp32: 356 MB for hmar-d16 at
batch 32, plus the same again for ``log_softmax``'s saved output and for the gradient) and then the CE.
:func:`linear_cross_entropy` computes the same loss

    ``loss = sum_n coef[n] * CE(h[n] @ W^T + b, target[n])``

one chunk of tokens at a time, so only a ``[chunk, V]`` block of logits exists at any moment, in the forward
and in the backward. Nothing of size ``[N, V]`` is saved for the backward: it keeps ``h`` (in the matmul dtype),
the weights, the targets, the coefficients and one fp32 log-sum-exp per token, and recomputes each chunk's
logits from them (one extra ``[chunk, C] x [C, V]`` matmul per chunk, about 1/3 of the head's FLOPs, which are
~1 % of a d16 step).

Numerics follow the plain path op for op: the logits are the matmul in the autocast dtype (bf16/fp16; fp32
without autocast), widened to fp32; the softmax, the CE and ``dlogits = grad * coef * (softmax - onehot)`` are
fp32; ``dlogits`` is rounded to the matmul dtype before the two gradient matmuls, as the backward of
``.float()`` does. Differences: ``dW`` and ``db`` are accumulated over chunks in fp32 (the plain path rounds the
single ``dW`` matmul to bf16 once), so in fp32 the two paths agree to rounding (tests: 1e-5), and in bf16 the
chunked one is, if anything, the more accurate. Because the gradient is recomputed in the backward with the
incoming gradient (which holds the GradScaler's scale under fp16), loss scaling behaves exactly as in the plain
path.

``coef`` holds every normalisation (stage 1: the per-token scale weight / B; stage 2: mask / number of masked
tokens, or mask / (masked tokens of the image * B)), see :func:`hmar.training.losses.loss_coefficients`.
The function also returns, without gradient, the per-token CE (with label smoothing, as ``F.cross_entropy``
reports it) and the per-token argmax, for the training metrics.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# fp32 logits per chunk: 2**25 elements (128 MiB) -> 8192 tokens at a 4096-token vocabulary
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def default_chunk(vocab: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: ``elements / vocab``, rounded down to a multiple of 256 (at least 256)."""
    return max(256, (elements // max(vocab, 1)) // 256 * 256)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of one chunk: the matmul in the dtype of ``h``/``w``, widened afterwards."""
    out = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    return out.float()


def _smoothed_ce(logits: torch.Tensor, lse: torch.Tensor, tgt: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``F.cross_entropy(..., label_smoothing=smoothing, reduction='none')`` from the log-sum-exp."""
    ce = lse - logits.gather(1, tgt[:, None])[:, 0]
    if smoothing > 0:
        ce = (1 - smoothing) * ce + smoothing * (lse - logits.mean(1))
    return ce


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, coef, dtype, chunk, smoothing):
        # h [N, C] (any float dtype), weight [V, C], bias [V] or None, target [N] int64, coef [N] fp32
        N = h.shape[0]
        hc = h.to(dtype)
        wc = weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        pred = torch.empty(N, dtype=torch.long, device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = _chunk_logits(hc[s:e], wc, bc)
            m = torch.logsumexp(z, 1)
            lse[s:e] = m
            ce[s:e] = _smoothed_ce(z, m, target[s:e], smoothing)
            pred[s:e] = z.argmax(1)
        loss = (ce * coef).sum()
        ctx.save_for_backward(hc, wc, bc if bc is not None else hc.new_empty(0), target, coef, lse)
        ctx.has_bias = bias is not None
        ctx.chunk, ctx.smoothing = chunk, smoothing
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(ce, pred)
        return loss, ce, pred

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_pred):
        hc, wc, bc, target, coef, lse = ctx.saved_tensors
        bc = bc if ctx.has_bias else None
        N, V = hc.shape[0], wc.shape[0]
        chunk, eps = ctx.chunk, ctx.smoothing
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty(hc.shape, dtype=ctx.h_dtype, device=hc.device) if need_h else None
        dw = torch.zeros(wc.shape, dtype=torch.float32, device=wc.device) if need_w else None
        db = torch.zeros(V, dtype=torch.float32, device=wc.device) if (need_b and bc is not None) else None
        gc = coef * g_loss.float()                                   # d loss / d CE_n
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = _chunk_logits(hc[s:e], wc, bc)
            g = gc[s:e]
            d = torch.exp(z - lse[s:e, None]) * g[:, None]           # g * softmax
            d.scatter_add_(1, target[s:e, None], (g * -(1 - eps))[:, None])
            if eps > 0:
                d -= (g * (eps / V))[:, None]
            dl = d.to(hc.dtype)                                      # as the backward of .float() rounds it
            if need_h:
                dh[s:e] = torch.mm(dl, wc).to(ctx.h_dtype)
            if need_w:
                dw += torch.mm(dl.t(), hc[s:e]).float()
            if db is not None:
                db += dl.float().sum(0)
        return (dh, dw.to(ctx.w_dtype) if dw is not None else None,
                db.to(ctx.b_dtype) if db is not None else None, None, None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                         coef: torch.Tensor, label_smoothing: float = 0.0, chunk: Optional[int] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum(coef * CE(h @ weight^T + bias, target))`` without materialising the logits.

    ``h`` ``[..., C]``, ``target`` and ``coef`` ``[...]`` (the same leading shape). The matmuls run in the
    autocast dtype when autocast is on for ``h``'s device (as ``nn.Linear`` would), else in ``h``'s dtype.
    Returns ``(loss, ce, pred)``: the scalar loss (differentiable w.r.t. ``h``, ``weight`` and ``bias``), and,
    detached, the per-token CE ``[...]`` (fp32) and argmax ``[...]`` (int64).
    """
    lead = h.shape[:-1]
    if target.shape != lead or coef.shape != lead:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, target {tuple(target.shape)} and coef "
                         f"{tuple(coef.shape)} must share the leading shape")
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(h.dtype, weight.dtype)
    V = weight.shape[0]
    chunk = int(chunk) if chunk else default_chunk(V)
    loss, ce, pred = _LinearCE.apply(h.reshape(-1, h.shape[-1]), weight, bias, target.reshape(-1).long(),
                                     coef.reshape(-1).float(), dtype, chunk, float(label_smoothing))
    return loss, ce.view(lead), pred.view(lead)


__all__ = ["linear_cross_entropy", "default_chunk", "DEFAULT_CHUNK_ELEMENTS"]
