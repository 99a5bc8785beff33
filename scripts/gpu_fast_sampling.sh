#!/usr/bin/env bash
# The sampling fast path on one H200: correctness first, then every change against the path it replaces, side by
# side in one process (benchmarks/bench_sample.py). Nothing to carry (but see the compile caches below); logs come
# back as $OUT/fastN.tgz. Each call keeps inside its LIMIT (a deadline per step); send call 2 while the machine is
# warm (it goes back after 30 s idle).
#   call 1: the graphed-sampling equality tests (and the fused-GELU, sub-pixel and freed-graph ones), then hmar-d16
#           and hmar-d16-512 in the variants of 2026-12-02 (the top-k draw against the sort draw, fused GELU,
#           one-call decode), each with a profile of one compiled variant
#   call 2: hmar-d30 and hmar-d30-512, then the decoder variants (sub-pixel up-sampling against plain)
#   call 3: tests/test_accel.py whole (the compile-heavy tests at its end need about 4 minutes)
#   call 4: the decoder as CUDA graphs in the loop graph's pool, and pools reserved at the warm-up's peak (the GPU
#           test, then every config with and without each; ran in the second session of 2026-12-02 as
#           fast-compiled{,-decgraph,-reserve,-decgraph-reserve}, the names before both became the default)
#   call 5: a profile of the hmar-d30 token loop, then hmar-d16 with its blocks compiled in max-autotune mode
#           against the default mode
#   call 6 (written in the second session of 2026-12-02 for the next one): the q/k L2 normalisation inside the
#           Triton attention kernel (hmar.attention.FUSED_QK_NORM): its GPU tests, the attention alone at the
#           training shapes of d16, d30 and d16-512 (q, k, v as views of the packed projection, every column with
#           the normalisation), compiled hmar-d16 training unfused vs fused side by side, then hmar-d16 and
#           hmar-d30 sampling with and without it (~9 minutes)
#           (ran 2026-12-02, third session: its model GPU test failed on a criterion between two fp16 runs, since
#           rewritten against an fp32 model; the rest in BENCHMARKS.md 1c, 2f, 3f)
#   call 7 (third session of 2026-12-02): that GPU test again, then the sampling configs call 6 left (hmar-d16-512,
#           hmar-d30-512) with and without it, hmar-d30 again in the reverse order (is 1.11x an order effect?), and
#           compiled hmar-d16-512 training unfused vs fused (~9 minutes; ran then, BENCHMARKS.md 1c, 2f, 3f)
#   call 8 (written then for the next session): GraphedModel's head-count default for the fused normalisation (its GPU
#           test, then hmar-d30 and hmar-d16 fast-compiled against -noqknorm / -qknorm: the default must pick the
#           faster), then compiled hmar-d30 training unfused vs fused (~10 minutes)
#   call 9 (fourth session of 2026-12-02): call 8 showed the default right (d30 fused
#           1.05x, d16 unfused 1.02x) and a profile put the 512 px loss in the Triton forward at long passes, so: the
#           GPU test again (now with a token limit), then hmar-d30-512 with every pass fused / fused up to 256 or 576
#           tokens / none, hmar-d16-512 unfused vs fused up to 256, then the forward tiles against compiled
#           normalise + SDPA at the sampler's shapes (benchmarks/sweep_attention_fwd.py --candidates; ~9 minutes)
#   (ran then: BENCHMARKS.md 3g; the sampling step again as TAG=fast9b after a variant-name fix)
#   call 10 (for the next session): the default's GPU assertion (GraphedModel() equals the forced-fused run), a
#           profile of one decoder call at 256 and 512 px (where the 21 / 90 ms go against the 18 / 80 ms goals),
#           then the token limit itself against the default 256 (= 169 at 512 px: no scale between): 324 and 576 at
#           hmar-d30-512, 81 and 324 at hmar-d16-512
#           (the configs with passes on both sides of it; ~9 minutes)
#   call 11 (for the next session): inductor's coordinate descent tuning of its elementwise and normalisation
#           kernels (about 25 ms of a hmar-d16 training step, BENCHMARKS.md 2g) in compiled hmar-d16 training and in
#           hmar-d16 / hmar-d30 sampling and in the decoder alone, each against the defaults side by side (~9 minutes)
#   12: the decoder's GroupNorms from per-channel statistics + NHWC up-sampling (FastDecoder(nhwc_kernels=True)):
#           the compiled decoder alone with a profile, then hmar-d30 / d30-512 / d16 / d16-512 sampling (~5 minutes)
#   13: the same as the default (fast-compiled) against nhwc_kernels=False, each variant's pools alone (~6 minutes)
#   14 (2026-12-03): the sub-pixel up-sampling convs with the NHWC interleave (FastDecoder(subpixel=True) beside the
#           NHWC GroupNorms): the compiled decoder alone against the default, both profiled, 256 and 512 px (~4 minutes)
#   15 (2026-12-03): the same inside the sampler, every goal config, default against -subpixel (~7 minutes)
#   16 (2026-12-03, after sub-pixel became the default): the one-graph GPU test, then
#           hmar-d30 and hmar-d16 with every compiled block one graph (the default since then) against -graphbreak
#           (the graph break of the Triton checks put back), the default profiled with the kernel time by kind,
#           then the decoder GPU tests (~6 minutes)
#   17: the same comparison at hmar-d16-512 and hmar-d30-512 (~5 minutes)
#   18 (2026-12-03, second session): the inference kernel (one dense block, no log-sum-exp, the q/k normalisation on
#           the tiles): its GPU tests, then every sampling pass shape alone, as CUDA graphs, against the training
#           forward and normalise + SDPA (benchmarks/sweep_attention_fwd.py; ~6 minutes)
#   19: hmar-d30 and hmar-d16 sampling, the inference kernel (the default) against -trainfwd, the default profiled
#           (also hmar-d16 after two hmar-d30 variants: the recompile-limit fix on the GPU; ~6 minutes)
#   20: the same at hmar-d16-512 and hmar-d30-512, and -qknorm (the inference kernel in every pass, the long ones
#           too; ~7 minutes)
#   22: hmar-d30-512 again, the default alone (its tokens were 380.9 ms in call 21 against the 380 ms goal), then the
#           decoder GPU tests that ran out of time in call 16 (~7 minutes)
#   21: the deferred residual branches (each block adds the branch of the block before inside its first LayerNorm's
#           kernel) and the q / v biases and the temperature read by the inference kernel: the GPU tests of both, then
#           every goal config against -nodefer and -biascat, the default profiled (~8 minutes)
#   23 (third session of 2026-12-03): one pool block for the loop and the decoder (the loop's first capture warms the
#           decoder up and reserves the larger need) and the reservations measured on a second warm-up: their GPU
#           test, then every goal config against -noguest-warm1 (the pools until then) and -dec8 (~9 minutes)
#           (ran then: one block served both, but the decoder's block alone kept peak + pools above 0.5 of the official
#           at 256 px, and a pool of the run's first variant outlived it; BENCHMARKS.md 3l)
#   24: the decoder's full-resolution part in two chunks (the new default) against one (-fr1), every goal config, then
#           which live blocks pin a graph pool after its variant is dropped (--leak-check, hmar-d16; ~9 minutes)
#   25: the decoder GPU tests of call 22 (with the new pool and chunk tests) alone (~5 minutes)
#           (call 24 ran: the chunks saved 0.25 GB at 256 px and 1.0 GB at 512 px, less than their size, as one
#           compiled graph let inductor interleave them; and the pinning block was cuBLAS's workspace of the capture
#           stream, allocated in the first capture's pool)
#   26: after both fixes (the two decoder parts compiled apart; warm-ups and captures on one stream): the pool test,
#           every goal config against -fr1, then the decoder GPU tests in the time left (~9.5 minutes)
#   27: the default chosen from call 26 (no chunks at 256 px, so one compiled decoder graph; 2 at 512 px) against
#           -fr2 at 256 px (~3 minutes; ran then: one graph's capture took an activation more, so the two parts stay)
#   28 (for the next session): call 27's step on the final default (no chunks at 256 px, two compiled parts), so
#           that its memory is measured as the first variant of its config (~3 minutes)
#   29 (fourth session of 2026-12-03): the token draw of every pass in one Triton kernel (hmar.draw_kernel): its GPU
#           tests and the graphed-sampling equality tests (which now draw with it), the draw alone per pass shape
#           against the torch ops (benchmarks/bench_draw.py, 4 / 8 / 16 warps), then every goal config against
#           -torchdraw, the default profiled (~6 minutes)
#           (ran then: the draw 2.1-2.6x faster than the torch ops alone, 8 warps the fastest, tokens 1.02x faster; but
#           its 64 serial reductions made it latency-bound: 2.4 ms of the 256 px loops, 6.8 ms at 512 px with 16 warps)
#   30: call 29's steps after the radix select took two bits per step (16 three-value reductions instead of 32
#           sums, per filter) and the default went to 8 warps (~6 minutes)
#           (ran then: no faster, 1.89 against 1.84 ms at the 1024-token pass alone: the kernel is bound by its ALU work,
#           every step reading every lane, not by the steps' latency)
#   31: call 29's steps on the final kernel: one bit per step again, one compare fewer per lane and step (the padding's
#           keys below every candidate, the mass 0 outside the top-k set), 8 warps (~6 minutes)
#           (ran then: the draw 3.0x / 2.6x faster than the torch ops at 256 / 512 px, token loops 1.02-1.06x faster;
#           BENCHMARKS.md 3m)
#   32 (2026-12-04): the blocks' GEMMs in fp8 e4m3 (hmar.model.fp8, opt-in): its GPU tests, the four linears alone at
#           the largest passes of every goal config and the logits' error against fp32 next to bf16's
#           (benchmarks/bench_fp8.py), then hmar-d16 and hmar-d16-512 against -fp8 and -fp8fast, fp8 profiled (~9 minutes)
#   33: the same sampling comparison at hmar-d30 and hmar-d30-512 (~8 minutes)
#           (call 32 ran: the GEMMs alone 1.4-1.6x faster, but the loops 0.85-0.99x: inductor's GELU + quantisation
#           of fc2's input made two passes over the 4x-wide rows, 12.7 ms at hmar-d16-512; now a Triton kernel)
#   35: after call 34 (hmar-d16-512 tokens 68.6 ms with -fp8fast; hmar-d30 failed: cuBLAS has no fast-accumulation
#           kernel for M = 32, K = 7680, N = 1920): the tests, then hmar-d30 / d30-512 against -fp8fast and -fp8
#   36: call 34's hmar-d16 / d16-512 comparison again (one run of each so far; ~4 minutes)
#   34: call 32 with that kernel (its tests too), the GEMMs alone (no error part), then hmar-d30 / hmar-d30-512
#           against -fp8fast (~9 minutes)
#   37 (2026-12-04, second session): the residual add + LayerNorm + modulation as one Triton kernel
#           (hmar.model.norm_kernel, GraphedModel's fused_norm, now on by default): its GPU tests, fp8's (the four
#           commits after the first session's last call), the graphed-sampling equality tests; then the kernel alone
#           against inductor's at every pass size (benchmarks/bench_norm.py --sweep), then every config against
#           -opsnorm (inductor's kernels, the default until then) with profiles (~9 minutes)
#   38: after call 37 (1.02-1.05x at d30 / d30-512 / d16-512, 0.98x at d16; the GPU test asked for class ids the tiny
#           models lack): the kernel's tests, the kernel alone with its launch configurations from call 37's sweep
#           against the ops compiled with dynamic shapes (as the blocks are), then call 37's comparison again in the
#           reverse order (~8 minutes)
#   39: the kernel in training (its backward; blocks.FUSED_NORM_TRAINING): its GPU tests, then compiled hmar-d16
#           training with the ops against the kernel (bench_train.py --fused-norm both). Each variant's first step
#           compiles for more than 2 minutes: run it with LIMIT=580 (~9.5 minutes). It ran on 2026-12-04 with the last
#           160 s of device time: the tests passed, the first compile did not finish.
#   40: the same for hmar-d30 (batch 16) and hmar-d16-512 (batch 8), after call 39 (~10 minutes)
#   41: the draw kernel's k-th largest logit by four 8-bit histogram rounds (hmar.draw_kernel.HISTOGRAM_TOP_K, off):
#           the norm kernel's GPU tests again (after the training commit) and the draw tests, then the draw alone
#           (bench_draw.py --warps 8 --hist), then hmar-d16-512 and hmar-d30 against -histdraw (~7 minutes)
#   42: the small-pass Triton GEMM (hmar.model.skinny_gemm, blocks.SKINNY_GEMM_MAX_ROWS, off): its GPU tests, the
#           GEMMs alone against cuBLAS at every pass of <= 1152 rows (bench_skinny.py), then hmar-d30, hmar-d16 and
#           hmar-d16-512 against -skinny1152 (~9 minutes)
#   43: calls 41 and 42 in one (for a session short of device time): both experiments' tests and benches, then
#           hmar-d16-512 and hmar-d30 against -histdraw, -skinny1152, -skinnywide1152 (qkv / fc1 only) and
#           -histdraw-skinny1152 (~10 minutes)
#   44: training with each block compiled on its own (hmar train --compile-scope blocks, torchtitan's regional
#           compilation: one compiled graph for every block, so the compile no longer grows with depth) against the
#           whole model compiled, side by side: the training GPU tests first (every compile variant against the
#           eager plain path), then hmar-d30 (batch 16; its whole-model compile took 108-147 s), then hmar-d16
#           (batch 32) (~9 minutes)
#   45: with blocks compiled one by one (cheap compiles), the norm kernel in training against the ops for hmar-d16,
#           hmar-d30 and hmar-d16-512 (~8 minutes; after call 44 shows the per-block compile as fast as the whole
#           model's)
#   46: compiled hmar-d16 training in torch.compile's default mode against reduce-overhead (the forward and backward
#           as CUDA graphs: a d16 step had 3.4 ms between its kernels, 2g), then a profile of compiled hmar-d30
#           training, which has none (~7 minutes)
#   47: with blocks compiled one by one, torch.compile's default mode against max-autotune-no-cudagraphs (Triton GEMM
#           templates autotuned against cuBLAS, with the bias / GELU / gate work fused into their epilogues and the
#           modulation into their prologues where inductor can), hmar-d16 then hmar-d30 (~9 minutes; slower in
#           sampling, 3d, where the passes are small and dynamic; training's are large and static)
#   48 (written in the first session of 2026-12-05, which had no GPU, for a session short of device time): the three
#           training experiments of calls 44, 46 and 47 on hmar-d16 alone, its compiles being the cheapest (whole
#           model vs blocks, default vs reduce-overhead, blocks in default vs max-autotune-no-cudagraphs; ~9 minutes,
#           LIMIT=560); the GPU tests of call 44 and the d30 / d16-512 runs follow in a later call
#           (2026-12-06, on an H100: its first two steps and train-gpu-tests ran, BENCHMARKS.md 2h: blocks 0.95x,
#           reduce-overhead 1.01x, 3 GPU tests passed; autotune-train-d16 did not fit the device time left)
#   49 (2026-12-07, for a session whose device time went to failed starts): call 43 cut to what decides its two
#           options: the draw kernel's and the small-pass GEMM's GPU tests, then hmar-d16-512 (the one sampling
#           config over its token budget) with the histogram draw, the small-pass GEMM, both, and neither (~6 minutes)
#   50 (2026-12-07, second session): fp8 training (hmar.model.fp8_training, hmar train --fp8): its GPU tests, then
#           compiled hmar-d16 and hmar-d30 training with the blocks' GEMMs in bf16 against fp8 (LIMIT=560, ~9.5 minutes)
#   51: the same at hmar-d16-512, then hmar-d30 (if call 50 ran out of time before it)
#           (third session of 2026-12-07, on an H100 short of device time: the tests and hmar-d16 ran, fp8 0.93x,
#           BENCHMARKS.md 2i; the tests' three set-up faults fixed after; hmar-d30's fp8 half did not fit)
#   52 (written then): the fp8 GPU tests again, a profile of the compiled fp8 hmar-d16 step (what the casts and
#           the backward's transposed copies cost against the GEMMs they feed), then hmar-d30 bf16 vs fp8
#           (LIMIT=580, ~9.5 minutes: d30's two cold compiles take about 2 minutes each)
#   54 (2026-12-07, sixth session): the whole model compiled in max-autotune-no-cudagraphs mode against the default
#           mode, hmar-d16 training (Triton GEMM templates autotuned against cuBLAS, with inductor's epilogue fusion;
#           call 47 did the same with blocks compiled one by one, which costs 5 % at hmar-d16, 2h), then, in the time
#           left, hmar-d30 bf16 vs fp8 (2j measured it on an H100 only) (~10 minutes)
#           (run cut down as fast55 on an H100 with 754 s left: the max-autotune compile did not finish in ~320 s;
#           its log has cuBLAS 1.21-1.34x faster than every Triton template at the block GEMMs, BENCHMARKS.md 2k)
#   56 (2026-12-07, seventh session): inductor's fusion settings on the elementwise and norm kernels where 2g
#           puts the training gap: compiled hmar-d16 training with the defaults against aggressive_fusion,
#           combo_kernels and triton.prefer_nd_tiling, each alone, one process; then hmar-d30 bf16 vs fp8 (~10
#           minutes). Step bf16-profile-P: the default step profiled (the bf16 counterpart of 2j's fp8 profile)
#           (ran on an H100 as fast56 with knobs-train-d16 alone, then fast56b-d: norm-train-d30 bf16-profile-d16,
#           norm-train-d16-512, quick-tests train-gpu-tests; all 1.00-1.01x, BENCHMARKS.md 2l)
#   57 (2026-12-07, eighth session): profiles of the default step at hmar-d16, hmar-d30 and hmar-d16-512 on an H200
#           (the goals' card), with inductor's kernel names long enough to list every op they fuse: the gaps to the
#           floors of benchmarks/floors_train.py (BENCHMARKS.md 2m: 23.4, 51.5 and 18.5 ms) split by kernel (~7 minutes)
#           (ran on an H100 with LIMIT=400: hmar-d16 and hmar-d30 profiled, hmar-d16-512 cut by the deadline,
#           BENCHMARKS.md 2n; still to run on an H200)
#   58 (same session): hmar-d30 then hmar-d16 bf16 vs fp8 on an H200 (2i / 2j measured them on an H100 only)
#   59 (same session, for the next one): whole compiled training steps with the gradient clipping as
#           clip_grad_norm_'s multiply pass against inside the fused AdamW kernel (the new default; 2n measured only
#           the optimiser part: 1.10x at hmar-d30), at hmar-d30, hmar-d16 and hmar-d16-512 (~8 minutes: the second
#           variant of each reuses the first one's compiled graph)
#   60 (2026-12-07, ninth session): the packed attention form (the Triton kernels take the qkv projection itself
#           and write its gradient in its own layout, hmar.attention.packed_attention): its GPU tests and the q/k
#           normalisation ones, then compiled hmar-d16 training with the normalisation as ops, in the kernels with
#           q, k, v unpacked, and in the kernels packed, side by side (~6 minutes)
#   61 (same session): hmar-d30, then hmar-d16-512, ops against packed (~9 minutes)
#   62 (same session, after the packed form in the kernels became the training default, hmar train --qk-norm auto):
#           the GPU tests of both, of the sampler's layers with it, and of training (eager, compiled, blocks, CUDA
#           graphs, qk-norm ops against the plain eager path), then the new default hmar-d16 step profiled (~9 minutes)
#   63 (2026-12-08): the training goals on the goals' card (an H200; 2h-2o ran on H100s): hmar-d16, then
#           hmar-d16-512, the q/k normalisation as ops against the default (in the kernels, packed) (~8 minutes)
#   64 (same session): hmar-d30 the same way, then the attention table of BENCHMARKS.md section 1 again (the issue's
#           grid, the kernels as they are now: section 1 dates from 2026-11-29) (~9 minutes)
#   65 (same session, after dq by atomics was built, hmar.attention.triton_kernel.DQ_ATOMIC): its GPU tests, the
#           attention alone with the dQ tiles against dq by atomics (the issue's grid in bf16, then the model's
#           layout with the normalisation in the kernels at the training shapes), then compiled hmar-d16-512
#           training both ways (~9 minutes)
#   66 (same session): compiled hmar-d16, then hmar-d30 training, dQ tiles against dq by atomics (~9 minutes)
# Steps can also be named one by one (quick-tests tests d16 d16-512 var-d16 d30 decoders; scripts/gpu_session.sh
# does; quick-tests: the graphed-sampling equality tests alone, tests: the rest of tests/test_accel.py), with
# LIMIT (s, default 560) the deadline of all of them and TAG the name of the log folder / tgz.
# Variants (bench_sample.py's docstring): fast = what `hmar sample --fast` runs; fast-compiled = --compile; modifiers
# joined by '-': onecall = --decode-batch 16, gelu = the fused-GELU experiment, sortdraw = the draw until 2026-12-02
# (a sort over all V logits instead of torch.topk's candidates), passgraphs / percall = a change of 2026-12-01 undone.
# fp32-eager is the official sampler's way and the baseline of the >= 3x goal.
set -u
[ $# -ge 1 ] || { echo "usage: gpu_fast_sampling.sh 1|2|3|STEP..."; exit 2; }
case $1 in 1) STEPS="quick-tests d16 d16-512" ;; 2) STEPS="d30 decoders" ;; 3) STEPS="tests" ;;
  4) STEPS="decgraph-test decgraph" ;; 5) STEPS="d30-profile autotune" ;;
  6) STEPS="qknorm-tests qknorm-attn qknorm-train qknorm-sample" ;;
  7) STEPS="qknorm-tests qknorm-sample-512 qknorm-sample-d30-reversed qknorm-train-512" ;;
  8) STEPS="qknorm-default-test qknorm-default qknorm-train-d30" ;;
  9) STEPS="qknorm-default-test qkmax-sample sweep-fwd" ;;
  10) STEPS="qknorm-default-test decoder-profile qkmax-threshold" ;;
  11) STEPS="cdt-train cdt-sample cdt-decode" ;;
  12) STEPS="nhwc-decode nhwc-sample-d30 nhwc-sample-d16" ;; 13) STEPS="nhwc-default" ;;
  14) STEPS="subpixel-decode" ;; 15) STEPS="subpixel-sample" ;; 16) STEPS="onegraph-test graphbreak-sample decoder-tests" ;;
  17) STEPS="graphbreak-sample-512" ;; 18) STEPS="dense-tests sweep-passes" ;; 19) STEPS="dense-sample" ;;
  20) STEPS="dense-sample-512" ;; 21) STEPS="quick-tests sampling-pass-test defer-sample" ;;
  22) STEPS="d30-512-again decoder-tests" ;; 23) STEPS="pool-test pool-sample" ;;
  24) STEPS="pool-test fr-sample leak-check" ;; 25) STEPS="decoder-tests" ;;
  26) STEPS="pool-test fr-sample decoder-tests" ;; 27|28) STEPS="fr-default-256" ;;
  29|30|31) STEPS="draw-tests draw-bench draw-sample" ;;
  32) STEPS="fp8-tests fp8-bench fp8-sample-d16" ;; 33) STEPS="fp8-sample-d30" ;;
  34) STEPS="fp8-tests fp8-gemm fp8-sample-d16 fp8-sample-d30-fast" ;; 35) STEPS="fp8-tests fp8-sample-d30-all" ;;
  36) STEPS="fp8-sample-d16-again" ;;
  37) STEPS="norm-tests norm-bench norm-sample" ;; 38) STEPS="norm-kernel-tests norm-bench norm-sample-again" ;;
  39) STEPS="norm-train-tests norm-train-d16" ;; 40) STEPS="norm-train-d30 norm-train-d16-512" ;;
  41) STEPS="norm-kernel-tests hist-draw-tests hist-draw-bench hist-draw-sample" ;;
  42) STEPS="skinny-tests skinny-bench skinny-sample" ;;
  43) STEPS="hist-draw-tests skinny-tests hist-draw-bench skinny-bench combo-sample" ;;
  49) STEPS="hist-draw-tests skinny-tests combo-sample-512" ;;
  44) STEPS="train-gpu-tests scope-train-d30 scope-train-d16" ;;
  45) STEPS="blocks-norm-train-d16 blocks-norm-train-d30 blocks-norm-train-d16-512" ;;
  46) STEPS="graphs-train-d16 blocks-profile-d30" ;; 47) STEPS="autotune-train-d16 autotune-train-d30" ;;
  48) STEPS="scope-train-d16 graphs-train-d16 autotune-train-d16" ;;
  50) STEPS="fp8-train-tests fp8-train-d16 fp8-train-d30" ;; 51) STEPS="fp8-train-d16-512 fp8-train-d30" ;;
  52) STEPS="fp8-train-tests fp8-train-profile-d16 fp8-train-d30" ;;
  54) STEPS="autotune-model-train-d16 fp8-train-d30" ;;
  56) STEPS="knobs-train-d16 fp8-train-d30" ;;
  57) STEPS="bf16-profile-d16 bf16-profile-d30 bf16-profile-d16-512" ;; 58) STEPS="fp8-train-d30 fp8-train-d16" ;;
  59) STEPS="clip-train-d30 clip-train-d16 clip-train-d16-512" ;;
  60) STEPS="packed-tests packed-train-d16" ;; 61) STEPS="packed2-train-d30 packed2-train-d16-512" ;;
  62) STEPS="packed-tests accel-qk-tests train-gpu-tests bf16-profile-d16" ;;
  63) STEPS="packed2-train-d16 packed2-train-d16-512" ;; 64) STEPS="packed2-train-d30 attn-grid" ;;
  65) STEPS="dqa-tests dqa-attn dqa-train-d16-512" ;; 66) STEPS="dqa-train-d16 dqa-train-d30" ;;
  *) STEPS="$*" ;; esac
