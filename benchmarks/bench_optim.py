"""The optimiser part of a training step: gradient clipping + fused AdamW over a preset's parameters, two ways side
by side in one process (``hmar.training.optim.clip_and_step``):

- ``separate``: ``torch.nn.utils.clip_grad_norm_`` (a norm pass, then a multiply pass over every gradient), then
  the fused AdamW step (what the trainer did until 2026-12-07);
- ``in-kernel``: the norm pass, then the fused AdamW step dividing each gradient by the clipping factor as it reads
  it (the kernel's ``grad_scale`` input; it then writes the clipped gradients back): one read of the gradients and
  the multiply's launches fewer. The trainer's default since.

    python benchmarks/bench_optim.py --preset hmar-d16 hmar-d30 --json out.json
    python benchmarks/bench_optim.py --preset hmar-tiny --device cpu --fused on --reps 5     # smoke test

Random gradients, the official weight-decay groups, rounds of the two ways interleaved; the median of ``--reps``
timed steps each (CUDA events on the GPU). Prints ms per step, the ratio, and the bytes the multiply pass moves.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_train import build  # noqa: E402  (benchmarks/: the model `hmar train` trains at stage 1)
from hmar.training.optim import build_adamw, clip_and_step, param_groups  # noqa: E402

WAYS = {"separate": False, "in-kernel": True}   # name -> clip_and_step's in_kernel


def _time(fn, device: torch.device) -> float:
    """ms of one call of ``fn``."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench(preset: str, device: torch.device, reps: int, clip: float, fused: str = "auto",
          warmup: int = 3) -> List[Dict[str, Any]]:
    """Both ways over the stage-1 parameters of ``preset``: a row each (ms, ratio to ``separate``, ...)."""
    torch.manual_seed(0)
    model = build(preset, "next-scale", device).to(device)
    opt = build_adamw(param_groups(model.named_parameters()), 1e-4, (0.9, 0.95), fused, device)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    n = sum(p.numel() for p in params)
    times: Dict[str, List[float]] = {k: [] for k in WAYS}
    for r in range(warmup + reps):
        for name, in_kernel in WAYS.items():
            ms = _time(lambda: clip_and_step(opt, params, clip, in_kernel=in_kernel), device)
            if r >= warmup:
                times[name].append(ms)
    first = statistics.median(times["separate"])
    rows = []
    for name in WAYS:
        ms = statistics.median(times[name])
        rows.append({"preset": preset, "way": name, "ms": round(ms, 3), "ratio": round(first / ms, 3),
                     "params_m": round(n / 1e6, 2), "fused": bool(opt.param_groups[0].get("fused")),
                     "multiply_pass_gb": round(n * 8 / 1e9, 2), "clip": clip, "reps": reps,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__})
    del model, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["hmar-d16", "hmar-d30"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--clip", type=float, default=2.0, help="the clipping bound (the official tclip: 2.0)")
    p.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                   help="fused AdamW (auto: on CUDA; 'on' runs the fused kernel on the CPU too)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    rows: List[Dict[str, Any]] = []
    for preset in a.preset:
        for r in bench(preset, dev, a.reps, a.clip, a.fused):
            rows.append(r)
            print(f"{r['preset']:>14}  {r['way']:>9}  {r['ms']:9.3f} ms  {r['ratio']:.3f}x  ({r['params_m']} M params, "
                  f"fused AdamW {r['fused']}, the multiply pass moves {r['multiply_pass_gb']} GB, {r['device']})",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
