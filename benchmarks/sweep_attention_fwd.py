"""The sampler's attention passes, forward only, on the GPU: every way hmar can run one, timed as CUDA graphs.

A sampling pass attends densely within one scale (one block of N tokens): q, k, v are views of the packed
``[B, N, 3, H, D]`` projection, with HMAR's q/k L2 normalisation and its per-head temperature. For each pass
shape this times:

* ``dense``: the inference kernel (``_dense_kernel``: no log-sum-exp, no work list, the normalisation on the tiles
  in registers; what the sampler runs since 2026-12-03), at each tile configuration of its candidate list
  (:func:`hmar.attention.triton_kernel.dense_candidates`; ``--grid``: a wider grid), and with the autotuner's pick;
* ``trainfwd``: the training forward with the normalisation inside (the row-norm kernel, then the work-list
  kernel that also stores the log-sum-exp; what the sampler ran before), autotuned;
* ``ops+sdpa``: ``F.normalize`` ops, then PyTorch's SDPA (cuDNN / flash on the H200), eager and torch.compile'd
  (inductor fuses the normalisation into the kernels that prepare SDPA's inputs: what the sampler runs in passes
  of more than ``hmar.accel.FUSED_QK_NORM_MAX_TOKENS`` tokens).

Every figure is the replay of a CUDA graph of ``--reps`` calls, divided by the calls (the sampler replays graphs
too, so host time is not counted; a plain ``do_bench`` of one call measured the host at these sizes). Then, per
schedule, the attention time of one block over a sampling call (the sum over its passes), for each way.

    python benchmarks/sweep_attention_fwd.py                      # the passes of the four goal configs, bf16
    python benchmarks/sweep_attention_fwd.py --shapes 256x32x30 1024x32x16 --grid --json out.json
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

from hmar.attention import attention, l2_normalize_qk  # noqa: E402
from hmar.attention import triton_kernel as tk  # noqa: E402
from hmar.presets import MASK_SCHEDULES  # noqa: E402

B = 32   # 16 images with guidance
# the passes of a sampling call: one per masked step of each scale of the default schedules
PASSES = {name: [pn for steps in MASK_SCHEDULES[f"official-{px}"] for pn in [sum(steps)] * len(steps)]
          for name, px in (("256px", 256), ("512px", 512))}
HEADS = {"hmar-d16": 16, "hmar-d30": 30}


def _passes_shapes():
    out = []
    for px, ns in PASSES.items():
        for h in HEADS.values():
            out += [f"{n}x{B}x{h}" for n in sorted(set(ns))]
    return list(dict.fromkeys(out))


def graph_ms(fn, reps: int) -> float:
    """Milliseconds per call of ``fn``, from the replay of a CUDA graph of ``reps`` calls."""
    from triton.testing import do_bench
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up outside the capture: compiles, autotunes, fills the plan caches
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ms = float(do_bench(g.replay, warmup=5, rep=40, return_mode="median")) / reps
    del g
    return ms


def ops_sdpa(q, k, v, s):
    """The model's unfused path: q, k normalised in fp32, times the temperature, rounded, then SDPA."""
    qn, kn = l2_normalize_qk(q.float(), k.float(), s)
    return F.scaled_dot_product_attention(qn.to(q.dtype), kn.to(q.dtype), v, scale=1.0)


_COMPILED = torch.compile(ops_sdpa, dynamic=True)   # one compile for every shape, as the sampler's blocks


