"""FP8 GEMMs in the transformer blocks (:mod:`hmar.model.fp8`) against bf16: speed of the linears alone, and the
error of whole models' logits.

``--part gemm`` (CUDA): each config's four block linears (qkv C -> 3C, proj C -> C, fc1 C -> 4C, fc2 4C -> C) at
M = 2 x batch x tokens of its largest passes (guidance doubles the batch), side by side, medians of
``triton.testing.do_bench`` in microseconds: ``bf16`` (``F.linear`` with its bias), ``mm`` (``torch._scaled_mm``
alone, with the bias, on an input quantised before), ``mmfa`` (the same with ``use_fast_accum``), ``fp8``
(:class:`~hmar.model.fp8.Float8Linear`: the per-token quantisation as eager ops, then the GEMM), ``fp8c`` (the
quantisation compiled into one kernel, then the GEMM) and ``fp8k`` (hmar's Triton quantisation kernel, then the GEMM;
for fc2 with the GELU of its input in that kernel, against a bf16 fc2 without it). The sampler's compiled blocks fuse the quantisation into the
kernel before it (LayerNorm + modulation, GELU), so its cost there lies between ``mm`` and ``fp8c``.

``--part shapes``: every block linear of widths 1024 and 1920 at every pass size of a guided 256 px call, with and
without its bias and fast accumulation (``FAST_ACCUM_MIN_ROWS`` lifted), once each: which combinations cuBLAS refuses.

``--part error`` (any device): the teacher-forced logits ``[B, L, V]`` of a model in fp32 (the reference), in bf16,
and in bf16 with fp8 blocks (and ``fast_accum`` on CUDA), over the same inputs: the relative RMS error of the logits,
how often the argmax agrees with fp32's, and the mean KL(p_fp32 || p) per position. ``--configs`` take random
weights (the sizes of the goal configs); ``--shipped`` adds the model shipped with hmar (trained, 64 px emoji), on
next-scale inputs of its own fp32 samples.

    python benchmarks/bench_fp8.py --part gemm
    python benchmarks/bench_fp8.py --part error --configs hmar-d16,hmar-d30 --shipped
    python benchmarks/bench_fp8.py --device cpu --configs hmar-tiny --shipped     # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar import build_model, model_config  # noqa: E402
from hmar.model.fp8 import Float8Linear, kernel_available, quantize_rows, to_float8  # noqa: E402

def _timer(device: torch.device):
    """Microseconds per call: ``triton.testing.do_bench``'s median on CUDA, a median of wall times on the CPU
    (a smoke run: CPU times say nothing about the GPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100) * 1e3

    def wall(fn):
        import statistics
        import time
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6
    return wall


def gemm_rows(configs, batch: int, device: torch.device):
    """One row per config, layer and M (its two largest scales' passes): microseconds of each variant."""
    bench = _timer(device)
    torch._dynamo.config.cache_size_limit = 64      # one compiled quantisation per input shape
    quantize_compiled = torch.compile(quantize_rows, dynamic=False)
    rows = []
    for name in configs:
        cfg = model_config(name)
        C = cfg.embed_dim
        for tokens in (cfg.patch_nums[-1] ** 2, cfg.patch_nums[-2] ** 2):
            M = 2 * batch * tokens
            for layer, (k, n) in {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, 4 * C), "fc2": (4 * C, C)}.items():
                torch.manual_seed(0)
                lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
                x = torch.randn(M, k, device=device, dtype=torch.bfloat16)
                f8 = Float8Linear(lin)
                q, s = quantize_rows(x)
                w, ws = f8.weight_fp8.view(torch.float8_e4m3fn).t(), f8.weight_scale

                def mm(a, sa, fast=False):
                    return torch._scaled_mm(a, w, sa, ws, bias=lin.bias, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)
                fns = {
                    "bf16": lambda: F.linear(x, lin.weight, lin.bias),
                    "mm": lambda: mm(q, s),
                    "mmfa": lambda: mm(q, s, True),
                    "fp8": lambda: f8(x),
                    "fp8c": lambda: mm(*quantize_compiled(x)),
                }
                if device.type == "cuda" and kernel_available(device):
                    fns["fp8k"] = lambda: mm(*torch.ops.hmar.fp8_quantize_rows(x, layer == "fc2"))
                r = {"config": name, "layer": layer, "M": M, "K": k, "N": n}
                with torch.no_grad():
                    for key, fn in fns.items():
                        r[key] = bench(fn)
                r["tflops_bf16"] = 2 * M * k * n / r["bf16"] / 1e6
                r["tflops_mm"] = 2 * M * k * n / r["mm"] / 1e6
                rows.append(r)
                print(f"{name:13s} {layer:4s} M={M:6d} K={k:5d} N={n:5d}  bf16 {r['bf16']:7.1f}  mm {r['mm']:7.1f}  "
                      f"mmfa {r['mmfa']:7.1f}  fp8 {r['fp8']:7.1f}  fp8c {r['fp8c']:7.1f}  fp8k {r.get('fp8k', 0):7.1f} us   "
                      f"x{r['bf16'] / r['fp8c']:.2f} (compiled) x{r['bf16'] / r['mm']:.2f} (GEMM alone)  "
                      f"{r['tflops_bf16']:.0f} / {r['tflops_mm']:.0f} TF/s", flush=True)
    for name in configs:
        mine = [r for r in rows if r["config"] == name]
        tot = {k: sum(r.get(k, 0) for r in mine) for k in ("bf16", "mm", "mmfa", "fp8", "fp8c", "fp8k")}
        print(f"{name:13s} sum over its rows: " + "  ".join(f"{k} {v:8.1f}" for k, v in tot.items()) +
              f" us   bf16 / fp8c x{tot['bf16'] / tot['fp8c']:.2f}, bf16 / mm x{tot['bf16'] / tot['mm']:.2f}",
              flush=True)
    return rows


