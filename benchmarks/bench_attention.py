"""GPU benchmark of the block-sparse attention backends, side by side in one process.

Backends: ``triton`` (the fused kernel, :mod:`hmar.attention.triton_kernel`), ``per_scale`` (one
SDPA / FlashAttention call per scale) and ``reference`` (SDPA with a dense boolean mask).
For every configuration it times forward, backward and forward+backward with
``triton.testing.do_bench`` (median, ms), prints the speed-up of the Triton kernel over the two
others, and checks once the Triton output and gradients against an fp32 per-scale computation on
a slice of the batch (one image, at most four heads).

    python benchmarks/bench_attention.py                 # full grid, bf16 and fp16
    python benchmarks/bench_attention.py --quick         # B=4, H=16, bf16 only
    python benchmarks/bench_attention.py --json out.json

Goals (H200): triton fwd+bwd >= 1.2x faster than per_scale, and >= 1.5x faster than the official
HMAR kernel (reference figures, fp16 fwd+bwd: N=2240 B=16 H=16 4.38 ms; N=9451 B=4 H=16 14.6 ms;
N=680 B=16 H=16 0.73 ms).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar.attention import attention, available_backends  # noqa: E402

SCHEDULES = {
    680: tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    2240: tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
    9451: tuple(x * x for x in (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)),
}
OFFICIAL_FWDBWD_MS = {  # fp16, from the spec (section 11(c) / brief), pattern block_diagonal
    (2240, 16, 16): 4.38, (9451, 4, 16): 14.6, (680, 16, 16): 0.73,
}
BACKENDS = ("triton", "per_scale", "reference")


def _bench(fn):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _time_backend(name, q, k, v, do, lengths, pattern, scale):
    def fwd():
        return attention(q, k, v, lengths=lengths, pattern=pattern, scale=scale, backend=name)

    out = fwd()  # warm-up (and autotuning for triton)
    torch.autograd.grad(out, (q, k, v), do)
    t_fwd = _bench(fwd)
    out = fwd()
    t_bwd = _bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    out = None
    t_all = _bench(lambda: torch.autograd.grad(fwd(), (q, k, v), do))
    return t_fwd, t_bwd, t_all


def _tuned(q, lengths, pattern):
    """The tile configurations the autotuner chose for this shape (for the JSON)."""
    try:
        from hmar.attention import triton_kernel as tk
        key = tk._tune_key(q, tuple(lengths), pattern)
        f, b = tk._TUNED_FWD.get(key), tk._TUNED_BWD.get(key)
        return {"fwd": list(vars(f).values()) if f else None, "bwd": list(vars(b).values()) if b else None}
    except Exception:  # noqa: BLE001
        return None


def _check_error(q, k, v, do, lengths, pattern, scale):
    """Max |triton - fp32| / max(1, max|fp32|) on one image and at most four heads."""
    hs = min(4, q.shape[1])
    qs, ks, vs = (x.detach()[:1, :hs].clone().requires_grad_() for x in (q, k, v))
    dos = do[:1, :hs]
    out = attention(qs, ks, vs, lengths=lengths, pattern=pattern, scale=scale, backend="triton")
    g = torch.autograd.grad(out, (qs, ks, vs), dos)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (qs, ks, vs))
    ref = attention(qf, kf, vf, lengths=lengths, pattern=pattern, scale=scale, backend="per_scale")
    gr = torch.autograd.grad(ref, (qf, kf, vf), dos.float())
    errs = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + tuple(g), (ref,) + tuple(gr)):
        errs[name] = (a.float() - b).abs().max().item() / max(1.0, b.abs().max().item())
    return errs


def run(args):
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 1
    if "triton" not in available_backends():
        print("bench_attention: the triton backend did not load", file=sys.stderr)
        return 1
    import triton
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, triton {triton.__version__}, "
          f"autotune={os.environ.get('HMAR_TRITON_AUTOTUNE', '1')}")

    Ns = [680, 2240, 9451]
    Bs = [4] if args.quick else [4, 16]
    Hs = [16] if args.quick else [16, 30]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dts = ["bf16"] if args.quick else args.dtypes
    patterns = args.patterns
    if args.N:
        Ns = args.N
    D = 64
    scale = D ** -0.5
    results = []
    hdr = (f"{'pattern':<14} {'dt':<4} {'N':>5} {'B':>3} {'H':>3} | "
           f"{'fwd tri':>8} {'psc':>7} {'ref':>7} | {'bwd tri':>8} {'psc':>7} {'ref':>7} | "
           f"{'f+b tri':>8} {'psc':>7} {'ref':>7} | {'x psc':>6} {'x ref':>6} {'x off':>6} | maxerr")
    print(hdr)
    print("-" * len(hdr))
    for pattern in patterns:
        for dt_name in dts:
            dtype = dtypes[dt_name]
            for N in Ns:
                lengths = SCHEDULES[N]
                for B in Bs:
                    for H in Hs:
                        row = dict(pattern=pattern, dtype=dt_name, N=N, B=B, H=H, D=D)
                        try:
                            g = torch.Generator(device="cuda").manual_seed(0)
                            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g)
                                       .requires_grad_() for _ in range(3))
                            do = torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g)
                        except torch.cuda.OutOfMemoryError:
                            print(f"{pattern:<14} {dt_name:<4} {N:>5} {B:>3} {H:>3} | inputs do not fit")
                            _free()
                            continue
                        for name in BACKENDS:
                            if name == "reference" and args.no_reference:
                                row[name] = None
                                continue
                            try:
                                row[name] = _time_backend(name, q, k, v, do, lengths, pattern, scale)
                            except torch.cuda.OutOfMemoryError:
                                row[name] = "OOM"
                            except Exception as e:  # noqa: BLE001 - report and go on
                                row[name] = f"error: {type(e).__name__}: {e}"[:200]
                            _free()
                        row["triton_cfg"] = _tuned(q, lengths, pattern)
                        try:
                            row["err"] = _check_error(q, k, v, do, lengths, pattern, scale)
                        except Exception as e:  # noqa: BLE001
                            row["err"] = f"error: {type(e).__name__}: {e}"[:200]
                        del q, k, v, do
                        _free()
                        results.append(row)
                        print(_fmt(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


def _ms(x, i):
    if isinstance(x, tuple):
        return f"{x[i]:.3f}"
    if x is None:
        return "-"
    return "OOM" if x == "OOM" else "err"


def _fmt(row):
    t, p, r = row["triton"], row["per_scale"], row["reference"]
    cols = []
    for i in range(3):
        cols.append(f"{_ms(t, i):>8} {_ms(p, i):>7} {_ms(r, i):>7}")
    x_p = f"{p[2] / t[2]:.2f}" if isinstance(t, tuple) and isinstance(p, tuple) else "-"
    x_r = f"{r[2] / t[2]:.2f}" if isinstance(t, tuple) and isinstance(r, tuple) else "-"
    off = OFFICIAL_FWDBWD_MS.get((row["N"], row["B"], row["H"]))
    x_o = f"{off / t[2]:.2f}" if off and isinstance(t, tuple) and row["pattern"] == "block_diagonal" else "-"
    err = row.get("err")
    err_s = (f"{max(err.values()):.1e}" if isinstance(err, dict) else str(err))
    s = (f"{row['pattern']:<14} {row['dtype']:<4} {row['N']:>5} {row['B']:>3} {row['H']:>3} | "
         + " | ".join(cols) + f" | {x_p:>6} {x_r:>6} {x_o:>6} | {err_s}")
    for name in BACKENDS:
        if isinstance(row[name], str) and row[name] != "OOM":
            s += f"\n    {name}: {row[name]}"
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B=4, H=16, bf16 only")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    ap.add_argument("--patterns", nargs="+", default=["block_diagonal", "block_causal"],
                    choices=["block_diagonal", "block_causal"])
    ap.add_argument("--N", nargs="+", type=int, choices=sorted(SCHEDULES), help="restrict N")
    ap.add_argument("--no-reference", action="store_true", help="skip the masked-SDPA baseline")
    args = ap.parse_args(argv)
    t0 = time.time()
    rc = run(args)
    print(f"# {time.time() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
