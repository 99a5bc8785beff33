"""Fast sampling on CUDA: bf16 weights, CUDA-graph replay of every per-scale pass, a fast decoder.

HMAR's inference passes have static shapes (one scale's tokens, no growing cache), and VAR's do too
with the preallocated :class:`~hmar.model.blocks.KVCache`; so each (pass kind, scale) is captured
once as a CUDA graph and replayed, removing the per-kernel launch cost that dominates small scales.
Token sampling (top-k/top-p/multinomial with the user's generator) stays eager, so seeds behave as
in :func:`hmar.sampling.sample`. Use :func:`accelerate` on a pipeline, or wrap by hand::

    fast = GraphedModel(model.to(torch.bfloat16))
    out = sample(fast, FastDecoder(tokenizer), labels, ...)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn


class GraphedModel:
    """A drop-in stand-in for an HMAR / VAR model inside :func:`hmar.sampling.sample` that replays
    CUDA graphs of ``next_scale_logits`` / ``masked_logits`` (one graph per input shape)."""

    def __init__(self, model: nn.Module, warmup: int = 1):
        if not model.device.type == "cuda":
            raise ValueError("GraphedModel needs a model on a CUDA device")
        self.model, self.warmup = model, warmup
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._caches: Optional[List[Any]] = None
        if hasattr(model, "masked_logits"):
            self.masked_logits = self._masked_logits

    def __getattr__(self, name: str) -> Any:  # embeddings, config, class_emb, device, ...
        return getattr(self.model, name)

    def new_caches(self):
        if not getattr(self.model, "kv_cache", False):
            return None
        if self._caches is None:
            self._caches = self.model.new_caches()
        for c in self._caches:
            c.reset()
        return self._caches

    def _run(self, kind: str, fn: Callable, x: torch.Tensor, cond: torch.Tensor, caches) -> torch.Tensor:
        if caches and caches[0].k is not None and caches[0].k.shape[0] != x.shape[0]:
            self._graphs.clear()  # a new batch size: graphs and cache buffers are rebuilt
            for c in caches:
                c.k = c.v = None
        start = caches[0].len if caches else 0
        key = (kind, tuple(x.shape), tuple(cond.shape), start)
        entry = self._graphs.get(key)
        if entry is None:
            sx, sc = x.clone(), cond.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn(sx, sc, caches) if caches is not None else fn(sx, sc)
                    if caches:
                        for c in caches:
                            c.len = start
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                so = fn(sx, sc, caches) if caches is not None else fn(sx, sc)
            entry = self._graphs[key] = (graph, sx, sc, so)
        else:
            if caches:  # replaying advances the cache exactly as the captured call did
                for c in caches:
                    c.len = start + x.shape[1]
        graph, sx, sc, so = entry
        sx.copy_(x)
        sc.copy_(cond)
        graph.replay()
        return so

    def next_scale_logits(self, x: torch.Tensor, cond: torch.Tensor, caches=None) -> torch.Tensor:
        return self._run("ns", self.model.next_scale_logits, x, cond, caches)

    def _masked_logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._run("mask", self.model.masked_logits, x, cond, None)

    def reset(self) -> None:
        """Drop every captured graph and cache (e.g. before changing the batch size)."""
        self._graphs.clear()
        self._caches = None


class FastDecoder(nn.Module):
    """The tokenizer's decoder in bf16 (``dtype``) + channels_last, optionally compiled; same interface as VQVAE
    for :func:`hmar.sampling.sample` (``quantize`` and ``fhat_to_img`` are what it uses).
    ``channels_last=False`` keeps the default memory format (``bench_sample.py --decode-only`` compares both).

    ``mode`` is torch.compile's; the default (None) compiles in about a minute. ``"max-autotune-no-cudagraphs"``
    benchmarks every conv/matmul choice: on the H200 that took over 4 minutes for one 256 px decoder."""

    def __init__(self, tokenizer: nn.Module, dtype: torch.dtype = torch.bfloat16, compile: bool = True,
                 mode: Optional[str] = None, channels_last: bool = True):
        super().__init__()
        self.tokenizer = tokenizer
        self.quantize = tokenizer.quantize
        self.config = tokenizer.config
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.post_quant_conv = tokenizer.post_quant_conv
        self.dec = tokenizer.decoder.to(dtype=dtype, memory_format=self.memory_format)
        self.post_quant_conv.to(dtype=dtype, memory_format=self.memory_format)
        self._decode = self._decode_eager
        if compile:
            self._decode = torch.compile(self._decode_eager, mode=mode, dynamic=False)

    def _decode_eager(self, f_hat: torch.Tensor) -> torch.Tensor:
        z = f_hat.to(self.dtype).contiguous(memory_format=self.memory_format)
        return self.dec(self.post_quant_conv(z)).float().clamp(-1, 1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self._decode(f_hat)

    def set_patch_nums(self, patch_nums) -> None:
        self.tokenizer.set_patch_nums(patch_nums)


def accelerate(pipe, dtype: torch.dtype = torch.bfloat16, graphs: bool = True, compile_decoder: bool = True):
    """Make a CUDA :class:`~hmar.pipeline.HMARPipeline` fast in place: bf16 transformer with CUDA-graph
    replay of its passes, bf16/channels_last (compiled) decoder. Returns the pipeline."""
    if pipe.device.type != "cuda":
        return pipe
    pipe.model.to(dtype)
    if graphs:
        pipe.model = GraphedModel(pipe.model)
    pipe.tokenizer = FastDecoder(pipe.tokenizer, dtype, compile_decoder)
    return pipe
