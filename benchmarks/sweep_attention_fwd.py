"""Forward-only tile sweep of the Triton attention kernel at the sampler's shapes (GPU).

The sampler's passes attend densely within one scale (one block of N tokens), q, k, v as views of the packed
``[B, N, 3, H, D]`` projection, with HMAR's q/k L2 normalisation. For each shape this times every forward tile
configuration of a grid (``use_config``), the normalisation inside the kernel, against what the unfused path runs:
``F.normalize`` ops followed by PyTorch's SDPA (cuDNN / flash on the H200), eager and torch.compile'd (inductor
fuses the normalisation into the kernels that prepare SDPA's inputs: the model's compiled path). It prints the
times, the autotuner's current candidates' best, and the grid's best, so the candidate list of
:data:`hmar.attention.triton_kernel._FWD_CANDIDATES` can be checked against the whole grid.

    python benchmarks/sweep_attention_fwd.py                       # the sampler's shapes, bf16
    python benchmarks/sweep_attention_fwd.py --shapes 1024x32x16 --json out.json
    python benchmarks/sweep_attention_fwd.py --candidates      # only the autotuner's candidates (as in call 9)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar.attention import attention  # noqa: E402
from hmar.attention import triton_kernel as tk  # noqa: E402

# N x B x H: the last scales of d16 / d30 at 256 px (16^2, 13^2) and 512 px (32^2, 24^2), batch 16 with guidance
SHAPES = ("169x32x16", "256x32x16", "576x32x16", "1024x32x16", "169x32x30", "256x32x30", "576x32x30",
          "1024x32x30")


def _bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def sweep(N: int, B: int, H: int, D: int, dtype: torch.dtype, grid) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    s = torch.rand(1, H, 1, 1, device="cuda", dtype=dtype, generator=g) * 4 + 1
    lengths = (N,)

    def fused():
        return attention(q, k, v, lengths=lengths, pattern="block_diagonal", backend="triton", qk_norm=s,
                         fuse_qk_norm=True)

    def unfused():
        qn, kn = F.normalize(q, dim=-1) * s, F.normalize(k, dim=-1)
        return F.scaled_dot_product_attention(qn, kn, v, scale=1.0)   # HMAR: scale 1, the temperature s

    compiled = torch.compile(unfused, dynamic=False)
    with torch.no_grad():
        ref = unfused().float()
        compiled()
        res = {"shape": [N, B, H, D], "sdpa_ops_ms": _bench(unfused), "sdpa_compiled_ms": _bench(compiled),
               "configs": []}
        for cfg in grid:
            try:
                with tk.use_config(fwd=cfg):
                    err = (fused().float() - ref).abs().max().item()
                    t = _bench(fused)
            except Exception as e:  # noqa: BLE001  (out of shared memory, ...)
                res["configs"].append({"cfg": list(vars(cfg).values()), "error": type(e).__name__})
                continue
            res["configs"].append({"cfg": list(vars(cfg).values()), "ms": t, "max_err": err})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxBxH (head dim --D)")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--candidates", action="store_true", help="only the autotuner's candidates, not the whole grid")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_attention_fwd.py times GPU kernels: run it on a CUDA machine")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    grid = [tk.FwdConfig(m, n, w, st) for m, n, w, st in
            itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
    cands = {tuple(vars(c).values()) for c in tk._FWD_CANDIDATES[a.D]}
    if a.candidates:
        grid = list(tk._FWD_CANDIDATES[a.D])
    out = []
    for shape in a.shapes:
        N, B, H = (int(x) for x in shape.split("x"))
        r = sweep(N, B, H, a.D, dtype, grid)
        ok = [c for c in r["configs"] if "ms" in c]
        best = min(ok, key=lambda c: c["ms"])
        best_cand = min((c for c in ok if tuple(c["cfg"]) in cands), key=lambda c: c["ms"])
        print(f"N={N} B={B} H={H}: sdpa+ops {r['sdpa_ops_ms'] * 1e3:.1f} us, compiled "
              f"{r['sdpa_compiled_ms'] * 1e3:.1f} us | candidates' best "
              f"{best_cand['cfg']} {best_cand['ms'] * 1e3:.1f} us | grid's best {best['cfg']} {best['ms'] * 1e3:.1f} us"
              f" (max err {best['max_err']:.1e}) | grid best vs sdpa+ops {r['sdpa_ops_ms'] / best['ms']:.2f}x, "
              f"vs compiled"
              f" {r['sdpa_compiled_ms'] / best['ms']:.2f}x")
        for c in sorted(ok, key=lambda c: c["ms"])[:6]:
            print(f"    {c['cfg']}  {c['ms'] * 1e3:.1f} us")
        out.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
