"""Sampling speed and memory: HMAR vs VAR, eager vs fast path, in one process, side by side.

Reports, per config (batch 16, guidance 1.5, default schedules, random weights):
  tokens  -- transformer passes + token sampling, no decode
  decode  -- tokenizer decode of the final f_hat
  e2e     -- both, as a user calls it
  peak    -- torch.cuda.max_memory_allocated during one end-to-end call (weights included; less the weights of the
             decoders that earlier variants of the config left on the GPU for later ones)
  reserved -- torch.cuda.max_memory_reserved during that call, after empty_cache(): it also counts what the
             CUDA graphs' private pools hold for their intermediates (which "peak" does not see: a replay
             allocates nothing), but also the allocator's free cached blocks: an upper bound
  pools   -- the memory the CUDA graphs' private pools hold (segments of a pool other than the default one, from
             torch.cuda.memory_snapshot()); peak + pools is the graphed variants' memory need, counting the
             graphs' few live outputs twice
Variants:
  fp32-eager     what the official sampler does: fp32 / TF32, eager
  bf16-eager     bf16, eager
  fast           what ``enable_fast_sampling()`` / ``hmar sample --fast`` runs: bf16, the whole token loop replayed as
                 one CUDA graph, AdaLN modulations computed once per call, fc1's bias + GELU in the GEMM epilogue, the
                 draw of every pass in one Triton kernel (``hmar.draw_kernel``), bf16 channels_last compiled decoder
                 (16 images per call; its GroupNorms and up-sampling in NHWC form, ``nhwc_kernels``) whose calls replay
                 CUDA graphs in the loop graph's memory pool, each capture reserving its warm-up's peak
and variants of "fast" with changes, named "fast-" + modifiers joined by "-" (e.g. fast-compiled-gelu-onecall),
for side-by-side ratios:
  compiled      the transformer blocks torch.compile'd too (what ``--compile`` adds)
  passgraphs    one graph per pass, sampling eager between them (the fast path until the second GPU session of
                2026-12-01)
  percall       AdaLN modulations recomputed in every pass and block (as before 2026-12-01)
  onecall       the decoder in one call for the whole batch (``--decode-batch 16``; the default since 2026-12-02
                at batch 16)
  chunked       the decoder in the memory-bounded chunks of the default until 2026-12-02 (decode_chunk's 256 MiB
                budget: 2 x 8 images at 256 px, 8 x 2 at 512 px)
  gelu          fc1's bias + GELU in the GEMM epilogue (``GraphedModel(fused_gelu=True)``; the default since
                2026-12-02, when it was measured under this name)
  nogelu        bias + GELU as a kernel of its own (``fused_gelu=False``, the default until 2026-12-02)
  sortdraw      the token draw as it was until 2026-12-02: a sort and the filters over all V logits, instead of
                the draw over the top-k candidates of ``torch.topk`` (the same tokens for a seed); as torch ops
                (implies torchdraw)
  torchdraw     the token draw of every pass as torch ops (the finite check, ``torch.lerp``, ``torch.topk``, the
                top-p filter, softmax and draw over fp32 logits: ``GraphedModel(fused_draw=False)``, the default until
                the fourth session of 2026-12-03) instead of the one Triton kernel (``hmar.draw_kernel``) over the
                head's bf16 logits
  fp8           the blocks' four big linears in fp8 e4m3 (``GraphedModel(fp8=True)``, :mod:`hmar.model.fp8`: per-channel
                weight scales, per-token input scales, ``torch._scaled_mm``; best with compiled, where inductor fuses
                the quantisation into the kernel before each GEMM). Opt-in: the default stays bf16
  fp8fast       fp8 with the GEMMs' fast accumulation (``fp8_fast_accum=True``)
  opsnorm       each residual add + LayerNorm + modulation as torch ops (inductor's kernels once compiled:
                ``GraphedModel(fused_norm=False)``, the default until 2026-12-04 and with fp8) instead of one Triton
                kernel (``hmar.model.norm_kernel``)
  fusednorm     the Triton kernel for them with fp8 too (``fused_norm=True``)
  histdraw      the draw kernel's k-th largest logit in four 8-bit histogram rounds instead of 32 one-bit steps
                (``hmar.draw_kernel.HISTOGRAM_TOP_K``)
  skinnyN       the blocks' four linears through hmar's small-pass Triton GEMM (``hmar.model.skinny_gemm``) for
                inputs of at most N rows (``hmar.model.blocks.SKINNY_GEMM_MAX_ROWS``), e.g. skinny1152;
                skinnywideN: for qkv and fc1 only (``SKINNY_GEMM_WIDE_ONLY``)
  decgraph      the decoder's calls replayed as CUDA graphs in the loop graph's memory pool
                (``accelerate(graph_decoder=True)``, ``FastDecoder(graphs=True)``; the default since the second
                session of 2026-12-02, when it was measured under this name)
  nodecgraph    the decoder's calls launched from Python (the default until then)
  reserve       each CUDA graph capture first reserves its warm-up's peak memory as one block of its pool
                (``reserve_pool=True``; the default since the second session of 2026-12-02, measured under this name)
  noreserve     no reservation (the default until then: the pools grow allocation by allocation)
  qknorm        every attention call through the Triton kernel with the q/k L2 normalisation inside it
                (``GraphedModel(fused_qk_norm=True, fused_qk_norm_max_tokens=None)``; the third session of
                2026-12-02 measured it under this name
                as the global switch ``hmar.attention.FUSED_QK_NORM``, which then also covered the eager passes)
  noqknorm      the normalisation as ops of its own, then cuDNN / flash SDPA per pass (``fused_qk_norm=False``).
                Neither: ``GraphedModel``'s choice (fused wherever Triton is importable, in the passes of at most
                ``hmar.accel.FUSED_QK_NORM_MAX_TOKENS`` = 256 tokens; until the fourth session of 2026-12-02: from
                24 heads on, in every pass)
  qkmaxN        fused in the passes of at most N tokens, ops before cuDNN's attention in longer ones
                (``fused_qk_norm=True, fused_qk_norm_max_tokens=N``; qkmax256 is the default since it was measured
                under this name)
  cdt           with compiled: inductor's coordinate descent tuning of its own (elementwise, normalisation) kernels
                (``torch._inductor.config.coordinate_descent_tuning``; after the first variant of a config, whose
                settings the shared decoder compiles under)
  nhwc          the decoder's GroupNorms from per-channel statistics and its up-sampling as NHWC copies
                (``FastDecoder(nhwc_kernels=True)``; the default since the fifth session of 2026-12-02, when it was
                measured under this name)
  nonhwc        inductor's own GroupNorm and up-sampling in the decoder (``nhwc_kernels=False``, the default until
                then; a decoder of its own, compiled once for the nonhwc variants of a config)
  subpixel      the decoder's up-sampling convs in sub-pixel form (``FastDecoder(subpixel=True)``: one 2x2 conv on
                the low-resolution input, its four output phases interleaved; with nhwc as NHWC row copies). The
                default with nhwc since 2026-12-03, when it was measured under this name; also with nonhwc
  nosubpixel    nearest x2 up-sampling, then the 3x3 conv (``subpixel=False``; the default until 2026-12-03)
  graphbreak    with compiled: the graph break in every compiled block that a ``min(..., default=)`` in the Triton
                kernel's checks made until 2026-12-03 (put back for the comparison; see ``_variant_patches``)
  trainfwd      the fused passes through the training forward of the Triton kernel (its work list, the row-norm
                kernel and the log-sum-exp it keeps for a backward), as until 2026-12-03, instead of the inference
                kernel (``hmar.attention.triton_kernel.DENSE_INFERENCE = False``; see ``_variant_patches``)
  biascat       the sampling passes concatenate the q / v biases for the projection and compute the temperature in
                every pass of every block (``SelfAttention.kernel_constants = False``, as until 2026-12-03) instead of
                the inference kernel reading them
  nodefer       each block adds its own last residual branch (``hmar.model.transformer.DEFER_RESIDUAL = False``, as
                until 2026-12-03) instead of the next block adding it inside its first LayerNorm's kernel
  noguest       the loop's capture reserves its own need only, and the decoder's graphs a block of their own in
                the shared pool, so that the pool holds the sum of both (``GraphedModel.pool_guest = None``, as until
                2026-12-03) instead of one block for the larger
  warm1         each reservation measured on the first warm-up run, with its compiling, autotuning and cuDNN
                algorithm search (``hmar.accel.MEASURE_SECOND_WARMUP = False``, as until 2026-12-03)
  frN           the decoder's full-resolution part in N chunks of each call's images (``FastDecoder(full_res_chunks=N)``;
                by default since the third session of 2026-12-03: none at 256 px, 2 at 512 px, batch 16; fr1 is the
                decoder until then; a decoder of its own, compiled once for the variants of a config that ask for it)
  decN          N images per decoder call (``FastDecoder.max_batch = N``; default: ``images_per_call``)
  autotune      with compiled: the blocks compiled with mode="max-autotune-no-cudagraphs" (inductor times Triton
                GEMM templates, which can take the elementwise work around them; minutes of compiling)
The fast path of 2026-12-01 is fast-chunked-nogelu-sortdraw-nodecgraph-noreserve (with --compile: fast-compiled-...);
that of the first session of 2026-12-02 is fast-nodecgraph-noreserve.
After the runs it prints every variant's ratios against the first variant of its config (same process), HMAR
against VAR where both ran, and for the four goal configs each variant against the official sampler's reference
figures (``OFFICIAL``) and the performance issue's goals (``GOALS``), met or not.
``--profile`` adds a torch.profiler table of one token-part call (no decode) per config and profiled variant
(``--profile-variants``, default "fast"; CUDA time per kernel. Its "Self CUDA time total" against the variant's
tokens time shows how long the GPU waited for the host).

    python benchmarks/bench_sample.py                         # the four issue configs
    python benchmarks/bench_sample.py --configs hmar-d16 --quick
    python benchmarks/bench_sample.py --device cpu --configs hmar-tiny --quick   # smoke test
    python benchmarks/bench_sample.py --decode-only --configs hmar-d16,hmar-d16-512   # decoder variants alone

``--decode-only`` times the tokenizer decode of the f_hat of random tokens per config (batch 16) in the variants of
``DECODERS`` side by side (``--decoders`` picks some): fp32-eager (TF32), bf16-eager-cl (bf16 + channels_last), fp32- and
bf16-compiled with and without channels_last, each in one call or in memory-bounded chunks (``-chunked``: what ``fast``
samples with was bf16-compiled-cl-chunked until 2026-12-02), the ``-nhwc`` ones with the GroupNorms from per-channel
statistics and NHWC up-sampling (``FastDecoder(nhwc_kernels=True)``; every other variant has ``nhwc_kernels=False``),
the ``-subpixel`` ones with the up-sampling convs in sub-pixel form (``FastDecoder(subpixel=True)``;
bf16-compiled-cl-nhwc-subpixel is the fast sampler's decoder since 2026-12-03), each compared with fp32-eager (mean
and max |diff| of the images), with the memory the decode adds (CUDA: peak allocated above what was allocated
before; CPU: the process's peak RSS, so run one variant per process there).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmar import VQVAE, build_model, model_config, tokenizer_config  # noqa: E402
from hmar.accel import FastDecoder, GraphedModel  # noqa: E402
from hmar.model.fp8 import to_float8  # noqa: E402
import hmar.sampling  # noqa: E402
from hmar.sampling import sample  # noqa: E402
from hmar.tokenizer import decode_chunk  # noqa: E402

from _inductor import inductor_patch  # noqa: E402  (benchmarks/, this script's folder)
from _profile import profile_table  # noqa: E402


def timed(fn, reps: int, device: torch.device) -> float:
    """Median wall time (ms) of ``fn`` over ``reps`` runs, after one warm-up."""
    fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def build_tokenizer(name: str, device: torch.device) -> VQVAE:
    """The tokenizer a config samples with: the official ch-160 VQ-VAE at its resolution (tiny: vqvae-tiny)."""
    cfg = model_config(name)
    with torch.device(device):
        if name.endswith("tiny"):
            return VQVAE(tokenizer_config("vqvae-tiny")).eval()
        return VQVAE(tokenizer_config("vqvae-ch160", patch_nums=cfg.patch_nums)).eval()


def _inductor_settings(variant: str):
    """The ``torch._inductor.config`` settings a variant's modifiers ask for, as a context (``cdt``: coordinate
    descent tuning of inductor's own kernels; also a decoder variant of ``--decode-only``). The compiled decoder is
    shared by a config's fast variants and compiles in the first one, under that variant's settings: put ``cdt``
    variants after the first."""
    return inductor_patch("coordinate_descent_tuning=True" if "cdt" in variant.split("-")[1:] else "")


@contextlib.contextmanager
def _variant_patches(variant: str):
    """The code changes a variant's modifiers undo, as a context. ``graphbreak``: a graph break at the start of the
    Triton kernel's input checks (``hmar.attention.triton_kernel._check``), where a ``min(lengths, default=0)`` broke
    every compiled block into 7 frames until 2026-12-03 (the attention calls then ran the eager autograd path
    between them; tests/test_triton_attention.py checks that a block is one graph now). ``trainfwd``: the training
    forward in the passes that run the inference kernel now (``DENSE_INFERENCE = False``). ``nodefer``: each block
    adds its own last residual branch (``DEFER_RESIDUAL = False``). ``biascat``: ``SelfAttention.kernel_constants =
    False``. ``warm1``: ``hmar.accel.MEASURE_SECOND_WARMUP = False``. ``histdraw``: the draw kernel's k-th largest
    logit by histograms (``hmar.draw_kernel.HISTOGRAM_TOP_K = True``). ``skinnyN``: the blocks' linears through
    hmar's small-pass Triton GEMM for inputs of at most N rows (``hmar.model.blocks.SKINNY_GEMM_MAX_ROWS = N``;
    ``skinnywideN``: qkv and fc1 only, ``SKINNY_GEMM_WIDE_ONLY``)."""
    mods = variant.split("-")[1:]
    import hmar.accel as accel
    import hmar.attention.triton_kernel as tk
    import hmar.draw_kernel as dk
    import hmar.model.transformer as T
    from hmar.model.blocks import SelfAttention
    check, dense, defer, second = tk._check, tk.DENSE_INFERENCE, T.DEFER_RESIDUAL, accel.MEASURE_SECOND_WARMUP

    def broken_check(*a, **k):
        torch._dynamo.graph_break()
        return check(*a, **k)
    if "graphbreak" in mods:
        tk._check = broken_check
    if "trainfwd" in mods:
        tk.DENSE_INFERENCE = False
    if "nodefer" in mods:
        T.DEFER_RESIDUAL = False
    if "biascat" in mods:
        SelfAttention.kernel_constants = False
    if "warm1" in mods:
        accel.MEASURE_SECOND_WARMUP = False
    if "histdraw" in mods:
        dk.HISTOGRAM_TOP_K = True
    import hmar.model.blocks as blocks
    skinny = next((SKINNY.fullmatch(m) for m in mods if SKINNY.fullmatch(m)), None)
    blocks.SKINNY_GEMM_MAX_ROWS = int(skinny.group(2)) if skinny else 0
    blocks.SKINNY_GEMM_WIDE_ONLY = bool(skinny and skinny.group(1))
    try:
        yield
    finally:
        tk._check, tk.DENSE_INFERENCE, T.DEFER_RESIDUAL, accel.MEASURE_SECOND_WARMUP = check, dense, defer, second
        SelfAttention.kernel_constants = True
        dk.HISTOGRAM_TOP_K = False
        blocks.SKINNY_GEMM_MAX_ROWS, blocks.SKINNY_GEMM_WIDE_ONLY = 0, False


def _measure(m, t, labels, kw, args, device: torch.device, profile: bool = False) -> dict:
    """Tokens, decode and end-to-end times of one variant (model ``m``, tokenizer ``t``), its memory on CUDA, and
    with ``profile`` a profiler table of one token-part call."""
    f_hat = {}

    def tokens():
        f_hat["x"] = sample(m, t, labels, decode=False, **kw).f_hat

    def decode():
        t.fhat_to_img(f_hat["x"])

    def e2e():
        sample(m, t, labels, decode=True, **kw)

    r = {"tokens_ms": timed(tokens, args.reps, device), "decode_ms": timed(decode, args.reps, device)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        # what an earlier variant left in reference cycles must not count here: the last fast variant of the
        # previous config (its decoder's graphs keep the loop graph's pool alive) added its pools to the first
        # variant of the next one in the runs of the second session of 2026-12-02 (BENCHMARKS.md section 3e)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    r["e2e_ms"] = timed(e2e, args.reps, device)
    if device.type == "cuda":
        r["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        r["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        r["pools_gb"] = graph_pool_bytes() / 1e9
        if isinstance(m, GraphedModel):
            r["whole_loop"] = m.whole_loop   # False: the loop capture failed and fell back (a warning says why)
            # what each capture reserved in its pool (bytes), and the pools' segments
            r["reserved_loop_gb"] = [(round(getattr(e[0], "need", 0) / 1e9, 3), round(getattr(e[0], "reserved", 0)
                                      / 1e9, 3)) for e in m._loops.values()]
            r["pool_segments_gb"] = graph_pool_segments()
        if getattr(t, "_decode_graphs", None):
            r["reserved_decoder_gb"] = {"x".join(map(str, k)): round(getattr(e[0], "reserved", 0) / 1e9, 3)
                                        for k, e in t._decode_graphs.items()}
    if hasattr(t, "images_per_call"):
        r["decode_chunk"] = t.images_per_call(args.batch)
    if profile and device.type == "cuda":
        r["profile"] = profile_table(tokens, rows=args.profile_rows)
        print(r["profile"], flush=True)
    return r


def bench_config(name: str, args, device: torch.device, on_result=lambda: None, results=None) -> dict:
    """Every variant of one config; fills ``results`` (``{variant: figures}``) and calls ``on_result`` after each."""
    results = {} if results is None else results
    labels = [i % model_config(name).num_classes for i in range(args.batch)]
    kw = dict(cfg=1.5, top_k=900, top_p=0.96, generator=0)
    # one compiled decoder per decoder options (nhwc or not, subpixel or not) serves every fast variant of this
    # config that asks for it (one compile, not one each)
    fast_decoders = {}
    for variant in args.variants:
        with torch.device(device):
            model = build_model(model_config(name)).eval()
        # the decoder options of this variant: (nhwc_kernels, subpixel, full_res_chunks), None: FastDecoder chooses
        mods = set(variant.split("-")[1:])
        dec_key = ("nonhwc" not in mods, True if "subpixel" in mods else False if "nosubpixel" in mods else None,
                   _number(FRN, mods))
        shared = variant.startswith("fast") and dec_key in fast_decoders
        # the fast variants after the first reuse its decoder
        tok = None if shared else build_tokenizer(name, device)
        # the draw of this variant (a module attribute that scale_loop looks up on every pass)
        hmar.sampling.sample_from_logits = sort_draw if "sortdraw" in variant.split("-") else TOPK_DRAW
        if variant == "fp32-eager":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            m, t = model, tok
        elif variant == "bf16-eager":
            m, t = model.to(torch.bfloat16), FastDecoder(tok, compile=False)
        else:  # fast and its variants
            if "percall" in mods:
                model = PerPassCondition(model)
            m = model.to(torch.bfloat16)
            if device.type == "cuda":
                m = GraphedModel(m, compile="compiled" in mods, whole_loop="passgraphs" not in mods,
                                 fused_gelu="nogelu" not in mods, reserve_pool="noreserve" not in mods,
                                 compile_mode="max-autotune-no-cudagraphs" if "autotune" in mods else None,
                                 fused_draw=False if mods & {"torchdraw", "sortdraw"} else None,
                                 fp8=bool(mods & {"fp8", "fp8fast"}), fp8_fast_accum="fp8fast" in mods,
                                 fused_norm=False if "opsnorm" in mods else True if "fusednorm" in mods else None,
                                 **_qk_norm_options(mods))
            elif mods & {"fp8", "fp8fast"}:
                to_float8(m)
            if dec_key not in fast_decoders:
                fast_decoders[dec_key] = FastDecoder(tok, compile=device.type == "cuda" and not args.no_compile,
                                                     mode=args.compile_mode, nhwc_kernels=dec_key[0],
                                                     subpixel=dec_key[1], full_res_chunks=dec_key[2])
            t = fast_decoders[dec_key]
            t.max_batch = _number(DECN, mods) or (
                args.batch if "onecall" in mods else
                decode_chunk(t.config, args.batch, t.dtype.itemsize) if "chunked" in mods else None)
            # decoder graphs in the loop graph's pool (what accelerate(graph_decoder=True) sets up), fresh per
            # variant (every decoder's graphs are dropped after each variant, below)
            t.graphs = "nodecgraph" not in mods and isinstance(m, GraphedModel)
            t.reserve_pool = "noreserve" not in mods
            t.pool = m._loop_pool if t.graphs else None
            if t.graphs and "noguest" not in mods:
                m.pool_guest = t          # what accelerate() sets up
        with _inductor_settings(variant), _variant_patches(variant):   # the compiles happen in the first timed calls
            r = _measure(m, t, labels, kw, args, device,
                         profile=args.profile and variant in args.profile_variants.split(","))
        # the decoders of the config's earlier variants wait on the GPU for the variants after that share them: their
        # weights are not this variant's (a second decoder added 0.15 GB to "peak" until 2026-12-03, section 3l)
        others = sum(_cuda_bytes(d) for d in fast_decoders.values() if d is not t)
        if others and "peak_gb" in r:
            r["peak_gb"] -= others / 1e9
            r["other_decoders_gb"] = others / 1e9
        results[variant] = r
        on_result()   # a run stopped early (time limit) keeps what it measured
        print(f"  {name:14s} {variant:26s} tokens {r['tokens_ms']:8.1f} ms  decode {r['decode_ms']:7.1f} ms  "
              f"e2e {r['e2e_ms']:8.1f} ms  peak {r.get('peak_gb', float('nan')):6.2f} GB  "
              f"reserved {r.get('reserved_gb', float('nan')):6.2f} GB  "
              f"pools {r.get('pools_gb', float('nan')):5.2f} GB",
              flush=True)
        if "pool_segments_gb" in r:
            print(f"  {name:14s} {variant:26s} need / reserved: loop {r['reserved_loop_gb']} GB, decoder "
                  f"{r.get('reserved_decoder_gb', {})} GB; pool segments {r['pool_segments_gb']} GB", flush=True)
        for d in fast_decoders.values():   # their graphs keep this variant's loop pool alive: not in the next one's
            d._decode_graphs = {}
        del model, tok, m, t
        gc.collect()          # nothing of this variant (weights, graphs) may count in the next one's memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
            if args.leak_check:
                print_pool_survivors(f"{name} {variant}")
    return results


def _cuda_bytes(decoder) -> int:
    """Bytes of a FastDecoder's parameters and buffers on CUDA (its decoder and post-quantisation conv)."""
    tensors = [*decoder.dec.parameters(), *decoder.dec.buffers(), *decoder.post_quant_conv.parameters()]
    return sum(x.numel() * x.element_size() for x in tensors if x.is_cuda)


