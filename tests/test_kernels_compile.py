"""Every Triton kernel hmar launches, compiled ahead of time for an H100 / H200 (sm_90) by the CUDA backend of the
installed Triton, which needs no GPU: the attention's forward, backward, row-norm / delta and inference kernels, the
AdaLN norm's forward and backward, the skinny GEMM, the fp8 row quantisation and the token draw.

Without CUDA the kernels' other tests run them in Triton's CPU interpreter (``TRITON_INTERPRET=1``), which executes
them as Python and accepts code the compiler refuses (the draw kernel's histogram select once failed on the GPU
only: a ``tl.constexpr`` re-assigned in a ``tl.static_range``). Here each
kernel file's variants are compiled in one fresh process without the interpreter (this file run as a script): the
argument dtypes, the compile-time constants and the ``num_warps`` / ``num_stages`` each launch site passes by default,
and its main alternatives (bf16 and fp16, head dim 64 and 128, the L2-normalised attention, the inference and
training forms). Pointers are declared 16-byte aligned, as a launch with torch's allocations specialises them. The
helper ``@triton.jit`` functions are compiled through the kernels that call them; a kernel file gaining a
``@triton.jit`` function that is neither listed here as launched nor as a helper fails the test, so that a new kernel
gets its variants. A variant that genuinely fails to compile as launched is listed in ``KNOWN_FAILURES`` (the test
then xfails, strictly: it fails once that variant compiles)."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------------
# Variants, per kernel file: (name, kernel, {arg: type}, {constexpr: value}, num_warps, num_stages). Built in the
# compiling process only (they import the kernel modules, which must not run under the interpreter there).
# --------------------------------------------------------------------------------------------------------------
def _ints(*names):
    return {n: "i32" for n in names}


def _attention_variants():
    import hmar.attention.triton_kernel as tk

    def strides(*ts):
        return _ints(*(f"s{t}{a}" for t in ts for a in "bhn"))

    def fwd(dt, D, cfg, qk_norm):
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "O": f"*{dt}", "LSE": "*fp32", "TAB": "*i32",
               "BND": "*i32", "NRM": "*fp32", "HS": "*fp32", **strides("q", "k", "v", "o"), **_ints("H", "N"),
               "qk_scale": "fp32"}
        const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_D": D, "UPCAST": False, "QK_NORM": qk_norm}
        return (f"fwd-{dt}-d{D}-{cfg.block_m}x{cfg.block_n}-w{cfg.num_warps}s{cfg.num_stages}"
                f"{'-qknorm' if qk_norm else ''}", tk._fwd_kernel, sig, const, cfg.num_warps, cfg.num_stages)

    def bwd(dt, D, cfg, qk_norm):
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "DO": f"*{dt}", "G": f"*{dt}", "LSE": "*fp32",
               "DELTA": "*fp32", "TAB": "*i32", "BND": "*i32", "NRM": "*fp32", "HS": "*fp32", "DHS": "*fp32",
               "DQA": "*fp32", **strides("q", "k", "v"),
               **_ints("sdb", "sdh", "sdn", "sgp", "sgb", "sgh", "sgn", "H", "N"),
               "qk_scale": "fp32"}
        const = {"BLOCK_M1": cfg.block_m1, "BLOCK_N1": cfg.block_n1, "BLOCK_M2": cfg.block_m2,
                 "BLOCK_N2": cfg.block_n2, "HEAD_D": D, "UPCAST": False, "QK_NORM": qk_norm,
                 "DQ_ATOMIC": cfg.dq_atomic}
        return (f"bwd-{dt}-d{D}-{cfg.block_m1}/{cfg.block_n1}/{cfg.block_m2}/{cfg.block_n2}"
                f"-w{cfg.num_warps}s{cfg.num_stages}{'-qknorm' if qk_norm else ''}"
                f"{'-dqatomic' if cfg.dq_atomic else ''}",
                tk._bwd_kernel, sig, const, cfg.num_warps, cfg.num_stages)

    def dq_finish(dt, D, qk_norm):   # _launch_bwd after a dq_atomic backward: 64-row tiles, 4 warps
        sig = {"DQA": "*fp32", "Q": f"*{dt}", "G": f"*{dt}", "NRM": "*fp32", "HS": "*fp32", "DHS": "*fp32",
               **_ints("sqb", "sqh", "sqn", "sgb", "sgh", "sgn", "H", "N"), "sm_scale": "fp32"}
        return (f"dq-finish-{dt}-d{D}{'-qknorm' if qk_norm else ''}", tk._dq_finish_kernel, sig,
                {"BLOCK": 64, "HEAD_D": D, "QK_NORM": qk_norm}, 4, 3)

    def rows(dt, D, norms):   # _launch_rows: 64-row tiles, 4 warps (row norms of q, k; the backward's delta)
        sig = {"X": f"*{dt}", "Y": f"*{dt}", "OUT": "*fp32", **strides("x", "y"), **_ints("H", "N")}
        return (f"rows-{dt}-d{D}-{'norms' if norms else 'delta'}", tk._rows_kernel, sig,
                {"BLOCK": 64, "HEAD_D": D, "NORMS": norms}, 4, 3)

    def dense(dt, D, cfg, mode):
        # "sampler": dense_inference_attention (q / v biases, the log-temperature); "qknorm" / "plain":
        # triton_attention's inference call (one block, no grad) with / without the head scale (fp32 [H]);
        # the pointers a launch leaves unused get the output's dtype
        sampler = mode == "sampler"
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "O": f"*{dt}", "HS": "*fp32" if mode != "plain" else
               f"*{dt}", "QB": f"*{dt}", "VB": f"*{dt}", **strides("q", "k", "v", "o"), **_ints("H", "N"),
               "qk_scale": "fp32", "hs_max": "fp32"}
        const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_D": D, "UPCAST": False,
                 "QK_NORM": mode != "plain", "HS_LOG": sampler, "HAS_QB": sampler, "HAS_VB": sampler}
        return (f"dense-{dt}-d{D}-{cfg.block_m}x{cfg.block_n}-w{cfg.num_warps}s{cfg.num_stages}-{mode}",
                tk._dense_kernel, sig, const, cfg.num_warps, cfg.num_stages)

    F, B = tk._DEFAULT_FWD, tk._DEFAULT_BWD
    big64, big128 = tk.dense_candidates(1024, 64), tk.dense_candidates(1024, 128)
    out = [
        fwd("bf16", 64, F[64], False), fwd("bf16", 64, F[64], True), fwd("fp16", 64, F[64], False),
        fwd("bf16", 128, F[128], True),
        bwd("bf16", 64, B[64], False), bwd("bf16", 64, B[64], True), bwd("fp16", 64, B[64], False),
        bwd("bf16", 128, B[128], True),
        bwd("bf16", 64, replace(B[64], dq_atomic=True), True), bwd("fp16", 64, replace(B[64], dq_atomic=True), False),
        bwd("bf16", 128, replace(B[128], dq_atomic=True), True),
        dq_finish("bf16", 64, True), dq_finish("fp16", 64, False), dq_finish("bf16", 128, True),
        rows("bf16", 64, True), rows("bf16", 64, False), rows("fp16", 128, False),
        dense("bf16", 64, big64[0], "sampler"),                    # a large pass's default: 128x64, 4 warps
        dense("bf16", 64, tk.dense_candidates(1, 64)[0], "sampler"),   # a one-token pass: 16x16 on one warp
        dense("bf16", 64, big64[tk._DENSE_SHAPES.index((128, 128, 8, 2))], "sampler"),   # the widest key tile
        dense("bf16", 64, big64[0], "qknorm"), dense("fp16", 64, big64[0], "plain"),
        dense("bf16", 128, big128[0], "sampler"),
    ]
    helpers = {"_dot", "_dot_acc", "_inv_norm", "_normalize_grad", "_softmax_pv", "_fwd_inner", "_dense_step",
               "_dkdv_inner", "_dq_inner", "_row_block"}
    return tk, out, helpers


def _norm_variants():
    import hmar.model.norm_kernel as nk

    def fwd(x, h, mod, y, C, branch, stats, rows, warps):
        # launch_config's (rows per program, warps); gate / scale / shift: the modulation's dtype
        sig = {"x_ptr": f"*{x}", "h_ptr": f"*{h if branch else x}", "gate_ptr": f"*{mod}", "scale_ptr": f"*{mod}",
               "shift_ptr": f"*{mod}", "xo_ptr": f"*{x}", "y_ptr": f"*{y}", "stats_ptr": "*fp32",
               **_ints("M", "L", "C", "stride_x", "stride_h", "stride_gate", "stride_scale", "stride_shift"),
               "eps": "fp32"}
        const = {"BRANCH": branch, "STATS": stats, "BLOCK": 1 << (C - 1).bit_length(), "ROWS": rows}
        return (f"adaln-x{x}-y{y}-c{C}-r{rows}w{warps}{'-branch' if branch else ''}{'-stats' if stats else ''}",
                nk._adaln_kernel, sig, const, warps, 3)

    def bwd(x, h, mod, dy, C, branch, dxo, rows):
        sig = {"xs_ptr": f"*{x}", "h_ptr": f"*{h if branch else x}", "gate_ptr": f"*{mod}", "scale_ptr": f"*{mod}",
               "stats_ptr": "*fp32", "dy_ptr": f"*{dy}", "dxo_ptr": f"*{x}", "dx_ptr": f"*{x}",
               "dh_ptr": f"*{h if branch else x}", "part_ptr": "*fp32",
               **_ints("M", "L", "C", "CHUNK", "stride_gate", "stride_scale")}
        const = {"BRANCH": branch, "HAS_DXO": dxo, "BLOCK": 1 << (C - 1).bit_length(), "ROWS": rows}
        return (f"adaln-bwd-x{x}-dy{dy}-c{C}-r{rows}{'-branch' if branch else ''}{'-dxo' if dxo else ''}",
                nk._adaln_bwd_kernel, sig, const, 4, 3)

    def cfg(rows, C):
        return nk.launch_config(rows, C)

    out = [
        # inference (GraphedModel's fused_norm): the stream and the modulation in the model's dtype
        fwd("bf16", "bf16", "bf16", "bf16", 1024, False, False, *cfg(64, 1024)),      # few rows: 1 row, 8 warps
        fwd("bf16", "bf16", "bf16", "bf16", 1024, True, False, *cfg(16384, 1024)),    # many rows: 2 rows, 4 warps
        fwd("fp16", "fp16", "fp16", "fp16", 1920, True, False, *cfg(4096, 1920)),     # d30: 2048 wide, 2 warps
        # training (FUSED_NORM_TRAINING under bf16 autocast): fp32 stream, bf16 branch / modulation / output
        fwd("fp32", "bf16", "bf16", "bf16", 1024, True, True, *cfg(1024, 1024)),
        fwd("fp32", "bf16", "bf16", "bf16", 1024, False, True, *cfg(16384, 1024)),
        bwd("fp32", "bf16", "bf16", "bf16", 1024, True, True, cfg(1024, 1024)[0]),
        bwd("fp32", "bf16", "bf16", "bf16", 1024, False, False, cfg(16384, 1024)[0]),
        bwd("bf16", "bf16", "bf16", "fp32", 1920, True, True, cfg(4096, 1920)[0]),    # dy zeros (fp32): unused y
    ]
    return nk, out, set()


def _skinny_variants():
    import torch

    import hmar.model.skinny_gemm as sg
    fn = sg._skinny_kernel.fn   # the autotuner's JITFunction
    configs = sg._skinny_kernel.configs

    def v(dt, bm, c, bias, gelu):
        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}",
               **_ints("M", "N", "K", "stride_x", "stride_w", "stride_y", "M_BUCKET")}
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
        precision = sg._precision(dtype)   # as the launch passes it (fp32: "ieee" with TF32 off, torch's default)
        const = {"HAS_BIAS": bias, "GELU": gelu, "PRECISION": precision, "BM": bm, **c.kwargs}
        return (f"skinny-{dt}-bm{bm}-bn{c.kwargs['BN']}-bk{c.kwargs['BK']}-w{c.num_warps}s{c.num_stages}"
                f"{'-bias' if bias else ''}{'-gelu' if gelu else ''}", fn, sig, const, c.num_warps, c.num_stages)

    smallest = min(configs, key=lambda c: (c.kwargs["BN"] * c.kwargs["BK"], c.num_stages))
    largest = max(configs, key=lambda c: (c.kwargs["BN"] * c.kwargs["BK"], c.num_stages))
    out = [v("bf16", 64, largest, True, True), v("bf16", 16, smallest, True, False),
           v("fp16", 32, configs[0], False, False), v("bf16", 64, configs[len(configs) // 2], True, True),
           v("fp32", 16, smallest, True, False)]   # exact fp32 products (input_precision="ieee")
    return sg, out, set()


def _fp8_variants():
    import hmar.model.fp8_kernel as fk

    def v(dt, N, gelu):   # quantize_with_kernel: BLOCK = next_power_of_2(N), warps = block // 512 in [1, 16]
        block = 1 << (N - 1).bit_length()
        warps = max(1, min(16, block // 512))
        sig = {"x_ptr": f"*{dt}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", **_ints("N", "stride")}
        return (f"quantize-{dt}-n{N}-w{warps}{'-gelu' if gelu else ''}", fk._quantize_kernel, sig,
                {"GELU": gelu, "FP8": True, "BLOCK": block}, warps, 3)

    out = [v("bf16", 4096, True),     # fc2's input (4x the width), the GELU fused
           v("bf16", 1024, False),    # fc1's / the attention projections' input
           v("fp16", 7680, True),     # d30's fc2 input: 8192 wide, 16 warps
           v("fp32", 1920, False)]
    return fk, out, set()


def _draw_variants():
    import hmar.draw_kernel as dk

    def v(dt, V, hist, guided=True, shift=False):   # fused_draw: BLOCK = next_power_of_2(V), warps = block // 512
        block = 1 << (V - 1).bit_length()
        warps = max(1, min(8, block // 512))
        sig = {"logits_ptr": f"*{dt}", "q_ptr": "*fp32", "tok_ptr": "*i64", "conf_ptr": "*fp32", "bad_ptr": "*i1",
               **_ints("rows", "V", "stride_l", "stride_q", "top_k"), "weight": "fp32", "temperature": "fp32",
               "top_p": "fp32"}
        return (f"draw-{dt}-v{V}{'-hist' if hist else ''}{'-guided' if guided else ''}{'-shift' if shift else ''}",
                dk._draw_kernel, sig, {"GUIDED": guided, "TOP_K": True, "TOP_P": True, "BLOCK": block, "HIST": hist,
                                       "SHIFT": shift}, warps, 3)

    out = [v("bf16", 4096, False), v("bf16", 4096, True),   # the official vocabulary, both top-k selects
           v("fp32", 4096, True, guided=False, shift=True), v("fp16", 16384, False, shift=True)]
    return dk, out, {"_enough", "_largest_key_with", "_kth_key_by_histograms"}


_VARIANTS = {"attention": _attention_variants, "norm": _norm_variants, "skinny_gemm": _skinny_variants,
             "fp8": _fp8_variants, "draw": _draw_variants}

# "file:variant" -> why it fails to compile for sm_90 as launched (none known)
KNOWN_FAILURES: dict = {}


def _chain(e: BaseException) -> str:
    """The error and its causes (a helper's compile error is the cause of its caller's), the innermost last."""
    parts = []
    while e is not None and len(parts) < 8:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = "\n--- caused by ---\n".join(parts)
    return text if len(text) <= 6000 else text[:1500] + "\n[...]\n" + text[-4500:]


def _compile_all(which: str) -> None:
    """Compile ``which``'s variants for sm_90, one JSON line per variant, then a summary line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    module, variants, helpers = _VARIANTS[which]()
    target = GPUTarget("cuda", 90, 32)
    for name, fn, sig, const, warps, stages in variants:
        rec = {"variant": name}
        try:
            unknown = set(sig) ^ (set(fn.arg_names) - set(const))
            if unknown:
                raise TypeError(f"the variant's arguments do not match {fn.__name__}'s: {sorted(unknown)}")
            signature = {a: "constexpr" if a in const else sig[a] for a in fn.arg_names}
            aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                       if signature[a].startswith("*")}
            k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const, attrs=aligned),
                               target=target, options={"num_warps": warps, "num_stages": stages})
            rec.update(ok=True, kernel=fn.__name__, cubin=len(k.asm["cubin"]))
        except Exception as e:   # the compiler's error (one variant): reported, the others still compiled
            rec.update(ok=False, kernel=getattr(fn, "__name__", "?"), error=_chain(e))
        print(json.dumps(rec), flush=True)
    jitted = {n for n, o in vars(module).items() if isinstance(o, (JITFunction, Autotuner))}
    launched = {getattr(fn, "__name__", "") for _, fn, *_ in variants}
    print(json.dumps({"done": len(variants), "uncovered": sorted(jitted - launched - helpers)}), flush=True)


