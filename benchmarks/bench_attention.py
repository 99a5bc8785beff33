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
    python benchmarks/bench_attention.py --layout qkv --qk-norm --N 680 2240 --B 16 32 --H 16   # as in the model

``--layout qkv``: q, k, v as views of one packed ``[B, N, 3, H, D]`` projection, as the model makes them (the
kernel reads each with its own strides; the default ``contiguous`` gives each its own ``[B, H, N, D]`` tensor).
``--qk-norm``: every backend computes HMAR's L2-normalised attention, ``F.normalize(q) * s`` and
``F.normalize(k)`` (``attention(..., qk_norm=s)``), the normalisation ops and their backward included in its
time, and a first column ``triton+qknorm`` does the normalisation inside the kernels
(:data:`hmar.attention.FUSED_QK_NORM`); the speed-ups are then the first column's over the others.
``--dq-atomic``: a first column more, the first Triton column with the backward's dq summed by atomics in the
dK/dV programs (:data:`hmar.attention.triton_kernel.DQ_ATOMIC`), against the dQ tiles in the next column.

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

import hmar.attention  # noqa: E402
from hmar.attention import attention, available_backends  # noqa: E402
from hmar.attention import triton_kernel as tk  # noqa: E402

SCHEDULES = {
    680: tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    2240: tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
    9451: tuple(x * x for x in (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)),
}
OFFICIAL_FWDBWD_MS = {  # fp16, from the spec (section 11(c) / brief), pattern block_diagonal
    (2240, 16, 16): 4.38, (9451, 4, 16): 14.6, (680, 16, 16): 0.73,
}
BACKENDS = ("triton", "per_scale", "reference")
SHORT = {"triton+qknorm+dqa": "qkn+dqa", "triton+dqa": "tri+dqa", "triton+qknorm": "tri+qkn", "triton": "tri",
         "per_scale": "psc", "reference": "ref"}   # column labels


def _width(names, j):
    """Width of column ``j`` of a timing group (the first carries the group's label, e.g. "f+b tri")."""
    return max(8, 4 + len(SHORT[names[0]])) if j == 0 else 7


def _bench(fn):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _time_backend(name, q, k, v, do, lengths, pattern, scale, qk_norm=None):
    """(forward, backward, forward + backward) ms of one backend. ``name`` "triton+qknorm": the Triton kernel with
    the q/k normalisation inside it; with ``qk_norm`` the others normalise first (its gradient is computed too). A
    name ending in "+dqa": that Triton column with the backward's dq summed by atomics (``DQ_ATOMIC = "on"``)."""
    fused = name.startswith("triton+qknorm")
    backend = "triton" if name.startswith("triton") else name
    inputs = (q, k, v) if qk_norm is None else (q, k, v, qk_norm)

    def fwd():
        return attention(q, k, v, lengths=lengths, pattern=pattern, scale=scale, backend=backend, qk_norm=qk_norm)

    saved, hmar.attention.FUSED_QK_NORM = hmar.attention.FUSED_QK_NORM, fused
    saved_dqa, tk.DQ_ATOMIC = tk.DQ_ATOMIC, "on" if name.endswith("+dqa") else "off"
    try:
        out = fwd()  # warm-up (and autotuning for triton)
        torch.autograd.grad(out, inputs, do)
        t_fwd = _bench(fwd)
        out = fwd()
        t_bwd = _bench(lambda: torch.autograd.grad(out, inputs, do, retain_graph=True))
        out = None
        t_all = _bench(lambda: torch.autograd.grad(fwd(), inputs, do))
    finally:
        hmar.attention.FUSED_QK_NORM, tk.DQ_ATOMIC = saved, saved_dqa
    return t_fwd, t_bwd, t_all


def _tuned(q, lengths, pattern):
    """The tile configurations the autotuner chose for this shape (for the JSON)."""
    try:
        key = tk._tune_key(q, tuple(lengths), pattern)
        f, b = tk._FWD_PLANS.get(key), tk._BWD_PLANS.get(tk._bwd_key(q, tuple(lengths), pattern))
        return {"fwd": list(vars(f[0]).values()) if f else None, "bwd": list(vars(b[0]).values()) if b else None}
    except Exception:  # noqa: BLE001
        return None