def print_pool_survivors(after: str) -> None:
    """The private-pool segments still held after a variant was dropped, and the live blocks that pin each (with
    where they were allocated: ``--leak-check`` records the allocation history)."""
    for seg in _private_segments():
        live = [b for b in seg["blocks"] if b["state"] == "active_allocated"]
        print(f"  leak check after {after}: pool {seg['segment_pool_id']} segment {seg['total_size'] / 1e9:.3f} GB, "
              f"{len(live)} live blocks", flush=True)
        for b in live[:4]:
            frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in b.get("frames", [])
                      if "hmar" in f["filename"] or "bench" in f["filename"]][:6]
            print(f"    {b['size'] / 1e6:.2f} MB  " + " <- ".join(frames), flush=True)


MODIFIERS = ("compiled", "passgraphs", "percall", "onecall", "chunked", "gelu", "nogelu", "sortdraw",
             "decgraph", "nodecgraph", "reserve", "noreserve", "qknorm", "noqknorm", "autotune", "cdt", "nhwc",
             "nonhwc", "subpixel", "nosubpixel", "graphbreak", "trainfwd", "nodefer", "biascat", "noguest",
             "warm1", "torchdraw", "fp8", "fp8fast", "opsnorm", "fusednorm",
             "histdraw")
QKMAX = re.compile(r"qkmax(\d+)")   # and qkmaxN: the fused q/k normalisation up to N tokens
DECN = re.compile(r"dec(\d+)")      # and decN: N images per decoder call
FRN = re.compile(r"fr(\d+)")        # and frN: the decoder's full-resolution part in N chunks
SKINNY = re.compile(r"skinny(wide)?(\d+)")  # skinnyN / skinnywideN: the small-pass GEMM for <= N rows
TOPK_DRAW = hmar.sampling.sample_from_logits