def _can_compile_for_cuda() -> bool:
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this Triton has no CUDA backend")
@pytest.mark.parametrize("which", sorted(_VARIANTS))
def test_the_kernels_compile_for_the_gpu(which, tmp_path):
    """``which``'s kernels compiled for sm_90 in a fresh process without ``TRITON_INTERPRET`` (this module's
    kernels may be interpreted) and with its own Triton cache (each run compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, __file__, which], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = [json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")]
    assert r.returncode == 0 and lines and "done" in lines[-1], (r.stdout[-3000:], r.stderr[-3000:])
    summary, results = lines[-1], lines[:-1]
    assert summary["done"] == len(results) > 0
    assert not summary["uncovered"], f"@triton.jit functions with no variant here (add them): {summary['uncovered']}"
    known = {k.split(":", 1)[1]: why for k, why in KNOWN_FAILURES.items() if k.startswith(which + ":")}
    failed = {x["variant"]: x["error"] for x in results if not x["ok"]}
    unexpected = {v: e for v, e in failed.items() if v not in known}
    assert not unexpected, "\n\n".join(f"{v} does not compile for sm_90:\n{e}" for v, e in unexpected.items())
    assert all(x["cubin"] > 1000 for x in results if x["ok"])   # a cubin's bytes
    fixed = sorted(set(known) - set(failed))
    assert not fixed, f"listed in KNOWN_FAILURES but compiles now (remove it): {fixed}"
    if known:
        pytest.xfail("; ".join(f"{v}: {why}" for v, why in known.items()))


if __name__ == "__main__":
    _compile_all(sys.argv[1])
