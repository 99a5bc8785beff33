"""Fast sampling on CUDA: bf16 weights, CUDA-graph replay of the whole token loop, a fast decoder.

HMAR's inference passes have static shapes (one scale's tokens, no growing cache), and VAR's do too
with the preallocated :class:`~hmar.model.blocks.KVCache`; and the sampler's loop
(:func:`hmar.sampling.scale_loop`: passes, guidance, top-k/top-p, the draws, masked steps, the quantiser's
f_hat updates) never waits for the GPU. So the whole loop of one batch size and set of sampling options is
captured once as one CUDA graph and replayed: no kernel launch from Python at all after the first call.
The draws use the user's generator: its state goes into the graph's generator before a replay and
comes back after it, so a seed samples the tokens the wrapped model samples eagerly. Calls the loop graph cannot serve
(editing constraints, a per-pass callback) replay one graph per (pass kind, scale) instead, with eager
sampling in between. Use :func:`accelerate` on a pipeline, or wrap by hand::

    fast = GraphedModel(model.to(torch.bfloat16))
    out = sample(fast, FastDecoder(tokenizer), labels, ...)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .tokenizer import decode_chunk, decode_in_chunks

FAST_DECODE_CHUNK_BYTES = 1536 * 2 ** 20
""":class:`FastDecoder`'s default budget for :func:`~hmar.tokenizer.decode_chunk` (one full-resolution activation of
a decoder call, in bytes): a batch of 16 decodes in one call at 256 and 512 px. With the official tokenizer, the budget
until 2026-12-02 (256 MiB: 2 x 8 images at 256 px) decoded 16 images in 35.8 ms inside the sampler on the H200, one
call in 31.6 ms (with 0.8 GB more memory); at 512 px 147.8 against 119.8 ms (4.7 GB more; BENCHMARKS.md section 3d)."""


MEASURE_SECOND_WARMUP = True
"""Measure a capture's reservation (``reserve_pool``) on a second warm-up run, not the first. The first run of a shape
compiles, lets cuDNN time its algorithms and Triton autotune its kernels, and each of those allocates workspaces (and
Triton's benchmark its 256 MB cache-flush buffer) that no replay needs; the reservation then kept them in the pool."""

POOL_SLACK = 1 / 16
"""The first loop capture of a pool shared with a decoder reserves this much more than the larger of the two needs:
room for the outputs the loop graph keeps alive in that block, so that the decoder's reservation still fits beside
them (see :meth:`GraphedModel._capture_loop`)."""


_CAPTURE_STREAMS: Dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """The one side stream (per GPU) of every warm-up and capture here. cuBLAS keeps a workspace per (handle,
    stream), allocated at the stream's first GEMM: on a stream first used inside a capture it came from that graph's
    private pool, and it pinned the pool's segment (1.16 GB on the H200, hmar-d16) for the life of the process, after
    every graph of the pool was gone (BENCHMARKS.md section 3l). A warm-up on the capture's own stream allocates it
    outside any pool."""
    index = torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream()
    return _CAPTURE_STREAMS[index]


FAST_FULL_RES_BYTES = 768 * 2 ** 20
""":class:`FastDecoder`'s default budget for one full-resolution activation of a chunk of its full-resolution part
(bytes): a decoder call of 16 images runs that part whole at 256 px (320 MiB) and in two chunks at 512 px."""


def _on_side_stream(fn: Callable[[], Any], measure: bool = False) -> int:
    """Run ``fn`` (a warm-up before a capture: compiling, autotuning, lazy allocations) on a side stream, ordered
    after and before the current stream's work, as CUDA graph captures want their warm-up. ``measure``: return the
    most memory it held at once beyond what was allocated before (bytes; this resets the process's peak-memory
    statistics), else 0; with :data:`MEASURE_SECOND_WARMUP`, ``fn`` runs twice and the second run is measured. The
    side stream is the captures' own (:func:`_capture_stream`)."""
    side = _capture_stream()

    def run() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
    if not measure:
        run()
        return 0
    if MEASURE_SECOND_WARMUP:
        run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)


def _reserve(nbytes: int, device: torch.device) -> None:
    """Inside a capture: allocate ``nbytes`` as one block of the graph's pool and free it at once. The capture's own
    allocations then split that one segment (and coalesce back when freed) instead of each scale's passes adding
    segments of their sizes: the pool stays near the warm-up's peak. Without it the pools measured 0.76-4.39 GB on the
    H200, several times what a pass holds at once (BENCHMARKS.md section 3d); with it 0.62-2.79 GB (section 3e)."""
    if nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8, device=device)