def shape_failures(device: torch.device, widths=(1024, 1920), batch: int = 16):
    """Every block linear of the given widths at every pass size M of a guided sampling call (2 x batch x pn^2 for
    the 256 px scales), with and without its bias and fast accumulation, run once eagerly: the combinations that
    raise (cuBLAS has no kernel for some), as rows."""
    import hmar.model.fp8 as fp8
    Ms = [2 * batch * pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    rows = []
    for C in widths:
        for k, n in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):
            lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
            for fast in (False, True):
                layer = Float8Linear(lin, fast_accum=fast)
                kept = fp8.FAST_ACCUM_MIN_ROWS
                fp8.FAST_ACCUM_MIN_ROWS = 0   # every size, the ones it keeps exact included
                try:
                    for M in Ms:
                        for bias in (layer.bias, None):
                            try:
                                with torch.no_grad():
                                    layer(torch.randn(M, k, device=device, dtype=torch.bfloat16), bias)
                                if device.type == "cuda":
                                    torch.cuda.synchronize()
                            except RuntimeError as e:
                                rows.append({"M": M, "K": k, "N": n, "fast_accum": fast, "bias": bias is not None,
                                             "error": str(e)[:120]})
                finally:
                    fp8.FAST_ACCUM_MIN_ROWS = kept
    for r in rows:
        print(f"fails: M={r['M']} K={r['K']} N={r['N']} fast_accum={r['fast_accum']} bias={r['bias']}: {r['error']}")
    print(f"{len(rows)} failing combinations of {len(widths) * 4 * 2 * len(Ms) * 2}", flush=True)
    return rows


def _errors(ref: torch.Tensor, got: torch.Tensor) -> dict:
    ref, got = ref.float(), got.float()
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"rel_rms": float((got - ref).norm() / ref.norm()),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl_mean": float(kl.mean()), "kl_p99": float(kl.flatten().quantile(0.99))}


def error_rows(models, device: torch.device):
    """``models``: (label, fp32 model, labels, next-scale inputs)."""
    rows = []
    for label, model, labels, x_in in models:
        with torch.no_grad():
            ref = model(labels, x_in)
            bf = copy.deepcopy(model).to(torch.bfloat16)
            variants = {"bf16": bf}
            for fa in ((False, True) if device.type == "cuda" else (False,)):
                m = copy.deepcopy(bf)
                to_float8(m, fast_accum=fa)
                variants["bf16+fp8" + ("-fast-accum" if fa else "")] = m
            for key, m in variants.items():
                r = {"model": label, "variant": key, **_errors(ref, m(labels, x_in.to(torch.bfloat16)))}
                rows.append(r)
                print(f"{label:22s} {key:20s} logits rel. RMS error {r['rel_rms']:.4f}  argmax agrees "
                      f"{r['argmax_agree'] * 100:6.2f} %  KL mean {r['kl_mean']:.2e}  p99 {r['kl_p99']:.2e}",
                      flush=True)
            del variants, bf
    return rows


def _random_models(configs, batch: int, device: torch.device):
    for name in configs:
        cfg = model_config(name)
        torch.manual_seed(0)
        with torch.device(device):
            model = build_model(cfg).eval()
            labels = torch.arange(batch) % cfg.num_classes
            x_in = torch.randn(batch, cfg.seq_len - 1, cfg.z_channels)
        yield f"{name} (random)", model, labels, x_in


def _shipped(batch: int, device: torch.device):
    from hmar.pipeline import HMARPipeline
    pipe = HMARPipeline.from_pretrained(None, device=device)
    labels = torch.arange(batch, device=device) % pipe.model.config.num_classes
    from hmar.sampling import sample
    indices = sample(pipe.model, pipe.tokenizer, labels, generator=0, decode=False).indices
    x_in = pipe.tokenizer.quantize.next_scale_inputs(indices)
    yield "shipped (trained)", pipe.model.eval(), labels, x_in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("gemm", "error", "both", "shapes"), default="both")
    ap.add_argument("--configs", default="hmar-d16,hmar-d30,hmar-d16-512,hmar-d30-512")
    ap.add_argument("--batch", type=int, default=16, help="images (the GEMMs: 2x that for guidance)")
    ap.add_argument("--error-batch", type=int, default=4, help="images per model in --part error")
    ap.add_argument("--shipped", action="store_true", help="--part error: also the shipped default model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    configs = [c for c in args.configs.split(",") if c]
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if args.part == "shapes":
        out["failures"] = shape_failures(device)
    if args.part in ("gemm", "both"):
        out["gemm"] = gemm_rows(configs, args.batch, device)
    if args.part in ("error", "both"):
        models = list(_random_models(configs, args.error_batch, device))
        rows = error_rows(models, device)
        del models
        if args.shipped:
            rows += error_rows(list(_shipped(args.error_batch, device)), device)
        out["error"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
