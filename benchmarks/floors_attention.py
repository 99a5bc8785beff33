"""Lower bounds of the block-sparse attention's forward and backward (the attention goals' grid) from its FLOPs, its
exponentials and its bytes, next to the times ``bench_attention.py`` measured: where each attention goal stands
against what the H200 allows. Arithmetic only (no GPU). The sampling and training counterparts are ``floors.py``
and ``floors_train.py``.

Per (batch, head) and scale of n tokens attending to m keys (m = n block-diagonal, every key up to the scale's end
block-causal), E = B H sum(n m) scores and head dim D:
- forward: the two products S = Q K^T and O = P V, 4 E D FLOPs; one exponential per score (E);
- backward as hmar's kernels run it by default: the dK / dV tiles recompute S and P and form dV = P^T dO, dP = dO V^T
  and dK = dS^T Q (8 E D), and the dQ tiles recompute S, P and dP and form dQ = dS K (6 E D): 14 E D FLOPs and 2 E
  exponentials; with dq summed by atomics (``triton_kernel.DQ_ATOMIC``) the dK / dV tiles also form dQ: 10 E D FLOPs
  and E exponentials (FlashAttention-2's count);
- bytes: q, k, v and out in the forward; q, k, v, out, dO, dq, dk and dv in the backward (bf16, read or written
  once).

Each part takes at least max(FLOPs / GEMM_TFS, exponentials / EXP_PER_S, bytes / HBM_TBS) (the tensor cores, the
special-function units and the memory all busy at once) and, without that overlap, the sum of the first two.
GEMM_TFS = 713 TF/s and HBM_TBS = 4.1 TB/s are ``floors.py``'s measured ceilings. EXP_PER_S is a data-sheet figure,
not a measurement: 16 base-2 exponentials a clock per SM (the CUDA programming guide's throughput table for compute
capability 9.0) x 132 SMs x 1.98 GHz. At D = 64 one exponential costs as much time as 4.3 D FLOPs of the
products (4 D in the forward), so the exponentials matter as much as the products.

    python benchmarks/floors_attention.py           # the grid of BENCHMARKS.md section 1, with its measured times
    python benchmarks/floors_attention.py --measured my-bench_attention-output.json --json f.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import OFFICIAL_FWDBWD_MS, SCHEDULES  # noqa: E402  (the goals' N: 256, 512, 1024 px)
from floors import GEMM_TFS, HBM_TBS  # noqa: E402  (benchmarks/, this script's folder)

EXP_PER_S = 16 * 132 * 1.98e9
PER_SCALE_REF_MS = {(2240, 16, 16): 2.05, (9451, 4, 16): 3.8, (680, 16, 16): 1.98}   # the issue's, block-diagonal
DEFAULT_MEASURED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                "2026-11-29-h200-attention-full.json")


def scores(lengths: Sequence[int], pattern: str) -> int:
    """sum(n m) over the scales of one (batch, head): the score matrix's visited entries."""
    ends = list(itertools.accumulate(lengths))
    return sum(n * (n if pattern == "block_diagonal" else e) for n, e in zip(lengths, ends))


def floors(N: int, B: int, H: int, pattern: str, D: int = 64, elem: int = 2) -> Dict[str, float]:
    """Lower bounds in ms: ``fwd`` and ``bwd`` (the default dQ tiles), ``bwd_atomic`` (dq by atomics), each the
    overlapped bound; ``*_serial`` the products' time plus the exponentials'."""
    E = B * H * scores(SCHEDULES[N], pattern)
    tensor = B * H * N * D * elem
    out: Dict[str, float] = {}
    for part, flops, exps, n_tensors in (("fwd", 4 * E * D, E, 4), ("bwd", 14 * E * D, 2 * E, 8),
                                         ("bwd_atomic", 10 * E * D, E, 8)):
        mm, ex, mem = flops / GEMM_TFS / 1e9, exps / EXP_PER_S * 1e3, n_tensors * tensor / HBM_TBS / 1e9
        out[part] = max(mm, ex, mem)
        out[part + "_serial"] = max(mm + ex, mem)
    return out


def goal_ms(N: int, B: int, H: int, pattern: str, per_scale_ms: Optional[float]) -> Optional[float]:
    """The forward + backward time a goal asks for: 1.2x faster than per-scale SDPA (the same run's and, where the
    issue quotes one, its figure) and 1.5x faster than the official kernel (the issue's figures are block-diagonal)."""
    diagonal = pattern == "block_diagonal"
    bounds = [t / 1.2 for t in (per_scale_ms, PER_SCALE_REF_MS.get((N, B, H)) if diagonal else None) if t]
    if diagonal and (N, B, H) in OFFICIAL_FWDBWD_MS:
        bounds.append(OFFICIAL_FWDBWD_MS[(N, B, H)] / 1.5)
    return min(bounds) if bounds else None


def table(measured: List[dict]) -> List[dict]:
    rows = []
    for m in measured:
        if m.get("dtype") != "bf16" or m.get("D", 64) != 64 or not isinstance(m.get("triton"), list):
            continue
        N, B, H, pattern = m["N"], m["B"], m["H"], m["pattern"]
        psc = m["per_scale"][2] if isinstance(m.get("per_scale"), list) else None
        rows.append(dict(pattern=pattern, N=N, B=B, H=H, **floors(N, B, H, pattern), measured=m["triton"],
                         goal=goal_ms(N, B, H, pattern, psc)))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", default=DEFAULT_MEASURED, help="bench_attention.py --json output (bf16 rows used)")
    ap.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    a = ap.parse_args(argv)
    with open(a.measured) as f:
        rows = table(json.load(f))
    print(f"# ceilings: {GEMM_TFS:.0f} TF/s products, {EXP_PER_S / 1e12:.2f} T exp2/s (data sheet), {HBM_TBS} TB/s; "
          f"ms; floor = overlapped / serial; measured: {os.path.basename(a.measured)}")
    print(f"{'pattern':<14} {'N':>5} {'B':>3} {'H':>3} | {'fwd floor':>11} {'meas':>6} | {'bwd floor':>11} "
          f"{'atomic':>11} {'meas':>6} | {'f+b floor':>11} {'meas':>6} {'goal':>6} | meas/serial fwd bwd")
    for r in rows:
        fb, fbs = r["fwd"] + r["bwd"], r["fwd_serial"] + r["bwd_serial"]
        t = r["measured"]
        goal = f"{r['goal']:.3f}" if r["goal"] else "-"
        print(f"{r['pattern']:<14} {r['N']:>5} {r['B']:>3} {r['H']:>3} | {r['fwd']:5.3f}/{r['fwd_serial']:5.3f} "
              f"{t[0]:6.3f} | {r['bwd']:5.3f}/{r['bwd_serial']:5.3f} {r['bwd_atomic']:5.3f}/"
              f"{r['bwd_atomic_serial']:5.3f} {t[1]:6.3f} | {fb:5.3f}/{fbs:5.3f} {t[2]:6.3f} {goal:>6} | "
              f"{t[0] / r['fwd_serial']:.2f} {t[1] / r['bwd_serial']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