def _capture(warm: Callable[[], Any], run: Callable[[], Any], pool, device: torch.device, reserve: bool = False,
             generator: Optional[torch.Generator] = None, need: Optional[int] = None,
             at_least: int = 0) -> Tuple[torch.cuda.CUDAGraph, Any]:
    """``warm()`` on a side stream, then ``run()`` captured as a CUDA graph in ``pool``, first reserving the warm-up's
    peak (at least ``at_least`` bytes) as one pool block when ``reserve`` (:func:`_reserve`); ``need``: that peak as
    measured before (the warm-up ran then: it is skipped). ``generator`` is registered with the graph (a replay
    draws from whatever state it holds then). Returns (graph, what ``run`` returned: the graph's static outputs);
    the graph's ``need`` and ``reserved`` attributes hold the warm-up's peak and the bytes reserved."""
    if need is None:
        need = _on_side_stream(warm, measure=reserve)
    graph = torch.cuda.CUDAGraph()
    graph.need, graph.reserved = need, max(need, at_least) if reserve else 0
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool, stream=_capture_stream()):
        _reserve(graph.reserved, device)
        out = run()
    return graph, out


def _capture_failed(what: str, e: Exception, instead: str) -> None:
    """Say that ``what`` could not be captured (an op a capture cannot take) and what runs ``instead``."""
    import warnings
    warnings.warn(f"hmar: {what} could not be captured as a CUDA graph ({type(e).__name__}: {e}); {instead}")
    torch.cuda.synchronize()


COMPILE_RECOMPILE_LIMIT = 64
"""The compiled entries dynamo may keep per code object, at least (:func:`compile_blocks` raises
``torch._dynamo.config.recompile_limit`` to it). Every block of every model shares one code object
(``AdaLNBlock.forward``), and each model width (its weights' shapes are static), the one-token scale and each side of
the fused-normalisation token limit is an entry of its own. With dynamo's default of 8 entries, the blocks of a
model compiled after a few others in one process ran eagerly, with a warning only: on the H200, hmar-d16 tokens took
45.0 instead of about 33.5 ms after two hmar-d30 variants in one process (BENCHMARKS.md section 3j)."""


def compile_blocks(model: nn.Module, mode: Optional[str] = None, backend: Union[str, Callable] = "inductor",
                   dynamic: Optional[bool] = True) -> nn.Module:
    """``torch.compile`` every AdaLN block and head of ``model`` in place (regional compilation), with dynamic
    shapes. Inductor fuses each block's elementwise work (LayerNorm + modulation, q/k normalisation, gating,
    residuals, GELU), which eager runs as about 35 kernels per block around its 4 GEMMs and attention. All blocks
    share one compiled code (the model hands each block its own modulation rows: no per-block constant in the
    traced code), so the compile time does not grow with depth, and one compile serves every scale and batch
    size (dynamo specialises sizes of 1, so the one-token scale 0 gets its own). VAR's KV cache works too: its
    fill level is traced as a symbol, plus one graph for the last scale, where the cache is full. Returns
    ``model``. ``backend``: torch.compile's (e.g. ``"eager"`` to check tracing alone). Raises dynamo's recompile
    limit to :data:`COMPILE_RECOMPILE_LIMIT` (a process-wide setting), so that the blocks of many models compiled
    in one process all stay compiled. ``dynamic``: torch.compile's (training passes None: its shapes are fixed, so
    the kernels are compiled for them; ``hmar train --compile-scope blocks``)."""
    from .model.blocks import AdaLNBlock, AdaLNHead
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"   # (torch < 2.7)
    setattr(cfg, limit, max(getattr(cfg, limit), COMPILE_RECOMPILE_LIMIT))
    for m in model.modules():
        if isinstance(m, (AdaLNBlock, AdaLNHead)):
            m.compile(dynamic=dynamic, mode=mode, backend=backend)
    return model


FUSED_QK_NORM_MAX_TOKENS: Optional[int] = 256
""":class:`GraphedModel` normalises q and k inside the Triton attention kernel in the passes over at most this many
tokens (None: every pass), and as ops of their own before cuDNN's attention in the longer ones. On the H200
(BENCHMARKS.md section 3g, batch 16, guidance; token times against the normalisation as ops in every pass, the same
process): hmar-d16 1.09x, hmar-d30 1.05x (all their passes are within 256 tokens), hmar-d16-512 1.08x and 1.10x (the
two orders), hmar-d30-512 1.06x; fusing every pass instead was 0.89-0.91x at hmar-d16-512 and 0.98x / 1.06x (two
sessions) at hmar-d30-512, where this limit was 1.08x faster in the same run (cuDNN's forward is faster on long dense
passes, section 3g's profile and kernel sweep). With the inference kernel of 2026-12-03 (section 3k), fusing every
pass was still 0.96-0.98x at 512 px, in both orders."""


def fuse_qk_norm_by_default() -> bool:
    """Whether :class:`GraphedModel` fuses the q/k normalisation into the attention kernel when not told: whenever
    the Triton kernel is importable (in the passes :data:`FUSED_QK_NORM_MAX_TOKENS` allows)."""
    from . import attention as A
    A._maybe_load_triton()
    return "triton" in A._QK_NORM_BACKENDS