def _check_error(q, k, v, do, lengths, pattern, scale, qk_norm=None, atomic=False):
    """Max |triton - fp32| / max(1, max|fp32|) on one image and at most four heads (with ``qk_norm``: of the
    triton+qknorm column, the normalisation inside the kernels)."""
    hs = min(4, q.shape[1])
    qs, ks, vs = (x.detach()[:1, :hs].clone().requires_grad_() for x in (q, k, v))
    dos = do[:1, :hs]
    s = None if qk_norm is None else qk_norm[:, :hs]
    saved, hmar.attention.FUSED_QK_NORM = hmar.attention.FUSED_QK_NORM, s is not None
    saved_dqa, tk.DQ_ATOMIC = tk.DQ_ATOMIC, "on" if atomic else "off"
    try:
        out = attention(qs, ks, vs, lengths=lengths, pattern=pattern, scale=scale, backend="triton", qk_norm=s)
        g = torch.autograd.grad(out, (qs, ks, vs), dos)
    finally:
        hmar.attention.FUSED_QK_NORM, tk.DQ_ATOMIC = saved, saved_dqa
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (qs, ks, vs))
    ref = attention(qf, kf, vf, lengths=lengths, pattern=pattern, scale=scale, backend="per_scale",
                    qk_norm=None if s is None else s.detach().float())
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
    Bs = args.B or ([4] if args.quick else [4, 16])
    Hs = args.H or ([16] if args.quick else [16, 30])
    names = (("triton+qknorm",) if args.qk_norm else ()) + BACKENDS
    if args.dq_atomic:   # the first Triton column again, dq by atomics, first
        names = (names[0] + "+dqa",) + names
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dts = ["bf16"] if args.quick else args.dtypes
    patterns = args.patterns
    if args.N:
        Ns = args.N
    D = 64
    scale = D ** -0.5
    results = []
    cols = " | ".join(" ".join(f"{(part + ' ' if j == 0 else '') + SHORT[n]:>{_width(names, j)}}"
                               for j, n in enumerate(names)) for part in ("fwd", "bwd", "f+b"))
    hdr = (f"{'pattern':<14} {'dt':<4} {'N':>5} {'B':>3} {'H':>3} | {cols} | "
           + " ".join(f"{'x ' + SHORT[n]:>6}" for n in names[1:]) + f" {'x off':>6} | maxerr"
           + (f"   (layout {args.layout}{', L2-normalised q/k: every column includes the normalisation' if args.qk_norm else ''})"))
    print(hdr)
    print("-" * len(hdr))
    for pattern in patterns:
        for dt_name in dts:
            dtype = dtypes[dt_name]
            for N in Ns:
                lengths = SCHEDULES[N]
                for B in Bs:
                    for H in Hs:
                        row = dict(pattern=pattern, dtype=dt_name, N=N, B=B, H=H, D=D, layout=args.layout,
                                   qk_norm=args.qk_norm)
                        try:
                            g = torch.Generator(device="cuda").manual_seed(0)
                            if args.layout == "qkv":   # views of one packed projection, as in the model
                                qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, generator=g)
                                q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
                            else:
                                q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g)
                                           .requires_grad_() for _ in range(3))
                            do = torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g)
                            # the per-head temperature in the inputs' dtype (as in a half model; under autocast
                            # attention() casts the normalised q instead)
                            s = (torch.full((1, H, 1, 1), 4.0, device="cuda", dtype=dtype).requires_grad_()
                                 if args.qk_norm else None)
                        except torch.cuda.OutOfMemoryError:
                            print(f"{pattern:<14} {dt_name:<4} {N:>5} {B:>3} {H:>3} | inputs do not fit")
                            _free()
                            continue
                        for name in names:
                            if name == "reference" and args.no_reference:
                                row[name] = None
                                continue
                            try:
                                row[name] = _time_backend(name, q, k, v, do, lengths, pattern, scale, s)
                            except torch.cuda.OutOfMemoryError:
                                row[name] = "OOM"
                            except Exception as e:  # noqa: BLE001 - report and go on
                                row[name] = f"error: {type(e).__name__}: {e}"[:200]
                            _free()
                        row["triton_cfg"] = _tuned(q, lengths, pattern)
                        try:
                            row["err"] = _check_error(q, k, v, do, lengths, pattern, scale, s,
                                                      atomic=names[0].endswith("+dqa"))
                        except Exception as e:  # noqa: BLE001
                            row["err"] = f"error: {type(e).__name__}: {e}"[:200]
                        del q, k, v, do
                        _free()
                        results.append(row)
                        print(_fmt(row, names), flush=True)
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


def _fmt(row, names=BACKENDS):
    """One table row: forward, backward and forward + backward of every backend in ``names``, then the first's
    speed-up (forward + backward) over each other one and over the official kernel's reference figure."""
    t = row[names[0]]
    cols = [" ".join(f"{_ms(row[n], i):>{_width(names, j)}}" for j, n in enumerate(names)) for i in range(3)]
    xs = [f"{row[n][2] / t[2]:.2f}" if isinstance(t, tuple) and isinstance(row[n], tuple) else "-"
          for n in names[1:]]
    off = OFFICIAL_FWDBWD_MS.get((row["N"], row["B"], row["H"]))
    x_o = f"{off / t[2]:.2f}" if off and isinstance(t, tuple) and row["pattern"] == "block_diagonal" else "-"
    err = row.get("err")
    err_s = (f"{max(err.values()):.1e}" if isinstance(err, dict) else str(err))
    s = (f"{row['pattern']:<14} {row['dtype']:<4} {row['N']:>5} {row['B']:>3} {row['H']:>3} | "
         + " | ".join(cols) + " | " + " ".join(f"{x:>6}" for x in xs) + f" {x_o:>6} | {err_s}")
    for name in names:
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
    ap.add_argument("--B", nargs="+", type=int, help="batch sizes (default: 4 16; --quick: 4)")
    ap.add_argument("--H", nargs="+", type=int, help="head counts (default: 16 30; --quick: 16)")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "qkv"],
                    help="q, k, v as tensors of their own (default) or as views of one packed qkv projection")
    ap.add_argument("--dq-atomic", action="store_true",
                    help="a first column: the first Triton column with the backward's dq summed by atomics "
                         "(hmar.attention.triton_kernel.DQ_ATOMIC); the speed-ups are then that column's")
    ap.add_argument("--qk-norm", action="store_true",
                    help="L2-normalised q/k (HMAR's attention) in every column, and the fused triton+qknorm first")
    args = ap.parse_args(argv)
    t0 = time.time()
    rc = run(args)
    print(f"# {time.time() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