TAG=${TAG:-fast$1}
export PYTHONUNBUFFERED=1
L=/tmp/logs/$TAG T0=$SECONDS LIMIT=${LIMIT:-560}
mkdir -p "$L" "${OUT:=/tmp/out}"
# inductor's and Triton's compile caches: each call starts on a fresh machine, so they come back as
# $OUT/compile-cache.tgz (when under 60 MB); copy that file to .carry/ here and send the next call with
# carry [".carry/compile-cache.tgz"] to skip recompiling what an earlier call compiled (the caches key on the code)
C=/tmp/compile-cache
[ -f .carry/compile-cache.tgz ] && tar xzf .carry/compile-cache.tgz -C /tmp && echo "compile caches: $(du -sh $C | cut -f1) carried"
export TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton
save_caches() {
  [ -d $C ] && tar czf "$OUT/compile-cache.tgz" -C /tmp compile-cache 2>/dev/null || return 0
  [ "$(stat -c %s "$OUT/compile-cache.tgz")" -lt 60000000 ] || { rm -f "$OUT/compile-cache.tgz"; echo "compile caches over 60 MB: not kept"; }
}
trap 'tar czf "$OUT/$TAG.tgz" -C /tmp/logs "$TAG"; save_caches' EXIT
left() { local s=$(( LIMIT - (SECONDS - T0) )); echo $(( s > 1 ? s : 1 )); }
step() { echo "== $(date -u +%T) $*"; }
S=benchmarks/bench_sample.py
QUICK="graphed_sampling or whole_loop or exponential_draw or freed or fused_gelu or subpixel"
bench() {  # bench NAME CONFIGS VARIANTS [more args]
  local name=$1 configs=$2 variants=$3; shift 3
  step "sampling $name: $configs / $variants"
  timeout "$(left)" python3 $S --reps 3 --configs "$configs" --variants "$variants" "$@" \
    --json "$L/sample-$name.json" > "$L/sample-$name.log" 2>&1
  grep -E '^  (hmar|var)|x$|x,' "$L/sample-$name.log"
}
train_bench() {  # train_bench NAME PRESET WHAT [bench_train args]: compiled training at the goal batch of PRESET
  local name=$1 preset=$2 what=$3 batch; shift 3
  batch=$(case $preset in hmar-d16) echo 32;; hmar-d30) echo 16;; *) echo 8;; esac)
  step "compiled $preset training (batch $batch): $what"
  timeout "$(left)" python3 benchmarks/bench_train.py --preset "$preset" --batch "$batch" --compile --steps 10 \
    --warmup 3 "$@" --json "$L/train-$name-$preset.json" > "$L/train-$name-$preset.log" 2>&1
  grep img/s "$L/train-$name-$preset.log"
}
gpu_tests() {  # gpu_tests NAME CAP_S FILE -k EXPR: one pytest selection, at most CAP_S seconds, log NAME.log
  local name=$1 cap=$2 file=$3; shift 3
  timeout "$(( $(left) < cap ? $(left) : cap ))" python3 -m pytest -q -p no:cacheprovider "$file" "$@" \
    > "$L/$name.log" 2>&1; echo "$name: exit $?"
  tail -3 "$L/$name.log"
}
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L/machine.txt" 2>&1
for s in $STEPS; do
  case $s in
    quick-tests)
      step "GPU tests: graphed sampling == eager"
      gpu_tests quick-tests 120 tests/test_accel.py -k "$QUICK" ;;
    tests)
      step "GPU tests"
      rest=()   # what quick-tests ran already is left out (an array: the -k expression holds spaces)
      [[ " $STEPS " == *" quick-tests "* ]] && rest=(-k "not ($QUICK)")
      gpu_tests tests "$(left)" tests/test_accel.py "${rest[@]}" ;;
    d16) bench d16 hmar-d16 fp32-eager,fast-compiled,fast-compiled-sortdraw,fast-compiled-gelu,fast-compiled-onecall,fast-compiled-gelu-onecall \
           --profile --profile-variants fast-compiled-gelu ;;
    d16-512) bench d16-512 hmar-d16-512 fp32-eager,fast-compiled,fast-compiled-sortdraw,fast-compiled-gelu-onecall \
           --profile --profile-variants fast-compiled ;;
    var-d16) bench var-d16 var-d16 fast-compiled,fast-compiled-sortdraw ;;
    d30) bench d30 hmar-d30,hmar-d30-512 fp32-eager,fast-compiled,fast-compiled-gelu-onecall ;;
    decgraph-test)
      step "GPU test: the graphed decoder in the loop pool"
      gpu_tests decgraph-test 150 tests/test_accel.py -k "graphed_decoder" ;;
    decgraph) bench decgraph hmar-d16,hmar-d16-512,hmar-d30,hmar-d30-512 \
                fast-compiled-nodecgraph-noreserve,fast-compiled-noreserve,fast-compiled-nodecgraph,fast-compiled ;;
    qknorm-tests)
      step "GPU tests: the q/k normalisation inside the kernels"
      gpu_tests qknorm-tests 150 tests/test_triton_attention.py -k "qk_norm" ;;
    qknorm-attn)
      step "attention alone with the L2-normalised q/k, the model's layout"
      for shape in "680 32 16" "680 16 30" "2240 8 16"; do set -- $shape
        timeout "$(( $(left) < 90 ? $(left) : 90 ))" python3 benchmarks/bench_attention.py --layout qkv --qk-norm \
          --N "$1" --B "$2" --H "$3" --dtypes bf16 --patterns block_diagonal --json "$L/attn-qknorm-$1-$2-$3.json" \
          >> "$L/attn-qknorm.log" 2>&1
      done
      grep -E "^(pattern|block)" "$L/attn-qknorm.log" ;;
    dqa-tests)
      step "GPU tests: dq by atomics (the kernels against the dQ tiles and fp32, the tuner with both forms)"
      gpu_tests dqa-tests 150 tests/test_triton_attention.py -k "dq_atomic or gpu_autotuned" ;;
    dqa-attn)
      step "attention forward + backward: dq by atomics against the dQ tiles (bf16 grid; the model's layout)"
      timeout "$(( $(left) < 200 ? $(left) : 200 ))" python3 benchmarks/bench_attention.py --dq-atomic --no-reference \
        --dtypes bf16 --json "$L/dqa-attn-grid.json" > "$L/dqa-attn.log" 2>&1
      timeout "$(( $(left) < 100 ? $(left) : 100 ))" python3 benchmarks/bench_attention.py --dq-atomic --no-reference \
        --layout qkv --qk-norm --N 680 2240 --B 8 16 32 --H 16 --dtypes bf16 --patterns block_diagonal \
        --json "$L/dqa-attn-model.json" >> "$L/dqa-attn.log" 2>&1
      grep -E "^(pattern|block)" "$L/dqa-attn.log" ;;
    dqa-train-d16|dqa-train-d30|dqa-train-d16-512)
      train_bench dqa "hmar-${s#dqa-train-}" "the Triton backward's dQ tiles against dq by atomics" --dq-atomic both ;;
    attn-grid)
      step "attention forward + backward, the issue's grid (section 1's table): ours, per-scale SDPA, masked SDPA"
      timeout "$(left)" python3 benchmarks/bench_attention.py --json "$L/attn-grid.json" > "$L/attn-grid.log" 2>&1
      grep -E "^(pattern|block)" "$L/attn-grid.log" ;;
    qknorm-train)
      step "compiled hmar-d16 training, q/k normalisation unfused vs fused"
      timeout "$(( $(left) < 260 ? $(left) : 260 ))" python3 benchmarks/bench_train.py --preset hmar-d16 --batch 32 \
        --compile --qk-norm both --json "$L/train-qknorm.json" > "$L/train-qknorm.log" 2>&1
      grep img/s "$L/train-qknorm.log" ;;
    qknorm-sample) bench qknorm-sample hmar-d16,hmar-d30 fast-compiled,fast-compiled-qknorm ;;
    qknorm-sample-512) bench qknorm-sample-512 hmar-d16-512,hmar-d30-512 fast-compiled,fast-compiled-qknorm ;;
    qknorm-sample-d30-reversed) bench qknorm-sample-d30-reversed hmar-d30 fast-compiled-qknorm,fast-compiled ;;
    qknorm-default-test)
      step "GPU test: GraphedModel's fused_qk_norm"
      gpu_tests qknorm-default-test 90 tests/test_accel.py -k "fused_qk_norm" ;;
    qknorm-default)
      bench qknorm-default-d30 hmar-d30 fast-compiled,fast-compiled-noqknorm
      bench qknorm-default-d16 hmar-d16 fast-compiled,fast-compiled-qknorm ;;
    qkmax-sample)
      bench qkmax-d30-512 hmar-d30-512 fast-compiled,fast-compiled-qkmax256,fast-compiled-qkmax576,fast-compiled-noqknorm
      bench qkmax-d16-512 hmar-d16-512 fast-compiled,fast-compiled-qkmax256 ;;
    decoder-profile)
      step "profile of one compiled bf16 channels_last decoder call, 256 and 512 px, batch 16"
      timeout "$(left)" python3 $S --decode-only --configs hmar-d16,hmar-d16-512 --decoders bf16-compiled-cl \
        --reps 5 --profile --profile-variants bf16-compiled-cl --json "$L/decoder-profile.json" \
        > "$L/decoder-profile.log" 2>&1; grep -E "decode bf16" "$L/decoder-profile.log" ;;
    qkmax-threshold)
      bench qkmax-threshold-d30-512 hmar-d30-512 fast-compiled,fast-compiled-qkmax324,fast-compiled-qkmax576
      bench qkmax-threshold-d16-512 hmar-d16-512 fast-compiled,fast-compiled-qkmax81,fast-compiled-qkmax324 ;;
    cdt-train)
      step "compiled hmar-d16 training: inductor defaults vs coordinate descent tuning"
      timeout "$(left)" python3 benchmarks/bench_train.py --preset hmar-d16 --batch 32 --compile \
        --inductor "" coordinate_descent_tuning=True --json "$L/train-cdt.json" > "$L/train-cdt.log" 2>&1
      grep img/s "$L/train-cdt.log" ;;
    cdt-sample) bench cdt hmar-d16,hmar-d30 fast-compiled,fast-compiled-cdt ;;
    cdt-decode)
      step "the compiled decoder alone, inductor defaults vs coordinate descent tuning, 256 and 512 px"
      timeout "$(left)" python3 $S --decode-only --configs hmar-d16,hmar-d16-512 --reps 5 \
        --decoders bf16-compiled-cl,bf16-compiled-cl-cdt --json "$L/decode-cdt.json" > "$L/decode-cdt.log" 2>&1
      grep -E "decode bf16" "$L/decode-cdt.log" ;;
    nhwc-decode)
      step "the compiled decoder alone, inductor's GroupNorm / up-sampling vs the NHWC forms, 256 and 512 px"
      timeout "$(left)" python3 $S --decode-only --configs hmar-d16,hmar-d16-512 --reps 5 \
        --decoders bf16-compiled-cl,bf16-compiled-cl-nhwc --profile --profile-variants bf16-compiled-cl-nhwc \
        --json "$L/decode-nhwc.json" > "$L/decode-nhwc.log" 2>&1
      grep -E "decode bf16" "$L/decode-nhwc.log" ;;
    subpixel-decode)
      step "the compiled decoder alone, default (NHWC) vs NHWC + sub-pixel up-sampling convs, 256 and 512 px"
      timeout "$(left)" python3 $S --decode-only --configs hmar-d16,hmar-d16-512 --reps 5 \
        --decoders bf16-compiled-cl-nhwc,bf16-compiled-cl-nhwc-subpixel --profile \
        --profile-variants bf16-compiled-cl-nhwc,bf16-compiled-cl-nhwc-subpixel \
        --json "$L/decode-subpixel.json" > "$L/decode-subpixel.log" 2>&1
      grep -E "decode bf16" "$L/decode-subpixel.log" ;;
    subpixel-sample) bench subpixel hmar-d30,hmar-d16-512,hmar-d16,hmar-d30-512 fast-compiled,fast-compiled-subpixel ;;
    nhwc-sample-d30) bench nhwc-d30 hmar-d30,hmar-d30-512 fast-compiled,fast-compiled-nhwc ;;
    nhwc-sample-d16) bench nhwc-d16 hmar-d16,hmar-d16-512 fast-compiled,fast-compiled-nhwc ;;
    nhwc-default) bench nhwc-default hmar-d30,hmar-d16-512,hmar-d16,hmar-d30-512 fast-compiled,fast-compiled-nonhwc ;;
    sweep-fwd)
      step "forward tiles of the Triton kernel at the sampler's dense passes, against normalise + SDPA"
      timeout "$(left)" python3 benchmarks/sweep_attention_fwd.py --candidates --json "$L/sweep-fwd.json" \
        > "$L/sweep-fwd.log" 2>&1; grep "^N=" "$L/sweep-fwd.log" ;;
    qknorm-train-d30)
      step "compiled hmar-d30 training, q/k normalisation unfused vs fused"
      timeout "$(left)" python3 benchmarks/bench_train.py --preset hmar-d30 --batch 16 --compile --steps 15 \
        --warmup 4 --qk-norm both --json "$L/train-qknorm-d30.json" > "$L/train-qknorm-d30.log" 2>&1
      grep img/s "$L/train-qknorm-d30.log" ;;
    qknorm-train-512)
      step "compiled hmar-d16-512 training, q/k normalisation unfused vs fused"
      timeout "$(left)" python3 benchmarks/bench_train.py --preset hmar-d16-512 --batch 8 --compile --steps 15 \
        --warmup 4 --qk-norm both --json "$L/train-qknorm-512.json" > "$L/train-qknorm-512.log" 2>&1
      grep img/s "$L/train-qknorm-512.log" ;;
    d30-profile) bench d30-profile hmar-d30 fast-compiled --profile --profile-variants fast-compiled --profile-rows 60 ;;
    graphbreak-sample) bench graphbreak hmar-d30,hmar-d16 fast-compiled,fast-compiled-graphbreak --profile \
                         --profile-variants fast-compiled --profile-rows 40 ;;
    graphbreak-sample-512) bench graphbreak-512 hmar-d16-512,hmar-d30-512 fast-compiled,fast-compiled-graphbreak ;;
    dense-tests)
      step "GPU tests: the inference kernel, compiled blocks as one graph"
      gpu_tests dense-tests 150 tests/test_triton_attention.py -k "inference or dense or one_graph" ;;
    sweep-passes)
      step "every sampling pass shape alone, as CUDA graphs: inference kernel, training forward, normalise + SDPA"
      timeout "$(left)" python3 benchmarks/sweep_attention_fwd.py --json "$L/sweep-passes.json" \
        > "$L/sweep-passes.log" 2>&1; grep -E "^N=|^  " "$L/sweep-passes.log" ;;
    dense-sample) bench dense hmar-d30,hmar-d16 fast-compiled,fast-compiled-trainfwd --profile \
                    --profile-variants fast-compiled --profile-rows 40 ;;
    dense-sample-512) bench dense-512 hmar-d16-512,hmar-d30-512 fast-compiled,fast-compiled-trainfwd,fast-compiled-qknorm ;;
    d30-512-again) bench d30-512-again hmar-d30-512 fast-compiled ;;
    pool-test)
      step "GPU test: one pool block for the loop and the decoder"
      gpu_tests pool-test 120 tests/test_accel.py -k "one_pool_block" ;;
    pool-sample) bench pools hmar-d30,hmar-d16,hmar-d16-512,hmar-d30-512 \
                   fast-compiled,fast-compiled-noguest-warm1,fast-compiled-dec8
                 grep -E "need / reserved" "$L/sample-pools.log" ;;
    fr-sample) bench fr hmar-d30,hmar-d16,hmar-d16-512,hmar-d30-512 fast-compiled,fast-compiled-fr1
               grep -E "need / reserved" "$L/sample-fr.log" ;;
    fr-default-256) bench fr-default-256 hmar-d30,hmar-d16 fast-compiled,fast-compiled-fr2 ;;
    draw-tests)
      step "GPU tests: the fused draw, and graphed sampling == eager with it"
      gpu_tests draw-tests 150 tests/test_draw_kernel.py
      gpu_tests quick-tests 150 tests/test_accel.py -k "$QUICK" ;;
    draw-bench)
      step "the draw alone, per pass shape: fused (4 / 8 / 16 warps) against the torch ops"
      timeout "$(left)" python3 benchmarks/bench_draw.py --json "$L/draw-bench.json" > "$L/draw-bench.log" 2>&1
      cat "$L/draw-bench.log" ;;
    hist-draw-tests)
      step "GPU tests: the draw kernel (the histogram select included)"
      gpu_tests hist-draw-tests 150 tests/test_draw_kernel.py ;;
    hist-draw-bench)
      step "the draw alone: the one-bit select against the histogram select (8 warps)"
      timeout "$(( $(left) < 120 ? $(left) : 120 ))" python3 benchmarks/bench_draw.py --warps 8 --hist \
        --json "$L/hist-draw-bench.json" > "$L/hist-draw-bench.log" 2>&1; tail -5 "$L/hist-draw-bench.log" ;;
    hist-draw-sample) bench hist-draw hmar-d16-512,hmar-d30 fast-compiled,fast-compiled-histdraw ;;
    skinny-tests)
      step "GPU tests: the small-pass GEMM"
      gpu_tests skinny-tests 150 tests/test_skinny_gemm.py ;;
    skinny-bench)
      step "the small-pass GEMMs alone: hmar's Triton GEMM against cuBLAS"
      timeout "$(( $(left) < 150 ? $(left) : 150 ))" python3 benchmarks/bench_skinny.py \
        --json "$L/skinny-bench.json" > "$L/skinny-bench.log" 2>&1; grep -E "^hmar|per sampling" "$L/skinny-bench.log" ;;
    skinny-sample) bench skinny hmar-d30,hmar-d16,hmar-d16-512 fast-compiled,fast-compiled-skinny1152 ;;
    combo-sample) bench combo hmar-d16-512,hmar-d30 \
                    fast-compiled,fast-compiled-histdraw,fast-compiled-skinny1152,fast-compiled-skinnywide1152,fast-compiled-histdraw-skinny1152 ;;
    combo-sample-512) bench combo-512 hmar-d16-512 \
                        fast-compiled,fast-compiled-histdraw,fast-compiled-skinny1152,fast-compiled-histdraw-skinny1152 ;;
    draw-sample) bench draw hmar-d30,hmar-d16,hmar-d16-512,hmar-d30-512 fast-compiled,fast-compiled-torchdraw \
                   --profile --profile-variants fast-compiled --profile-rows 30 ;;
    fp8-tests)
      step "GPU tests: fp8 GEMMs (the layer against its reference, graphed fp8 sampling == eager fp8)"
      gpu_tests fp8-tests 120 tests/test_fp8.py ;;
    fp8-bench)
      step "fp8: the four block linears alone, and the logits' error against fp32 (random weights, the shipped model)"
      timeout "$(( $(left) < 200 ? $(left) : 200 ))" python3 benchmarks/bench_fp8.py --shipped \
        --json "$L/fp8-bench.json" > "$L/fp8-bench.log" 2>&1; grep -E "sum over|error" "$L/fp8-bench.log" ;;
    fp8-gemm)
      step "fp8: the four block linears alone"
      timeout "$(( $(left) < 120 ? $(left) : 120 ))" python3 benchmarks/bench_fp8.py --part gemm \
        --json "$L/fp8-gemm.json" > "$L/fp8-gemm.log" 2>&1; grep -E "sum over" "$L/fp8-gemm.log" ;;
    norm-tests)
      step "GPU tests: the fused residual + LayerNorm + modulation kernel, fp8, graphed sampling == eager"
      gpu_tests norm-tests 150 tests/test_norm_kernel.py tests/test_fp8.py
      gpu_tests quick-tests 120 tests/test_accel.py -k "$QUICK" ;;
    norm-kernel-tests)
      step "GPU tests: the fused residual + LayerNorm + modulation kernel"
      gpu_tests norm-kernel-tests 150 tests/test_norm_kernel.py ;;
    norm-train-tests)
      step "GPU tests: the norm kernel (its backward for training included)"
      gpu_tests norm-train-tests 200 tests/test_norm_kernel.py ;;
    fp8-train-tests)
      step "GPU tests: fp8 training (the three products against the rounded operands, compiled training vs bf16)"
      gpu_tests fp8-train-tests 200 tests/test_fp8_training.py ;;
    fp8-train-d16|fp8-train-d30|fp8-train-d16-512)
      train_bench fp8 "hmar-${s#fp8-train-}" "the blocks' GEMMs in bf16 vs fp8" --fp8 both ;;
    fp8-train-profile-d16)
      train_bench fp8prof hmar-d16 "fp8 GEMMs, profiled (the casts and copies against the GEMMs)" --fp8 on --profile ;;
    norm-train-d16|norm-train-d30|norm-train-d16-512)
      train_bench norm "hmar-${s#norm-train-}" "LayerNorm + modulation as ops vs the kernel" --fused-norm both ;;
    scope-train-d16|scope-train-d30|scope-train-d16-512)
      train_bench scope "hmar-${s#scope-train-}" "the whole model compiled vs each block on its own" \
        --compile-scope both ;;
    blocks-norm-train-d16|blocks-norm-train-d30|blocks-norm-train-d16-512)
      train_bench blocks-norm "hmar-${s#blocks-norm-train-}" "blocks compiled one by one; norm as ops vs the kernel" \
        --compile-scope blocks --fused-norm both ;;
    graphs-train-d16|graphs-train-d30|graphs-train-d16-512)
      train_bench graphs "hmar-${s#graphs-train-}" "torch.compile's default mode vs reduce-overhead (CUDA graphs)" \
        --compile-mode default reduce-overhead ;;
    autotune-train-d16|autotune-train-d30|autotune-train-d16-512)
      train_bench autotune "hmar-${s#autotune-train-}" "blocks compiled one by one, default mode vs max-autotune" \
        --compile-scope blocks --compile-mode default max-autotune-no-cudagraphs ;;
    autotune-model-train-d16|autotune-model-train-d30|autotune-model-train-d16-512)
      train_bench autotune-model "hmar-${s#autotune-model-train-}" "the whole model compiled, default mode vs max-autotune" \
        --compile-scope model --compile-mode default max-autotune-no-cudagraphs ;;
    knobs-train-d16|knobs-train-d30|knobs-train-d16-512)
      train_bench knobs "hmar-${s#knobs-train-}" "inductor's fusion settings: defaults vs aggressive fusion, combo kernels, N-d tiling" \
        --inductor "" aggressive_fusion=True combo_kernels=True triton.prefer_nd_tiling=True ;;
    clip-train-d16|clip-train-d30|clip-train-d16-512)
      train_bench clip "hmar-${s#clip-train-}" "the clipping as its own pass vs inside the fused AdamW" \
        --clip-in-kernel both ;;
    packed-tests)
      step "GPU tests: the packed attention form and the q/k normalisation inside the kernels"
      gpu_tests packed-tests 200 tests/test_triton_attention.py -k "packed or qk_norm or normalisation_in_the_kernels" ;;
    accel-qk-tests)
      step "GPU tests: the sampler's layers with the normalisation in the kernels (GraphedModel, token limit)"
      gpu_tests accel-qk-tests 150 tests/test_accel.py -k "qk_norm" ;;
    packed-train-d16|packed-train-d30|packed-train-d16-512)
      train_bench packed "hmar-${s#packed-train-}" "q/k norm as ops vs in the kernels, q/k/v unpacked vs packed" \
        --qk-norm both --packed-qkv both ;;
    packed2-train-d16|packed2-train-d30|packed2-train-d16-512)
      train_bench packed2 "hmar-${s#packed2-train-}" "q/k norm as ops vs in the kernels with the packed projection" \
        --qk-norm both --packed-qkv on ;;
    bf16-profile-d16|bf16-profile-d30|bf16-profile-d16-512)
      # kernel_name_max_ops only lengthens inductor's kernel names (up to 40 fused ops each), so the profile's
      # top kernels say which ops of the model each one runs
      train_bench bf16-profile "hmar-${s#bf16-profile-}" "the default bf16 step, profiled" --profile \
        --inductor kernel_name_max_ops=40 ;;
    train-gpu-tests)
      step "GPU tests of training: eager, compiled, blocks compiled, CUDA graphs follow the eager plain path"
      gpu_tests train-gpu-tests 240 tests/test_training_fast.py -k gpu ;;
    blocks-profile-d16|blocks-profile-d30|blocks-profile-d16-512)
      train_bench blocks-profile "hmar-${s#blocks-profile-}" "blocks compiled one by one, profiled" \
        --compile-scope blocks --profile ;;
    norm-bench)
      step "the residual add + LayerNorm + modulation alone: hmar's kernel against inductor's, every pass size"
      timeout "$(( $(left) < 150 ? $(left) : 150 ))" python3 benchmarks/bench_norm.py --sweep \
        --json "$L/norm-bench.json" > "$L/norm-bench.log" 2>&1; grep -E "^hmar|per sampling" "$L/norm-bench.log" ;;
    norm-sample) bench norm hmar-d30,hmar-d16,hmar-d16-512,hmar-d30-512 fast-compiled,fast-compiled-opsnorm \
                   --profile --profile-variants fast-compiled --profile-rows 30 ;;
    norm-sample-again) bench norm-again hmar-d30,hmar-d16-512,hmar-d30-512,hmar-d16 fast-compiled-opsnorm,fast-compiled ;;
    fp8-sample-d16-again) bench fp8-d16-again hmar-d16-512,hmar-d16 fast-compiled,fast-compiled-fp8fast,fast-compiled-fp8 ;;
    fp8-sample-d30-all) bench fp8-d30-all hmar-d30,hmar-d30-512 fast-compiled,fast-compiled-fp8fast,fast-compiled-fp8 ;;
    fp8-sample-d30-fast) bench fp8-d30 hmar-d30,hmar-d30-512 fast-compiled,fast-compiled-fp8fast ;;
    fp8-sample-d16) bench fp8-d16 hmar-d16,hmar-d16-512 fast-compiled,fast-compiled-fp8,fast-compiled-fp8fast \
                      --profile --profile-variants fast-compiled-fp8 --profile-rows 30 ;;
    fp8-sample-d30) bench fp8-d30 hmar-d30,hmar-d30-512 fast-compiled,fast-compiled-fp8,fast-compiled-fp8fast \
                      --profile --profile-variants fast-compiled-fp8 --profile-rows 30 ;;
    leak-check)
      step "which live blocks pin a graph pool after its variant is dropped"
      timeout "$(left)" python3 $S --reps 1 --configs hmar-d16 --variants fast-compiled,fast-compiled-fr1 --leak-check \
        > "$L/leak-check.log" 2>&1; grep -A4 "leak check" "$L/leak-check.log" | head -40 ;;
    sampling-pass-test)
      step "GPU tests: the sampling passes' inference kernel with the biases and the temperature"
      gpu_tests sampling-pass-test 90 tests/test_triton_attention.py -k "sampling_pass or one_graph" ;;
    defer-sample) bench defer hmar-d30,hmar-d16,hmar-d16-512,hmar-d30-512 \
                    fast-compiled,fast-compiled-nodefer,fast-compiled-biascat \
                    --profile --profile-variants fast-compiled --profile-rows 30 ;;
    d16-profile) bench d16-profile hmar-d16 fast-compiled --profile --profile-variants fast-compiled --profile-rows 60 ;;
    onegraph-test)
      step "GPU test: a block compiled with dynamic shapes is one graph"
      gpu_tests onegraph-test 120 tests/test_triton_attention.py -k "dynamic_shapes" ;;
    decoder-tests)
      step "GPU tests: the fast decoder (graphed in the loop pool, NHWC, sub-pixel) against the plain one"
      gpu_tests decoder-tests 300 tests/test_accel.py \
        -k "one_pool_block or full_res_chunks or graphed_decoder or pipeline_fast_sampling or fast_decoder or chunked_decode or bf16_decoder or nhwc or subpixel" ;;
    autotune) bench autotune hmar-d16 fast-compiled,fast-compiled-autotune ;;   # last: its compile may not finish
    decoders)  # the three that matter since 2026-12-01 (channels_last and fp32 compile: BENCHMARKS.md 3a)
      step decoders
      timeout "$(left)" python3 $S --decode-only --configs hmar-d16,hmar-d16-512 \
        --decoders fp32-eager,bf16-compiled,bf16-compiled-subpixel \
        --json "$L/decode.json" > "$L/decode.log" 2>&1
      grep decode "$L/decode.log" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
step "done in $(( SECONDS - T0 )) s"
