"""The AdaLN blocks' residual add + LayerNorm + modulation in sampling passes: hmar's Triton kernel
(:mod:`hmar.model.norm_kernel`) against the same ops compiled by torch.compile (the kernels inductor makes for the
compiled blocks), at every pass size of a guided sampling call.

For each config (width C) and pass size (M = 2 x batch x tokens rows, bf16): microseconds per call (CUDA graphs of
the call, ``triton.testing.do_bench_cudagraph``) of ``ops`` (``x + h * gate``, then ``LN * (1 + scale) + shift``,
compiled with dynamic shapes as the sampler's blocks are; ``--static``: for each size) and ``kernel`` (the default launch configuration), the bandwidth each reaches (8 bytes an element: x and h
read, x' and the output written), and with ``--sweep`` the best (rows per program, warps) of a grid. The last column
sums over a call's passes (2 x depth calls per pass, plus the head's). Max |error| of both against fp32 ops.

    python benchmarks/bench_norm.py --configs hmar-d16,hmar-d30,hmar-d16-512,hmar-d30-512 --sweep
    TRITON_INTERPRET=1 python benchmarks/bench_norm.py --device cpu --configs hmar-tiny   # a smoke run
"""
from __future__ import annotations

import argparse
import itertools
from collections import Counter
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar import model_config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floors import passes as call_passes  # noqa: E402  (every pass of a sampling call)


def _ops(x, h, gate, scale, shift):
    x = x + h * gate
    return x, F.layer_norm(x, x.shape[-1:], eps=1e-6) * (scale + 1) + shift


def _timer(device: torch.device):
    """Microseconds per call: a CUDA graph's median (``do_bench_cudagraph``) on CUDA, one wall time on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph
        return lambda fn: do_bench_cudagraph(fn, rep=50) * 1e3

    def wall(fn):
        import time
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="hmar-d16,hmar-d30,hmar-d16-512,hmar-d30-512")
    ap.add_argument("--batch", type=int, default=16, help="images (guidance doubles the rows)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of (rows per program, warps)")
    ap.add_argument("--static", action="store_true", help="compile the ops for each pass size (static shapes)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    device = torch.device(args.device)
    from hmar.model import norm_kernel as nk
    torch._dynamo.config.cache_size_limit = 256
    # dynamic shapes, as hmar.accel.compile_blocks compiles the blocks (the static compile of one pass size made
    # faster kernels than the sampler's at C = 1024: BENCHMARKS.md section 3o)
    ops = torch.compile(_ops, dynamic=not args.static) if device.type == "cuda" else _ops
    timer = _timer(device)
    rows_out = []
    for name in args.configs.split(","):
        cfg = model_config(name)
        sizes = Counter(n for n, _ in call_passes(name))   # {tokens: passes}
        C, calls = cfg.embed_dim, 2 * cfg.depth + 1
        totals = {"ops": 0.0, "kernel": 0.0, "best": 0.0}
        print(f"{name} (C = {C}, {calls} calls a pass)")
        print(f"  {'tokens':>6} {'rows':>6} {'passes':>6} {'ops us':>8} {'GB/s':>6} {'kernel us':>9} {'GB/s':>6} "
              f"{'ratio':>6} {'err ops':>8} {'err krn':>8}  best (rows, warps): us")
        for tokens, passes in sorted(sizes.items()):
            B = 2 * args.batch
            g = torch.Generator(device).manual_seed(tokens)
            x, h = (torch.randn(B, tokens, C, device=device, generator=g).bfloat16() for _ in range(2))
            mod = torch.randn(B, 6, C, device=device, generator=g).bfloat16() * 0.5   # a packed modulation
            gate, scale, shift = mod[:, None, 0], mod[:, None, 2], mod[:, None, 4]
            want = _ops(*(t.float() for t in (x, h, gate, scale, shift)))
            got_ops = ops(x, h, gate, scale, shift)
            got = nk.adaln_norm_kernel(x, scale, shift, 1e-6, h, gate)
            err = [max((a.float() - w).abs().max().item() for a, w in zip(r, want)) for r in (got_ops, got)]
            t_ops = timer(lambda: ops(x, h, gate, scale, shift))
            t_k = timer(lambda: nk.adaln_norm_kernel(x, scale, shift, 1e-6, h, gate))
            gb = 8 * x.numel() / 1e3   # bytes / us -> GB/s below
            best = ""
            t_best = t_k
            if args.sweep and device.type == "cuda":
                block = 1 << (C - 1).bit_length()
                results = {}
                for per, warps in itertools.product((1, 2, 4, 8), (2, 4, 8, 16)):
                    if per * block > 16384 or per * block < 32 * warps:
                        continue
                    nk.ROWS, nk.NUM_WARPS = per, warps
                    results[(per, warps)] = timer(lambda: nk.adaln_norm_kernel(x, scale, shift, 1e-6, h, gate))
                nk.ROWS = nk.NUM_WARPS = None
                (per, warps), t_best = min(results.items(), key=lambda kv: kv[1])
                best = f"({per}, {warps}): {t_best:.1f}"
            n = passes * calls
            totals["ops"] += n * t_ops
            totals["kernel"] += n * t_k
            totals["best"] += n * min(t_best, t_k)
            print(f"  {tokens:>6} {B * tokens:>6} {passes:>6} {t_ops:>8.1f} {gb / t_ops:>6.0f} {t_k:>9.1f} "
                  f"{gb / t_k:>6.0f} {t_ops / t_k:>5.2f}x {err[0]:>8.4f} {err[1]:>8.4f}  {best}")
            rows_out.append({"config": name, "C": C, "tokens": tokens, "rows": B * tokens, "passes": passes,
                             "ops_us": t_ops, "kernel_us": t_k, "best_us": t_best, "best": best,
                             "err_ops": err[0], "err_kernel": err[1]})
        print(f"  per sampling call: ops {totals['ops'] / 1e3:.2f} ms, kernel {totals['kernel'] / 1e3:.2f} ms "
              f"({totals['ops'] / max(totals['kernel'], 1e-9):.2f}x), best of the sweep {totals['best'] / 1e3:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