class GraphedModel:
    """A drop-in stand-in for an HMAR / VAR model inside :func:`hmar.sampling.sample` that replays CUDA graphs:
    of the whole sampling loop (:meth:`run_loop`), or of each pass (``next_scale_logits`` / ``masked_logits``, one
    graph per input shape).

    ``compile=True`` first compiles the model's blocks in place (:func:`compile_blocks`), so the graphs capture the
    compiled kernels; the first call then also compiles (once for all scales).

    ``whole_loop=True`` (default): :func:`hmar.sampling.sample` hands its whole scale loop to :meth:`run_loop`,
    which captures it as one graph per batch size and options, keeping the ``max_loops`` most recently used
    (a UI that changes the guidance scale on every call would otherwise collect graphs without bound; a new
    value costs one capture: an eager warm-up run, then the recording). ``False``: one graph per pass, sampling
    eager between them (what calls with constraints or a callback always get). Not thread-safe: replays share
    their static buffers, so call it from one thread at a time (the web demo serialises its calls).

    ``fused_gelu=True`` (default) sets :attr:`hmar.model.blocks.FFN.fused_gelu` on the model's FFNs: fc1's bias and
    GELU run in the GEMM's epilogue in CUDA inference (the model's own eager no-grad passes too). On the H200 it
    made the compiled hmar-d16 token loop 1.09x faster (35.1 to 32.3 ms, batch 16; BENCHMARKS.md section 3d).

    ``reserve_pool=True`` (default): the loop's capture starts by reserving, as one block of its pool, the most
    memory its warm-up run held at once, so that the pool stays near that size (see :func:`_reserve`), and a
    decoder graph captured in the same pool (:func:`accelerate`) reuses that block. Measuring the warm-up resets
    the process's peak-memory statistics. On the H200, with the decoder graphs, it left the token time unchanged
    (0.99-1.01x) and the memory need (peak + pools) equal or lower in the four configs (BENCHMARKS.md section 3e).
    ``pool_guest`` (set by :func:`accelerate`): the :class:`FastDecoder` whose graphs share the loop's pool. The
    pool's first loop capture first warms the decoder up for its batch (:meth:`FastDecoder.prepare`) and reserves
    the larger of the two needs (plus :data:`POOL_SLACK`), so that one block serves both; a decoder captured after
    the loop into a smaller block would add a segment of its own, and the pool would hold the sum.

    ``fused_qk_norm`` sets :attr:`hmar.model.blocks.SelfAttention.fused_qk_norm` on the model's attention layers:
    True runs the L2 normalisation of q and k inside the Triton attention kernel (those passes through that kernel
    instead of cuDNN's SDPA), False keeps the normalisation as ops of their own, and None (default,
    :func:`fuse_qk_norm_by_default`): on wherever Triton is importable. ``fused_qk_norm_max_tokens`` (default, -1:
    :data:`FUSED_QK_NORM_MAX_TOKENS`, 256; None: no limit) sets
    :attr:`~hmar.model.blocks.SelfAttention.fused_qk_norm_max_tokens`: passes over more tokens than that keep the
    normalisation as ops before cuDNN's attention, which is faster on long dense passes. Both as measured on the
    H200 (BENCHMARKS.md section 3g).

    ``fp8`` (off by default): the blocks' four big linears in e4m3 (:func:`hmar.model.fp8.to_float8`, in place,
    before any compile): per-channel weight scales, per-token input scales, ``torch._scaled_mm`` (Ada / Hopper GPUs).
    Faster GEMMs at an error that BENCHMARKS.md measures against bf16's; the default stays bf16. ``fp8_fast_accum``:
    the GEMMs' faster accumulation (:class:`~hmar.model.fp8.Float8Linear`'s ``fast_accum``).

    ``fused_draw`` sets the model's ``fused_draw``: True draws every pass's tokens in one Triton kernel
    (:func:`hmar.draw_kernel.fused_draw`: the finite check, guidance, temperature, top-k, top-p and the draw,
    reading the head's bf16 logits once) instead of about 25 torch ops over fp32 logits and ``torch.topk``; the
    same Exp(1) draws from the generator, and the same tokens but where the two round a near-tie differently or
    torch.topk keeps exactly k of tied logits. None (default): on wherever Triton is importable, for vocabularies of
    at most :data:`hmar.draw_kernel.MAX_VOCAB` tokens (one program holds a position's whole row). As with
    ``fused_gelu``, the model's own eager sampling follows the switch too.

    ``fused_norm`` sets ``fused_norm`` on the model's AdaLN blocks and head (:func:`hmar.model.blocks.enable_fused_norm`):
    True runs each residual add + LayerNorm + modulation of a pass as one Triton kernel
    (:mod:`hmar.model.norm_kernel`) that reads and writes each row once, instead of inductor's (or eager torch's)
    kernels. None (default): on wherever Triton is importable, unless ``fp8`` (whose compiled blocks fuse the
    quantisation of the qkv and fc1 inputs into inductor's LayerNorm kernels). The model's own eager sampling
    follows the switch too."""

    def __init__(self, model: nn.Module, warmup: int = 1, compile: bool = False, compile_mode: Optional[str] = None,
                 whole_loop: bool = True, max_loops: int = 8, fused_gelu: bool = True, reserve_pool: bool = True,
                 fused_qk_norm: Optional[bool] = None, fused_qk_norm_max_tokens: Optional[int] = -1,
                 fused_draw: Optional[bool] = None, fp8: bool = False, fp8_fast_accum: bool = False,
                 fused_norm: Optional[bool] = None):
        if fused_qk_norm_max_tokens is not None and fused_qk_norm_max_tokens < -1:
            raise ValueError(f"GraphedModel: fused_qk_norm_max_tokens={fused_qk_norm_max_tokens}; use a number of "
                             f"tokens >= 0, None (no limit) or -1 (hmar.accel.FUSED_QK_NORM_MAX_TOKENS)")
        if not model.device.type == "cuda":
            raise ValueError("GraphedModel needs a model on a CUDA device")
        self.fp8 = fp8
        if fp8:   # first: an unsupported GPU fails before anything changed
            from .model.fp8 import to_float8
            to_float8(model, fp8_fast_accum)
        self.model, self.warmup, self.whole_loop, self.max_loops = model, warmup, whole_loop, max_loops
        self.reserve_pool = reserve_pool
        # on the model itself: fc1's bias + GELU in the GEMM epilogue, the q/k normalisation in the attention kernel
        from .model.blocks import FFN, SelfAttention, enable_fused_norm
        self.fused_qk_norm = fuse_qk_norm_by_default() if fused_qk_norm is None else fused_qk_norm
        self.fused_qk_norm_max_tokens = (FUSED_QK_NORM_MAX_TOKENS if fused_qk_norm_max_tokens == -1
                                         else fused_qk_norm_max_tokens)
        from .draw_kernel import available
        triton_runs = available(model.device)   # (the draw kernel's test: Triton imports and runs on this device)
        if fused_draw and not triton_runs:
            raise ValueError("GraphedModel(fused_draw=True) needs Triton (pip install triton); leave it None to use "
                             "the kernel wherever it runs")
        from .draw_kernel import MAX_VOCAB
        auto_draw = triton_runs and model.config.vocab_size <= MAX_VOCAB
        model.fused_draw = self.fused_draw = auto_draw if fused_draw is None else fused_draw
        self.fused_norm = (triton_runs and not fp8) if fused_norm is None else fused_norm
        enable_fused_norm(model, self.fused_norm)
        for m in model.modules():
            if isinstance(m, FFN) and fused_gelu:
                m.fused_gelu = True
            elif isinstance(m, SelfAttention):
                m.fused_qk_norm, m.fused_qk_norm_max_tokens = self.fused_qk_norm, self.fused_qk_norm_max_tokens
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # (batch shape, options) -> (graph, its label buffer, its generator, its outputs), least recently used first
        self._loops: "OrderedDict[Tuple, Tuple[Any, ...]]" = OrderedDict()
        self._loop_pool = torch.cuda.graph_pool_handle()
        self.pool_guest: Optional["FastDecoder"] = None
        self._caches: Optional[List[Any]] = None
        if compile:
            compile_blocks(model, compile_mode)

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
            call = (lambda: fn(sx, sc, caches)) if caches is not None else (lambda: fn(sx, sc))

            def warm():
                for _ in range(self.warmup):
                    call()
                    for c in caches or ():
                        c.len = start
            graph, so = _capture(warm, call, self.pool, x.device)
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

    @property
    def masked_logits(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The graphed masked pass; an AttributeError (so ``hasattr`` is False) for a model without a masked
        branch, as the sampler expects. A property, not an attribute bound in ``__init__``: a bound method stored
        on the instance would make a reference cycle, and the graphs' memory would wait for the cyclic GC."""
        if not hasattr(self.model, "masked_logits"):
            raise AttributeError("masked_logits")
        return self._masked_logits

    def _masked_logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._run("mask", self.model.masked_logits, x, cond, None)

    def run_loop(self, loop: Callable, y: torch.Tensor, gen: torch.Generator, key: Tuple) -> Any:
        """Run ``loop(model, y, gen)`` (:func:`hmar.sampling.scale_loop` with its options bound; ``key`` names
        them) as one CUDA graph: captured on the first call of each batch size and ``key``, replayed after.
        Falls back to per-pass graphs (with a warning, once) if the capture fails, and uses them when
        ``whole_loop`` is off or ``gen`` is not on the model's GPU."""
        if not self.whole_loop or gen.device != self.model.device:
            return loop(self, y, gen)
        k = (tuple(y.shape), key)
        entry = self._loops.get(k)
        if entry is not None:
            self._loops.move_to_end(k)
        else:
            while len(self._loops) >= self.max_loops:
                self._loops.popitem(last=False)          # the least recently used graph and its outputs go
            try:
                entry = self._loops[k] = self._capture_loop(loop, y, gen)
            except Exception as e:  # noqa: BLE001  (an op the capture cannot take: keep working, say so)
                _capture_failed("the sampling loop", e, "replaying one graph per pass instead")
                self.whole_loop = False
                return loop(self, y, gen)
        graph, sy, sgen, outs = entry
        sy.copy_(y)
        sgen.set_state(gen.get_state())      # the user's seed and offset, into the graph's generator
        graph.replay()
        gen.set_state(sgen.get_state())      # ... and the offset the draws advanced, back (as eager sampling does)
        idx, f_hat, passes, bad = outs
        return [t.clone() for t in idx], f_hat.clone(), passes, bad.clone()

    def _capture_loop(self, loop: Callable, y: torch.Tensor, gen: torch.Generator):
        """One eager warm-up run of ``loop`` on a side stream, then its capture with a generator of its own
        (registered with the graph, so a replay draws from whatever state :meth:`run_loop` puts into it)."""
        sy = y.clone()

        def warm():                         # compiles, fills the quantiser's caches, autotunes
            for _ in range(self.warmup):
                g = torch.Generator(device=gen.device)
                g.set_state(gen.get_state())      # the user's generator does not advance
                loop(self.model, sy, g)
        sgen = torch.Generator(device=gen.device)
        at_least = 0
        if self.reserve_pool and self.pool_guest is not None and not self._loops:
            # the pool's first loop capture: a block for the decoder's need too (it fits beside the loop's outputs)
            need = _on_side_stream(warm, measure=True)
            at_least = int(max(need, self.pool_guest.prepare(y.shape[0])) * (1 + POOL_SLACK))
        else:
            need = None
        graph, outs = _capture(warm, lambda: loop(self.model, sy, sgen), self._loop_pool, y.device,
                               self.reserve_pool, sgen, need=need, at_least=at_least)
        return graph, sy, sgen, outs

    def reset(self) -> None:
        """Drop every captured graph and cache (e.g. before changing the batch size)."""
        self._graphs.clear()
        self._loops.clear()
        self._caches = None


class FastDecoder(nn.Module):
    """The tokenizer's decoder in bf16 (``dtype``) + channels_last, optionally compiled; same interface as VQVAE
    for :func:`hmar.sampling.sample` (``quantize`` and ``fhat_to_img`` are what it uses).
    ``channels_last=False`` keeps the default memory format (``bench_sample.py --decode-only`` compares both).

    ``max_batch``: images per decoder call (default: :func:`hmar.tokenizer.decode_chunk` with the budget
    :data:`FAST_DECODE_CHUNK_BYTES`, which decodes 16 images in one call at 256 and 512 px, 32 as 2 x 16 at 512 px).

    ``cudnn_benchmark`` (CUDA) switches on ``torch.backends.cudnn.benchmark`` for the process: the first call of
    each shape times cuDNN's convolution algorithms and later calls use the fastest.

    ``offload_encoder`` (CUDA): the encoder and ``quant_conv`` (44 M fp32 parameters, 176 MB for the official
    ch-160 VQ-VAE), which sampling never uses, wait in host memory and visit the GPU for each
    :meth:`img_to_indices` call (editing), unchanged in precision.

    ``mode`` is torch.compile's; the default (None) compiles in about a minute. ``"max-autotune-no-cudagraphs"``
    benchmarks every conv/matmul choice: on the H200 that took over 4 minutes for one 256 px decoder.

    ``subpixel`` (default: on with ``nhwc_kernels``): every nearest-x2 + 3x3 conv of the decoder runs as one 2x2 conv
    on the low-resolution input whose four output phases are interleaved
    (:meth:`hmar.tokenizer.autoencoder.Upsample.fuse_subpixel`): the same function, 2.25x fewer FLOPs in those convs
    (1.21 of the official decoder's 6.29 TFLOP at 256 px, batch 16), and no 4x up-sampled tensor in memory. With the
    NHWC forms the interleave copies whole channel rows into a channels_last output: on the H200, decoding in the
    sampler took 17.1-17.2 instead of 18.2-18.3 ms at 256 px and 68.7-70.9 instead of 72.7-76.2 ms at 512 px, batch
    16 (BENCHMARKS.md section 3i). Without the NHWC forms (the NCHW interleave) it was slower (section 3d), so
    ``None`` leaves it off there; ``True`` / ``False`` force it. The fused weights are computed once, here, from the
    fp32 weights.

    ``nhwc_kernels`` (on by default; with ``channels_last``): the decoder's GroupNorms take their group statistics
    from per-channel ones (:func:`hmar.tokenizer.autoencoder.group_norm_from_channel_stats`) and its nearest x2
    up-sampling copies whole channel rows (``Upsample.nhwc``), so the kernels torch.compile makes of them read and
    write channels_last memory in order. The compiled decoder's profile on the H200 showed inductor's own GroupNorm
    reductions and up-sampling copies at a fraction of the memory bandwidth; with the NHWC forms the compiled
    decoder took 19.5 instead of 21.8 ms at 256 px and 75.5 instead of 90.7 ms at 512 px, batch 16 (BENCHMARKS.md
    section 3h).

    ``graphs`` (CUDA; off by default here, on in :func:`accelerate`): each decoder call of a new input shape is
    captured as a CUDA graph and replayed after (no kernel launch from Python), in the memory pool ``pool``:
    :func:`accelerate` passes the loop graph's (:class:`GraphedModel`), so the decoder's activations can reuse the
    memory of the token loop's intermediates instead of adding to it (where the pool's free blocks are large enough:
    see ``reserve_pool``). On the H200 (batch 16) decoding took 21.5 ms instead of 28.4 at 256 px and 88.2 instead
    of 118.9 at 512 px, and the peak allocated memory of a sampling call halved (BENCHMARKS.md section 3e). Sharing
    one pool is safe here because every replay's
    outputs are cloned before anything else runs (the next replay of any graph may overwrite them). A capture that
    fails falls back to eager calls, with a warning. ``reserve_pool``: each capture first reserves its warm-up's
    peak as one block of the pool, as :class:`GraphedModel`'s ``reserve_pool`` does (a block the loop's capture
    reserved and freed serves the decoder's when it is large enough). With graphs, as :class:`GraphedModel`, it is
    not thread-safe: replays share their static buffers, so decode from one thread at a time.

    ``full_res_chunks``: each call runs the decoder's full-resolution part
    (:meth:`hmar.tokenizer.autoencoder.Decoder.full_res`: the last up-sampling, the full-resolution level, the output
    convolution) in that many chunks of its images, one after the other: the same images, and that part's
    activations, the largest of the decoder, that many times smaller. The two parts are compiled apart, so that
    inductor cannot interleave the chunks' kernels (and their memory); as one compiled graph the decoder's capture
    also took one full-resolution activation more than its warm-up measured. Default (None): as few chunks (a
    divisor of the call's images) as keep one full-resolution activation of a chunk within
    :data:`FAST_FULL_RES_BYTES`. On the H200 (batch 16, in the sampler) two chunks cut the decoder's memory need from
    5.71 to 3.05 GB at 512 px at the same speed (70.2 ms both), and from 1.43 to 0.76 GB at 256 px, but took 18.1-19.0
    instead of 17.3-17.8 ms there; so the default chunks at 512 px and not at 256 px (BENCHMARKS.md section 3l)."""

    def __init__(self, tokenizer: nn.Module, dtype: torch.dtype = torch.bfloat16, compile: bool = True,
                 mode: Optional[str] = None, channels_last: bool = True, max_batch: Optional[int] = None,
                 cudnn_benchmark: bool = True, offload_encoder: bool = True, subpixel: Optional[bool] = None,
                 nhwc_kernels: bool = True, graphs: bool = False, pool: Optional[Tuple[int, int]] = None,
                 reserve_pool: bool = True, full_res_chunks: Optional[int] = None):
        super().__init__()
        from .tokenizer.autoencoder import GroupNorm, Upsample
        self.tokenizer = tokenizer
        self.nhwc_kernels = nhwc_kernels and channels_last
        self.subpixel = self.nhwc_kernels if subpixel is None else subpixel
        for m in tokenizer.decoder.modules():
            if isinstance(m, Upsample):
                m.nhwc = self.nhwc_kernels
                if self.subpixel:   # from the fp32 weights, before the conversion to ``dtype`` below (one rounding)
                    m.fuse_subpixel()
                else:                # (a tokenizer an earlier FastDecoder fused)
                    m.subpixel_weight = m.subpixel_bias = None
            elif isinstance(m, GroupNorm):
                m.channel_stats = self.nhwc_kernels
        self._decode_graphs: Dict[Tuple[int, ...], Tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._needs: Dict[Tuple[int, ...], int] = {}   # input shape -> its warm-up's measured peak (:meth:`prepare`)
        self.full_res_chunks = full_res_chunks
        self.max_batch = max_batch
        on_cuda = tokenizer.post_quant_conv.weight.is_cuda
        self._encoding = (tokenizer.encoder, tokenizer.quant_conv)
        self.offload_encoder = offload_encoder and on_cuda
        if self.offload_encoder:
            for m in self._encoding:
                m.to("cpu")
        if cudnn_benchmark and on_cuda:
            # the decoder's convolutions run at a few fixed shapes: let cuDNN time its algorithms once per shape
            # (a process-wide setting, as torch.backends.cudnn.benchmark always is)
            torch.backends.cudnn.benchmark = True
        self.quantize = tokenizer.quantize
        self.config = tokenizer.config
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.post_quant_conv = tokenizer.post_quant_conv
        self.dec = tokenizer.decoder.to(dtype=dtype, memory_format=self.memory_format)
        self.post_quant_conv.to(dtype=dtype, memory_format=self.memory_format)
        self._low, self._high = self._decode_low, self._decode_high
        if compile:
            self._low = torch.compile(self._decode_low, mode=mode, dynamic=False)
            self._high = torch.compile(self._decode_high, mode=mode, dynamic=False)
        self._decode = self._decode_compiled
        self.graphs, self.reserve_pool = graphs and on_cuda, reserve_pool
        self.pool = pool if pool is not None or not self.graphs else torch.cuda.graph_pool_handle()   # one per decoder

    @property
    def full_res_chunks(self) -> Optional[int]:
        """Chunks of each call's full-resolution part (None: :meth:`full_res_images` chooses); setting it drops the
        graphs captured with the chunks before (their input shapes do not change, so they would replay those)."""
        return self._full_res_chunks

    @full_res_chunks.setter
    def full_res_chunks(self, chunks: Optional[int]) -> None:
        if chunks is not None and chunks < 1:
            raise ValueError(f"FastDecoder: full_res_chunks={chunks}; use 1 (no chunks), more, or None "
                             f"(chosen per call by FAST_FULL_RES_BYTES)")
        self._full_res_chunks = chunks
        self._decode_graphs.clear()
        self._needs.clear()

    def prepare(self, batch: int) -> int:
        """Warm up, once per input shape, the decoder calls that decoding a batch of ``batch`` sampled latents makes
        (compiling, cuDNN's algorithm search) and measure the memory each holds at once, so that their graphs are
        captured later without another warm-up. Returns the largest of those needs in bytes (0 without graphs or
        reserved pools). :class:`GraphedModel` calls it before its loop's first capture in a pool it shares with
        this decoder (its ``pool_guest``), to reserve one block for both."""
        if not (self.graphs and self.reserve_pool):
            return 0
        n, side = self.images_per_call(batch), self.patch_nums[-1]
        keys = [(b, self.config.z_channels, side, side) for b in {n, batch % n} - {0}]
        for key in keys:
            if key not in self._needs:
                x = torch.zeros(key, device=self.post_quant_conv.weight.device)   # the sampler's f_hat: fp32
                self._needs[key] = _on_side_stream(lambda: self._decode(x), measure=True)
        return max(self._needs[key] for key in keys)

    def _decode_low(self, f_hat: torch.Tensor) -> torch.Tensor:
        z = f_hat.to(self.dtype).contiguous(memory_format=self.memory_format)
        return self.dec.low_res(self.post_quant_conv(z))

    def _decode_high(self, h: torch.Tensor) -> torch.Tensor:
        return self.dec.full_res(h).float().clamp(-1, 1)

    def full_res_images(self, images: int) -> int:
        """Images per chunk of the full-resolution part in a call of ``images`` images: ``full_res_chunks`` chunks,
        or by default :func:`~hmar.tokenizer.decode_chunk`'s choice for the budget :data:`FAST_FULL_RES_BYTES`."""
        if self.full_res_chunks is not None:
            return -(-images // self.full_res_chunks)
        return decode_chunk(self.config, images, self.dtype.itemsize, FAST_FULL_RES_BYTES)

    def _in_parts(self, low: Callable, high: Callable, f_hat: torch.Tensor) -> torch.Tensor:
        """``high(low(f_hat))``, ``high`` on chunks of :meth:`full_res_images` images, one after the other."""
        h = low(f_hat)
        return decode_in_chunks(high, h, self.full_res_images(h.shape[0]))

    def _decode_eager(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self._in_parts(self._decode_low, self._decode_high, f_hat)

    def _decode_compiled(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self._in_parts(self._low, self._high, f_hat)

    def fhat_to_img(self, f_hat: torch.Tensor, max_batch: Optional[int] = None) -> torch.Tensor:
        """Decode ``max_batch`` images at a time (default: ``max_batch`` given at construction, else
        :func:`hmar.tokenizer.decode_chunk` for this dtype and :data:`FAST_DECODE_CHUNK_BYTES`).

        If a call runs out of GPU memory, it decodes half as many images per call (and keeps that as this decoder's
        ``max_batch``, with a warning), down to one: a smaller GPU than the default budget assumes still decodes."""
        n = max_batch or self.images_per_call(f_hat.shape[0])
        decode = self._graphed_decode if self.graphs else self._decode
        try:
            return decode_in_chunks(decode, f_hat, n)
        except torch.OutOfMemoryError:
            if n == 1:
                raise
        import warnings
        warnings.warn(f"hmar: decoding {n} images per call ran out of GPU memory; decoding {n // 2} per call from "
                      f"now on (decode_batch / --decode-batch sets it)")
        self.max_batch = n // 2
        self._decode_graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self.fhat_to_img(f_hat, self.max_batch)

    @torch.no_grad()
    def _graphed_decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``self._decode(f_hat)`` replayed from a CUDA graph captured for its shape (see ``graphs``)."""
        key = tuple(f_hat.shape)
        entry = self._decode_graphs.get(key)
        if entry is None:
            sx = f_hat.clone()
            try:   # the warm-up compiles and times cuDNN's algorithms
                graph, out = _capture(lambda: self._decode(sx), lambda: self._decode(sx), self.pool, sx.device,
                                      self.reserve_pool, need=self._needs.get(key))
            except Exception as e:  # noqa: BLE001  (an op the capture cannot take: keep decoding, say so)
                _capture_failed("the decoder", e, "decoding without graphs instead")
                self.graphs = False
                return self._decode(f_hat)
            entry = self._decode_graphs[key] = (graph, sx, out)
        graph, sx, out = entry
        sx.copy_(f_hat)
        graph.replay()
        return out.clone()

    def images_per_call(self, batch: int) -> int:
        """Images per decoder call for a batch of ``batch`` when no ``max_batch`` is passed to :meth:`fhat_to_img`."""
        return self.max_batch or decode_chunk(self.config, batch, self.dtype.itemsize, FAST_DECODE_CHUNK_BYTES)

    def set_patch_nums(self, patch_nums) -> None:
        self.tokenizer.set_patch_nums(patch_nums)

    # what editing asks of a tokenizer besides decoding: the (fp32) encoder and the quantiser, unchanged
    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return self.tokenizer.patch_nums

    def img_to_indices(self, img: torch.Tensor) -> List[torch.Tensor]:
        if not self.offload_encoder or self.tokenizer.quant_conv.weight.device == img.device:
            return self.tokenizer.img_to_indices(img)
        for m in self._encoding:
            m.to(img.device)
        try:
            return self.tokenizer.img_to_indices(img)
        finally:
            for m in self._encoding:
                m.to("cpu")

    def indices_to_fhat(self, indices) -> torch.Tensor:
        return self.tokenizer.indices_to_fhat(indices)

    def indices_to_img(self, indices) -> torch.Tensor:
        return self.fhat_to_img(self.indices_to_fhat(indices))


def accelerate(pipe, dtype: torch.dtype = torch.bfloat16, graphs: bool = True, compile_decoder: bool = True,
               compile_passes: bool = False, decode_batch: Optional[int] = None, graph_decoder: bool = True,
               reserve_pool: bool = True, full_res_chunks: Optional[int] = None, fp8: bool = False):
    """Make a CUDA :class:`~hmar.pipeline.HMARPipeline` fast in place: the transformer in ``dtype`` in a
    :class:`GraphedModel` (the token loop as one CUDA graph; ``compile_passes``: with its blocks compiled,
    :func:`compile_blocks`), and :class:`FastDecoder` (``dtype``, channels_last, compiled).
    A CPU pipeline is returned unchanged. ``decode_batch``: the decoder's images per call (:class:`FastDecoder`'s
    ``max_batch``). ``graph_decoder`` (with ``graphs``): the decoder's calls replay CUDA graphs in the loop graph's
    memory pool (:class:`FastDecoder`'s ``graphs``). ``reserve_pool``: each capture first reserves its warm-up's
    peak as one block of the pool (:class:`GraphedModel`'s ``reserve_pool``). ``full_res_chunks``:
    :class:`FastDecoder`'s. ``fp8`` (with ``graphs``): :class:`GraphedModel`'s (the blocks' GEMMs in e4m3). The
    decoder is the loop graph's ``pool_guest``: one pool block serves both. Returns the pipeline."""
    if pipe.device.type != "cuda":
        return pipe
    if fp8 and not graphs:
        raise ValueError("accelerate(fp8=True) converts the graphed model's blocks: leave graphs on")
    pipe.model.to(dtype)
    if graphs:
        pipe.model = GraphedModel(pipe.model, compile=compile_passes, reserve_pool=reserve_pool, fp8=fp8)
    pool = pipe.model._loop_pool if graphs else None
    pipe.tokenizer = FastDecoder(pipe.tokenizer, dtype, compile_decoder, max_batch=decode_batch,
                                 graphs=graphs and graph_decoder, pool=pool, reserve_pool=reserve_pool,
                                 full_res_chunks=full_res_chunks)
    if graphs and pipe.tokenizer.graphs:
        pipe.model.pool_guest = pipe.tokenizer
    return pipe
