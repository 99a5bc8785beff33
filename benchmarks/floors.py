"""Lower bounds of a sampling call's token loop from its FLOPs and bytes at the H200's measured ceilings, per kind of
kernel, next to the kernel times the profiles measured: where each token budget stands against what the hardware
allows. Arithmetic only (no GPU): every pass of the default schedule, batch 16 with guidance (2 x 16 rows a token).

Per pass of n tokens (R = 32 n rows, width C, depth D blocks, hidden 4C, vocabulary V):
- GEMMs: qkv (C -> 3C), proj (C -> C), fc1 (C -> 4C), fc2 (4C -> C) in every block and the head (C -> V). Each
  GEMM takes at least max(2 R K N / GEMM_TFS, bytes / HBM_TBS), its bytes the bf16 weight plus its input and output
  (the small scales' GEMMs are bound by reading the weights).
- Attention (dense within the pass): 4 n^2 C FLOPs an image and block, at the attention forward's measured rate
  (``ATTN_TFS``), or its q, k, v and output bytes, whichever is larger.
- The residual add + LayerNorm + modulation kernels (2 D + 1 a pass, 8 bytes an element; 4 for the first, which
  adds no branch), and apart from them the q / k normalisation before cuDNN on passes over 256 tokens (reads and
  writes q and k; measured: inductor's kernels), at ``HBM_TBS``.
- The token draw: the head's bf16 logits of both guidance rows read once, at ``HBM_TBS``.

The ceilings are measurements, not data-sheet figures: ``GEMM_TFS`` = 713 TF/s (bf16 GEMM, M = 32768, the
performance issue's reference figure), ``HBM_TBS`` = 4.1 TB/s (hmar's norm kernel at its best, BENCHMARKS.md 3o;
the data sheet says 4.8), ``ATTN_TFS`` = 351 TF/s (cuDNN's attention forward over hmar-d16-512's 324-1024-token
passes in 3m's profile: 3.12 TFLOP in 8.87 ms).

    python benchmarks/floors.py                       # the four goal configs, with 3o's measured kernel times
    python benchmarks/floors.py --configs hmar-d16-512 --json floors.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Iterator, Tuple, Union

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar import model_config  # noqa: E402
from hmar.presets import ModelConfig, default_schedule  # noqa: E402

GEMM_TFS, HBM_TBS, ATTN_TFS = 713.0, 4.1, 351.0
FUSED_QK_NORM_MAX_TOKENS = 256   # passes over more tokens normalise q / k before cuDNN (hmar.accel's default)

# kernel time by kind (ms) in BENCHMARKS.md 3o's profiles (call 37) and the token loop's wall time (calls 37 / 38)
MEASURED = {   # qknorm: the inductor kernels left (the q / k normalisation before cuDNN); other: ATen, top-k, rest
    "hmar-d30": dict(gemm=94.93, attention=8.67, norm=7.35, qknorm=0.0, draw=1.36, other=1.56, wall=(117.3, 118.7),
                     budget=120),
    "hmar-d16": dict(gemm=17.24, attention=2.54, norm=2.60, qknorm=0.0, draw=1.20, other=1.04, wall=(25.7, 27.4),
                     budget=30),
    "hmar-d16-512": dict(gemm=48.65, attention=10.56, norm=6.28, qknorm=2.13, draw=3.57, other=1.87,
                         wall=(75.1, 77.2), budget=70),
    "hmar-d30-512": dict(gemm=298.92, attention=41.11, norm=19.51, qknorm=7.12, draw=4.04, other=2.79,
                         wall=(372.1, 378.9), budget=380),
}
KINDS = ("gemm", "attention", "norm", "qknorm", "draw")


def passes(name: str) -> Iterator[Tuple[int, str]]:
    """(tokens, kind) of every pass of one sampling call: per scale one next-scale pass and a masked pass per
    later entry of its schedule."""
    cfg = model_config(name)
    for pn, steps in zip(cfg.patch_nums, default_schedule(cfg.patch_nums)):
        for i in range(len(steps)):
            yield pn * pn, "next-scale" if i == 0 else "masked"


def gemm_shapes(name: Union[str, ModelConfig]):
    """(K, N, count) of the GEMMs of one pass: the blocks' four linears and the output head (``name``: a preset
    name or a config)."""
    cfg = model_config(name) if isinstance(name, str) else name
    C, hidden = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio)
    D = cfg.depth
    return [(C, 3 * C, D), (C, C, D), (C, hidden, D), (hidden, C, D), (C, cfg.vocab_size, 1)]


def pass_gemm_flops(name: str, rows: int) -> int:
    """FLOPs of one pass's GEMMs over ``rows`` rows (2 R K N each)."""
    return sum(2 * rows * k * n * c for k, n, c in gemm_shapes(name))


