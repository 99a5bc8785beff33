"""The sampler's small-pass GEMMs: hmar's skinny Triton GEMM (:mod:`hmar.model.skinny_gemm`, autotuned) against
cuBLAS (``F.linear``; fc1 as ``torch._addmm_activation`` with the GELU epilogue, as the fast path runs it), at
every pass size of up to ``--max-rows`` rows of a guided batch, for the four linears of each config's blocks.

Microseconds per call as CUDA graphs (``triton.testing.do_bench_cudagraph``), the weight-read bandwidth each reaches,
and the sum over one sampling call (passes x depth); max |difference| between the two.

    python benchmarks/bench_skinny.py --configs hmar-d16,hmar-d30 --max-rows 1152
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar import model_config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floors import passes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="hmar-d16,hmar-d30")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-rows", type=int, default=1152)
    ap.add_argument("--json")
    args = ap.parse_args()
    from triton.testing import do_bench_cudagraph

    from hmar.model import skinny_gemm as sg
    out = []
    for name in args.configs.split(","):
        cfg = model_config(name)
        C, D = cfg.embed_dim, cfg.depth
        hidden = round(C * cfg.mlp_ratio)
        counts = {}
        for n, _ in passes(name):
            rows = 2 * args.batch * n
            if rows <= args.max_rows:
                counts[rows] = counts.get(rows, 0) + 1
        total = {"cublas": 0.0, "skinny": 0.0}
        print(f"{name}: {sum(counts.values())} passes of <= {args.max_rows} rows")
        for rows, npass in sorted(counts.items()):
            for layer, K, N, gelu in (("qkv", C, 3 * C, False), ("proj", C, C, False), ("fc1", C, hidden, True),
                                      ("fc2", hidden, C, False)):
                x = torch.randn(rows, K, device="cuda").bfloat16()
                w = (torch.randn(N, K, device="cuda") / K ** 0.5).bfloat16()
                b = torch.randn(N, device="cuda").bfloat16() if layer != "qkv" else None
                if gelu:
                    ref = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
                else:
                    ref = lambda: F.linear(x, w, b)  # noqa: E731
                ours = lambda: sg.skinny_linear_kernel(x, w, b, gelu)  # noqa: E731
                diff = (ours().float() - ref().float()).abs().max().item()
                t_ref, t_ours = do_bench_cudagraph(ref, rep=30) * 1e3, do_bench_cudagraph(ours, rep=30) * 1e3
                gbs = 2 * N * K / 1e3
                total["cublas"] += npass * D * t_ref
                total["skinny"] += npass * D * t_ours
                print(f"  rows {rows:5d} {layer:<4} K {K:5d} N {N:5d}: cuBLAS {t_ref:7.2f} us ({gbs / t_ref:5.0f} GB/s)"
                      f"  skinny {t_ours:7.2f} us ({gbs / t_ours:5.0f} GB/s)  {t_ref / t_ours:5.2f}x  "
                      f"max|diff| {diff:.4f}", flush=True)
                out.append(dict(config=name, rows=rows, layer=layer, K=K, N=N, cublas_us=t_ref, skinny_us=t_ours,
                                diff=diff, passes=npass))
        print(f"  per sampling call: cuBLAS {total['cublas'] / 1e3:.2f} ms, skinny {total['skinny'] / 1e3:.2f} ms "
              f"({total['cublas'] / max(total['skinny'], 1e-9):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