def sweep(N: int, H: int, D: int, dtype: torch.dtype, grid, reps: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    s = torch.rand(1, H, 1, 1, device="cuda", generator=g) * 4 + 1
    lengths = (N,)

    def fused():
        return attention(q, k, v, lengths=lengths, pattern="dense", qk_norm=s, fuse_qk_norm=True)

    def unfused():
        return ops_sdpa(q, k, v, s)

    def compiled():
        return _COMPILED(q, k, v, s)

    def trainfwd():
        tk.DENSE_INFERENCE = False
        try:
            return fused()
        finally:
            tk.DENSE_INFERENCE = True

    res = {"shape": [N, B, H, D], "configs": []}
    with torch.no_grad():
        ref = unfused().float()
        res["ops_sdpa_ms"] = graph_ms(unfused, reps)
        res["ops_sdpa_compiled_ms"] = graph_ms(compiled, reps)
        os.environ["HMAR_TRITON_AUTOTUNE"] = "1"
        res["trainfwd_ms"] = graph_ms(trainfwd, reps)
        res["dense_autotuned_ms"] = graph_ms(fused, reps)
        res["dense_autotuned_cfg"] = list(vars(tk._DENSE_PLANS[(N, D, dtype, B * H, True, q.device)]).values())
        res["dense_max_err"] = (fused().float() - ref).abs().max().item()
        for cfg in grid(N, D):
            try:
                with tk.use_config(fwd=cfg):
                    err = (fused().float() - ref).abs().max().item()
                    t = graph_ms(fused, reps)
            except Exception as e:  # noqa: BLE001  (out of shared memory, ...)
                res["configs"].append({"cfg": list(vars(cfg).values()), "error": type(e).__name__})
                continue
            res["configs"].append({"cfg": list(vars(cfg).values()), "ms": t, "max_err": err})
    return res


def wide_grid(N: int, D: int):
    p = max(16, 1 << (N - 1).bit_length())
    out = []
    for bm, bn, w, st in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (1, 2, 4, 8), (2, 3, 4)):
        if bm > p or bn > p or w * 16 > bm or (bm >= 64 and w < 4) or (D > 64 and bn > 64):
            continue
        out.append(tk.FwdConfig(bm, bn, w, st))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=None, help="NxBxH (head dim --D); default: every pass shape "
                    "of the 256 and 512 px schedules at 16 and 30 heads")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--grid", action="store_true", help="a wider tile grid than the autotuner's candidates")
    ap.add_argument("--reps", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_attention_fwd.py times GPU kernels: run it on a CUDA machine")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    grid = wide_grid if a.grid else tk.dense_candidates
    out = {}
    for shape in a.shapes or _passes_shapes():
        N, b, H = (int(x) for x in shape.split("x"))
        if b != B:
            raise SystemExit(f"--shapes: batch {b}; this sweep runs the sampler's batch of {B}")
        r = sweep(N, H, a.D, dtype, grid, a.reps)
        ok = sorted((c for c in r["configs"] if "ms" in c), key=lambda c: c["ms"])
        r["best"] = ok[0] if ok else None
        out[(N, H)] = r
        us = lambda ms: f"{ms * 1e3:7.1f} us"  # noqa: E731
        print(f"N={N:5d} H={H}: dense autotuned {us(r['dense_autotuned_ms'])} {r['dense_autotuned_cfg']} | "
              f"trainfwd {us(r['trainfwd_ms'])} | ops+sdpa {us(r['ops_sdpa_ms'])}, compiled "
              f"{us(r['ops_sdpa_compiled_ms'])} | grid best {us(ok[0]['ms'])} {ok[0]['cfg']} | dense vs trainfwd "
              f"{r['trainfwd_ms'] / r['dense_autotuned_ms']:.2f}x, vs compiled ops+sdpa "
              f"{r['ops_sdpa_compiled_ms'] / r['dense_autotuned_ms']:.2f}x (max err {r['dense_max_err']:.1e})",
              flush=True)
        for c in ok[:4]:
            print(f"      {c['cfg']}  {us(c['ms'])}")
    print("\nper block, one sampling call (sum over the schedule's passes; us):")
    print(f"  {'schedule':14s} {'heads':>5s} {'dense':>9s} {'trainfwd':>9s} {'ops+sdpa':>9s} {'compiled':>9s} "
          f"{'best of':>9s}")
    for px, ns in PASSES.items():
        for name, h in HEADS.items():
            if not all((n, h) in out for n in ns):
                continue
            tot = {key: sum(out[(n, h)][key] for n in ns) * 1e3 for key in
                   ("dense_autotuned_ms", "trainfwd_ms", "ops_sdpa_ms", "ops_sdpa_compiled_ms")}
            best = sum(min(out[(n, h)]["dense_autotuned_ms"], out[(n, h)]["ops_sdpa_compiled_ms"]) for n in ns) * 1e3
            print(f"  {px + ' ' + name:14s} {h:5d} {tot['dense_autotuned_ms']:9.1f} {tot['trainfwd_ms']:9.1f} "
                  f"{tot['ops_sdpa_ms']:9.1f} {tot['ops_sdpa_compiled_ms']:9.1f} {best:9.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**r, "key": list(key)} for key, r in out.items()], f, indent=1, default=str)


if __name__ == "__main__":
    main()