def floors(name: str, batch: int = 16) -> Dict[str, float]:
    """Floors (ms) per kind over one sampling call, and the FLOPs / bytes behind them."""
    cfg = model_config(name)
    C, D, V = cfg.embed_dim, cfg.depth, cfg.vocab_size
    out = dict(gemm=0.0, attention=0.0, norm=0.0, qknorm=0.0, draw=0.0, gemm_tflop=0.0, attn_tflop=0.0, passes=0)
    for n, _ in passes(name):
        R = 2 * batch * n
        out["passes"] += 1
        for k, m, count in gemm_shapes(name):
            flops, nbytes = 2 * R * k * m, 2 * (k * m + R * k + R * m)
            out["gemm"] += count * max(flops / GEMM_TFS / 1e9, nbytes / HBM_TBS / 1e9)
            out["gemm_tflop"] += count * flops / 1e12
        attn_flops = D * 2 * batch * 4 * n * n * C
        attn_bytes = D * 4 * 2 * R * C
        out["attention"] += max(attn_flops / ATTN_TFS / 1e9, attn_bytes / HBM_TBS / 1e9)
        out["attn_tflop"] += attn_flops / 1e12
        # the first block's first norm has no branch to add (4 bytes an element), every other one 8
        out["norm"] += ((2 * D + 1) * 8 - 4) * R * C / HBM_TBS / 1e9
        if n > FUSED_QK_NORM_MAX_TOKENS:   # q and k, read and written, bf16
            out["qknorm"] += D * 2 * 2 * 2 * R * C / HBM_TBS / 1e9
        out["draw"] += 2 * R * V / HBM_TBS / 1e9
    out["total"] = sum(out[k] for k in KINDS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="hmar-d16,hmar-d30,hmar-d16-512,hmar-d30-512")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"ceilings: GEMM {GEMM_TFS:.0f} TF/s, HBM {HBM_TBS} TB/s, attention forward {ATTN_TFS:.0f} TF/s")
    for name in args.configs.split(","):
        f = floors(name, args.batch)
        m = MEASURED.get(name) if args.batch == 16 else None
        print(f"{name}: {f['passes']} passes, GEMMs {f['gemm_tflop']:.2f} TFLOP, attention {f['attn_tflop']:.2f} "
              f"TFLOP")
        for kind in KINDS:
            ratio = f" ({m[kind] / f[kind]:.2f}x the floor)" if m and f[kind] else ""
            got = f"  measured {m[kind]:7.2f} ms{ratio}" if m else ""
            print(f"  {kind:<10} floor {f[kind]:7.2f} ms{got}")
        line = f"  {'sum':<10} floor {f['total']:7.2f} ms"
        if m:
            kernels = sum(m[k] for k in (*KINDS, "other"))
            line += (f"  measured kernels {kernels:.2f} ms (other kinds {m['other']:.2f}), token loop "
                     f"{m['wall'][0]}-{m['wall'][1]} ms against a budget of {m['budget']} ms")
        print(line)
        rows.append(dict(config=name, **f, measured=m))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