def sort_draw(logits, generator, top_k=0, top_p=0.0, temperature=1.0):
    """The token draw until 2026-12-02 (the "sortdraw" variants): filters and softmax over all V logits."""
    probs = hmar.sampling.filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    q = torch.empty_like(flat).exponential_(1, generator=generator)
    tok = (flat / q).argmax(-1, keepdim=True)
    return tok.view(probs.shape[:-1]), flat.gather(1, tok).view(probs.shape[:-1])


def _qk_norm_options(mods) -> dict:
    """GraphedModel's q/k-normalisation arguments for a variant's modifiers (none of them: its defaults)."""
    if "noqknorm" in mods:
        return {"fused_qk_norm": False}
    if "qknorm" in mods:
        return {"fused_qk_norm": True, "fused_qk_norm_max_tokens": None}
    limit = _number(QKMAX, mods)
    return {} if limit is None else {"fused_qk_norm": True, "fused_qk_norm_max_tokens": limit}


def _number(pattern: re.Pattern, mods) -> Optional[int]:
    """N of the modifier that ``pattern`` (qkmaxN, decN, frN) matches, or None."""
    found = [int(m[1]) for m in map(pattern.fullmatch, mods) if m]
    return found[0] if found else None


def check_variant(v: str) -> bool:
    """fp32-eager, bf16-eager, fast, or fast-<modifier>[-<modifier>...] with modifiers from :data:`MODIFIERS`."""
    parts = v.split("-")
    return v in ("fp32-eager", "bf16-eager") or (parts[0] == "fast" and all(
        p in MODIFIERS or any(r.fullmatch(p) for r in (QKMAX, DECN, FRN, SKINNY)) for p in parts[1:]))


