"""The token draw of one sampling pass on the GPU: the fused Triton kernel against the torch ops, per pass shape.

For every pass of the four goal configs (batch 16 with guidance, V = 4096, top-k 900, top-p 0.96; the masked passes
without guidance, as the sampler runs them by default) this times, as CUDA graphs of ``--reps`` calls (the sampler
replays graphs too, so no host time is counted):

* ``torch``: what the sampler ran until the fourth session of 2026-12-03: the head's bf16 logits to fp32, the finite
  check, ``torch.lerp``, ``torch.topk`` and the top-p filter, softmax and draw over the candidates
  (:func:`hmar.sampling.draw_tokens` with ``fused=False``);
* ``fused`` at each of ``--warps``: :func:`hmar.draw_kernel.fused_draw` on the bf16 logits (with the same Exp(1)
  draws from the generator);
* with ``--hist``, ``hist`` at each of ``--warps``: the same with the k-th largest logit found by histograms
  (``hmar.draw_kernel.HISTOGRAM_TOP_K``).

Then the sum over a sampling call's passes per config, and how many tokens the two drew alike (the same draws: they
differ only where torch.topk keeps exactly k of tied logits or a near-tie rounds differently).

    python benchmarks/bench_draw.py
    python benchmarks/bench_draw.py --configs hmar-d16-512 --warps 4,8,16 --json out.json
    python benchmarks/bench_draw.py --warps 8 --hist
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hmar.draw_kernel as dk  # noqa: E402
from hmar.presets import MASK_SCHEDULES, PATCH_NUMS  # noqa: E402
from hmar.sampling import draw_tokens  # noqa: E402

CONFIGS = {"hmar-d16": 256, "hmar-d30": 256, "hmar-d16-512": 512, "hmar-d30-512": 512}   # the draws depend on px only


def passes(px: int):
    """(tokens, guided) of every pass of a sampling call at ``px`` with the default schedule."""
    sched = MASK_SCHEDULES[f"official-{px}"]
    out = []
    for si, (pn, steps) in enumerate(zip(PATCH_NUMS[px], sched)):
        out.append((pn * pn, si > 0))        # the draft (t = 0 at the first scale: no guidance)
        out += [(pn * pn, False)] * (len(steps) - 1 if si > 0 else 0)
    return out


def graph_time(fn, reps: int, gen: torch.Generator) -> float:
    """Microseconds per call of ``fn``, replaying a CUDA graph of ``reps`` calls (median of 5 replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    g.register_generator_state(gen)
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--hist", action="store_true", help="also time the histogram select (HISTOGRAM_TOP_K)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warps = [int(w) for w in args.warps.split(",")]
    B, V, k, p = args.batch, 4096, 900, 0.96
    gen = torch.Generator("cuda").manual_seed(0)
    rows = {}
    for px in sorted({CONFIGS[c] for c in args.configs.split(",")}):
        for n, guided in sorted(set(passes(px))):
            if (n, guided) in rows:
                continue
            logits = (torch.randn((2 if guided else 1) * B, n, V, device="cuda") * 2).to(torch.bfloat16)
            w = 2.0 if guided else None
            bad = torch.zeros((), dtype=torch.bool, device="cuda")
            row = {"torch": graph_time(lambda: draw_tokens(logits.float(), gen, w, k, p, 1.0, bad), args.reps, gen)}
            fused = lambda: draw_tokens(logits, gen, w, k, p, 1.0, bad, True)  # noqa: E731
            for name, hist in (("fused", False), ("hist", True))[:2 if args.hist else 1]:
                dk.HISTOGRAM_TOP_K = hist
                for nw in warps:
                    dk.NUM_WARPS = nw
                    row[f"{name}{nw}"] = graph_time(fused, args.reps, gen)
            dk.NUM_WARPS, dk.HISTOGRAM_TOP_K = None, False
            state = gen.get_state()
            a = draw_tokens(logits.float(), gen, w, k, p, 1.0, bad)[0]
            gen.set_state(state)
            b = draw_tokens(logits, gen, w, k, p, 1.0, bad, True)[0]
            row["same"] = (a == b).float().mean().item()
            rows[(n, guided)] = row
            print(f"n {n:5d} {'guided' if guided else 'plain '}  " + "  ".join(
                f"{key} {v:8.1f} us" for key, v in row.items() if key != "same") + f"  same tokens {row['same']:.4f}",
                flush=True)
    totals = {}
    for name in args.configs.split(","):
        ps = passes(CONFIGS[name])
        totals[name] = {key: sum(rows[x][key] for x in ps) / 1e3 for key in rows[ps[0]] if key != "same"}
        t = totals[name]
        best = min((v, key) for key, v in t.items() if key != "torch")
        print(f"{name:14s} {len(ps)} passes: " + "  ".join(f"{key} {v:6.2f} ms" for key, v in t.items())
              + f"  -> {best[1]} saves {t['torch'] - best[0]:.2f} ms ({t['torch'] / best[0]:.1f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": {f"{n}-{'g' if g else 'p'}": r for (n, g), r in rows.items()}, "totals": totals}, f,
                      indent=1)


if __name__ == "__main__":
    main()