def _private_segments() -> list:
    """The CUDA memory segments of private pools (those of CUDA graphs; the default pool's id is (0, 0)), with
    their blocks (and, under ``--leak-check``, where each block was allocated)."""
    return [seg for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)]


def graph_pool_segments() -> list:
    """The sizes (GB) of the segments that private pools hold, largest first."""
    return sorted((round(seg["total_size"] / 1e9, 3) for seg in _private_segments()), reverse=True)


def graph_pool_bytes() -> int:
    """Bytes of CUDA memory held by private pools."""
    return sum(seg["total_size"] for seg in _private_segments())


class PerPassCondition:
    """A model whose sampler input is the plain class condition, so every pass and block recomputes its AdaLN
    modulation (the sampler before 2026-12-01): ``precompute_condition`` is the identity."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def precompute_condition(self, cond):
        return cond

    def to(self, *args, **kwargs):
        self.model.to(*args, **kwargs)
        return self


_PLAIN = dict(nhwc_kernels=False)   # channels_last decoder variants named before nhwc_kernels: inductor's GroupNorm


DECODERS = {  # name: FastDecoder arguments (None: the tokenizer's own fp32 decode, in one call)
    "fp32-eager": None,
    "bf16-eager-cl": dict(dtype=torch.bfloat16, compile=False, channels_last=True, max_batch=0, **_PLAIN),
    "fp32-compiled": dict(dtype=torch.float32, compile=True, channels_last=False, max_batch=0),
    "bf16-compiled": dict(dtype=torch.bfloat16, compile=True, channels_last=False, max_batch=0),
    "bf16-compiled-cl": dict(dtype=torch.bfloat16, compile=True, channels_last=True, max_batch=0, **_PLAIN),
    # the same, compiled with inductor's coordinate descent tuning (its GroupNorm / SiLU / add kernels)
    "bf16-compiled-cl-cdt": dict(dtype=torch.bfloat16, compile=True, channels_last=True, max_batch=0, **_PLAIN),
    # the GroupNorms from per-channel statistics and the NHWC up-sampling (FastDecoder(nhwc_kernels=True,
    # subpixel=False): what the fast sampler decoded with from the fifth session of 2026-12-02 to 2026-12-03)
    "bf16-eager-cl-nhwc": dict(dtype=torch.bfloat16, compile=False, channels_last=True, max_batch=0, nhwc_kernels=True,
                               subpixel=False),
    "bf16-compiled-cl-nhwc": dict(dtype=torch.bfloat16, compile=True, channels_last=True, max_batch=0,
                                  nhwc_kernels=True, subpixel=False),
    # memory-bounded chunks (hmar.tokenizer.decode_chunk's default budget, the fast decoder's default until
    # 2026-12-02: 8 of 16 images at 256 px, 2 at 512 px in bf16)
    "fp32-eager-chunked": dict(dtype=torch.float32, compile=False, channels_last=False, max_batch=None),
    "bf16-eager-cl-chunked": dict(dtype=torch.bfloat16, compile=False, channels_last=True, max_batch=None, **_PLAIN),
    "bf16-compiled-chunked": dict(dtype=torch.bfloat16, compile=True, channels_last=False, max_batch=None),
    "bf16-compiled-cl-chunked": dict(dtype=torch.bfloat16, compile=True, channels_last=True, max_batch=None,
                                     **_PLAIN),
    # the sub-pixel form of the up-sampling convs (FastDecoder(subpixel=True); an experiment)
    "bf16-eager-cl-subpixel": dict(dtype=torch.bfloat16, compile=False, channels_last=True, max_batch=0, subpixel=True,
                                   **_PLAIN),
    "bf16-compiled-subpixel": dict(dtype=torch.bfloat16, compile=True, channels_last=False, max_batch=0, subpixel=True),
    # both: the sub-pixel convs with the NHWC interleave, beside the NHWC GroupNorms (FastDecoder's default since
    # 2026-12-03: bf16-compiled-cl-nhwc-subpixel is what the fast sampler decodes with)
    "bf16-eager-cl-nhwc-subpixel": dict(dtype=torch.bfloat16, compile=False, channels_last=True, max_batch=0,
                                        nhwc_kernels=True, subpixel=True),
    "bf16-compiled-cl-nhwc-subpixel": dict(dtype=torch.bfloat16, compile=True, channels_last=True, max_batch=0,
                                           nhwc_kernels=True, subpixel=True),
    "bf16-compiled-cl-subpixel-chunked": dict(dtype=torch.bfloat16, compile=True, channels_last=True, max_batch=None,
                                              subpixel=True, **_PLAIN),
}


def bench_decode(name: str, args, device: torch.device) -> dict:
    """Decode time (ms) of every :data:`DECODERS` variant on one f_hat, with its mean and max |diff| to fp32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {}
    ref = None
    for variant in args.decoders.split(","):
        if variant not in DECODERS:
            raise SystemExit(f"unknown decoder variant {variant!r}; known: {', '.join(DECODERS)}")
        kw = DECODERS[variant]
        if kw is not None and kw["compile"] and (device.type != "cuda" or args.no_compile):
            continue
        torch.manual_seed(0)                                  # the same random weights in every variant
        tok = build_tokenizer(name, device)
        c = tok.config
        g = torch.Generator(device=device).manual_seed(0)    # random tokens -> an f_hat of the codebook's scale
        idx = [torch.randint(0, c.vocab_size, (args.batch, pn * pn), device=device, generator=g) for pn in c.patch_nums]
        if kw is not None:
            kw = {**kw, "max_batch": kw["max_batch"] if kw["max_batch"] is None else args.batch}  # 0: one call
        dec = tok if kw is None else FastDecoder(tok, mode=args.compile_mode, **kw)
        chunk = args.batch if kw is None or kw["max_batch"] else decode_chunk(c, args.batch, kw["dtype"].itemsize)
        with torch.no_grad(), _inductor_settings(variant):
            f_hat = tok.indices_to_fhat(idx)
            decode = lambda: dec.fhat_to_img(f_hat, max_batch=chunk)  # noqa: E731
            img = decode()
            ref = img if ref is None else ref
            ms = timed(decode, args.reps, device)
            peak = None
            if device.type == "cuda":    # what the decode itself adds on top of what is already allocated
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                decode()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        if device.type == "cpu":         # the process's peak so far: meaningful with one variant per process
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # KiB on Linux
        d = (img - ref).abs()
        results[variant] = {"decode_ms": ms, "chunk": chunk, "decode_peak_gb": peak,
                            "mean_abs_diff_vs_fp32": float(d.mean()), "max_abs_diff_vs_fp32": float(d.max())}
        if args.profile and device.type == "cuda" and variant in args.profile_variants.split(","):
            with torch.no_grad():
                results[variant]["profile"] = profile_table(decode, rows=args.profile_rows)
            print(results[variant]["profile"], flush=True)
        print(f"  {name:14s} decode {variant:25s} {ms:8.1f} ms  chunk {chunk:3d}  peak +"
              f"{float('nan') if peak is None else peak:6.2f} GB  (|diff| vs fp32-eager: mean {float(d.mean()):.4f}, "
              f"max {float(d.max()):.3f}; images in [-1, 1])", flush=True)
        del tok, dec
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def count_pass_ops(name: str, batch: int) -> dict:
    """Per pass of a config, on the meta device (no weights, no time): the aten ops one eager pass dispatches
    (inside a CUDA graph each is one kernel) with the class condition and with the precomputed modulations, and
    the bytes of ``ada_lin`` weights (bf16) a pass reads only when it computes the modulations itself."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.t.default,
                            torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.unbind.int,
                            torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.expand.default,
                            torch.ops.aten.unsqueeze.default, torch.ops.aten.detach.default, torch.ops.aten.split.Tensor):
                self.n += 1          # views and metadata-only ops launch no kernel
            return func(*args, **(kwargs or {}))

    with torch.device("meta"):
        model = build_model(model_config(name)).eval().to(torch.bfloat16)
    cfg = model.config
    rows = 2 * batch
    cond = torch.zeros(rows, cfg.embed_dim, device="meta", dtype=torch.bfloat16)
    pre = model.precompute_condition(cond)
    out = {}
    passes = [("next_scale", model.next_scale_logits, cfg.patch_nums[-1] ** 2)]
    if hasattr(model, "masked_logits"):
        passes.append(("masked", model.masked_logits, 16))
    for kind, fn, n in passes:
        x = torch.zeros(rows, n, cfg.embed_dim, device="meta", dtype=torch.bfloat16)
        r = {}
        for label, c in (("per_pass_condition", cond), ("precomputed", pre)):
            with torch.no_grad(), Count() as counter:
                fn(x, c)
            r[label + "_ops"] = counter.n
        blocks = [*model.base_blocks, *(model.ns_blocks if kind == "next_scale" else model.mask_blocks)] \
            if cfg.kind == "hmar" else list(model.blocks)
        heads = [model.ns_head_nm if kind == "next_scale" else model.mask_head_nm] if cfg.kind == "hmar" else [model.head_nm]
        r["ada_lin_bytes_bf16"] = sum(p.numel() * 2 for m in (*blocks, *heads) for p in m.ada_lin.parameters())
        r["tokens"] = n
        out[kind] = r
        print(f"  {name:14s} {kind:10s} pass ({rows} rows x {n} tokens): {r['per_pass_condition_ops']} ops -> "
              f"{r['precomputed_ops']} with the modulations precomputed; ada_lin weights not read: "
              f"{r['ada_lin_bytes_bf16'] / 1e6:.0f} MB per pass", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="hmar-d16,var-d16,hmar-d30,var-d30,hmar-d16-512,var-d16-512,hmar-d30-512,var-d30-512")
    ap.add_argument("--variants", default="fp32-eager,bf16-eager,fast")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 repetitions")
    ap.add_argument("--no-compile", action="store_true", help="fast variant without torch.compile of the decoder")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the decoder (default: inductor's default; max-autotune-no-cudagraphs "
                         "spent over 4 minutes autotuning one decoder on the H200)")
    ap.add_argument("--decode-only", action="store_true", help="time the decoder variants alone (see above)")
    ap.add_argument("--decoders", default=",".join(DECODERS), help="with --decode-only: which decoder variants")
    ap.add_argument("--profile", action="store_true", help="CUDA: a torch.profiler table of one token-part call "
                    "(with --decode-only: of one decoder call)")
    ap.add_argument("--profile-rows", type=int, default=25, help="with --profile: rows of the kernel table")
    ap.add_argument("--profile-variants", default="fast", help="with --profile: which variants (comma-separated; "
                    "with --decode-only: decoder variants)")
    ap.add_argument("--count-ops", action="store_true",
                    help="per config, on the meta device: ops per eager pass with and without the precomputed AdaLN "
                         "modulations, and the ada_lin bytes a pass no longer reads (no timing)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--leak-check", action="store_true", help="CUDA: record the allocation history and print, after "
                    "each variant, the graph-pool segments that outlive it and what pins them")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if not check_variant(v)]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: use fp32-eager, bf16-eager, fast, or fast-<modifiers> "
                 f"joined by '-' from {', '.join(MODIFIERS)}")
    if args.quick:
        args.reps = 2
    device = torch.device(args.device)
    if args.leak_check and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "cfg": 1.5, "schedule": "default"}
    print(json.dumps(info))
    out = {"info": info, "results": {}}
    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    if args.count_ops:
        for name in args.configs.split(","):
            out["results"][name] = count_pass_ops(name, args.batch)
            save()
        return
    if args.decode_only:
        for name in args.configs.split(","):
            out["results"][name] = bench_decode(name, args, device)
            save()
        return
    for name in args.configs.split(","):
        out["results"][name] = bench_config(name, args, device, save, out["results"].setdefault(name, {}))
        save()
    print_ratios(out["results"])


OFFICIAL = {  # the official HMAR sampler on the H200 (the performance issue's reference figures): ms, ms, ms, GB
    "hmar-d16": dict(tokens=136, decode=53, e2e=189, peak=6.1), "hmar-d30": dict(tokens=404, decode=53, e2e=457, peak=13.9),
    "hmar-d16-512": dict(tokens=345, decode=211, e2e=556, peak=17.9),
    "hmar-d30-512": dict(tokens=1250, decode=211, e2e=1461, peak=25.8)}
GOALS = {"hmar-d16": (30, 18), "hmar-d30": (120, 18), "hmar-d16-512": (70, 80), "hmar-d30-512": (380, 80)}
"""The issue's sampling goals per config: (tokens within, decode within) in ms; end to end >= 3x the official
sampler with at most half its peak memory."""


def print_ratios(results: dict) -> None:
    """Side by side: every variant against the first of its config (same process); HMAR against VAR of the same size
    where both ran; and the goal configs against the official sampler's reference figures and the issue's goals."""
    print("\nratios (same process; > 1: faster than the config's first variant):")
    for name, r in results.items():
        first, *rest = r
        for v in rest:
            print(f"  {name:14s} {v:26s} vs {first}: tokens {r[first]['tokens_ms'] / r[v]['tokens_ms']:.2f}x  "
                  f"decode {r[first]['decode_ms'] / r[v]['decode_ms']:.2f}x  e2e {r[first]['e2e_ms'] / r[v]['e2e_ms']:.2f}x")
    for name, r in results.items():
        other = results.get(name.replace("hmar", "var")) if name.startswith("hmar") else None
        for v in [v for v in r if other and v in other]:
            print(f"  {name:14s} {v:26s} HMAR vs VAR: e2e {other[v]['e2e_ms'] / r[v]['e2e_ms']:.2f}x, "
                  f"tokens {other[v]['tokens_ms'] / r[v]['tokens_ms']:.2f}x")
    rows = [(n, v, x) for n, r in results.items() if n in OFFICIAL for v, x in r.items() if "peak_gb" in x]
    if rows:
        print("\nagainst the official sampler (reference figures) and the goals (tokens / decode within, e2e >= 3x, "
              "peak <= 0.5 of the official; memory also with the graph pools):")
    for name, v, x in rows:
        o, (t_goal, d_goal) = OFFICIAL[name], GOALS[name]
        e2e, mem, mem_pools = o["e2e"] / x["e2e_ms"], x["peak_gb"] / o["peak"], (x["peak_gb"] + x["pools_gb"]) / o["peak"]
        ok = lambda c: "met" if c else "NOT met"  # noqa: E731
        print(f"  {name:14s} {v:26s} e2e {e2e:.2f}x ({ok(e2e >= 3)})  tokens {x['tokens_ms']:.1f} / {t_goal} ms "
              f"({ok(x['tokens_ms'] <= t_goal)})  decode {x['decode_ms']:.1f} / {d_goal} ms ({ok(x['decode_ms'] <= d_goal)})  "
              f"peak {mem:.2f} ({ok(mem <= 0.5)}), with pools {mem_pools:.2f} ({ok(mem_pools <= 0.5)})")


if __name__ == "__main__":
    main()
