"""torch.profiler summary shared by the benchmarks: where the time of one call goes, per kernel and per kind."""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, List, Tuple

import torch

# kernel kinds, first match wins (names of the H200's cuBLAS / cuDNN / Triton / inductor kernels)
KINDS = (   # the first pattern that matches names a kernel's kind
    # inductor's kernels first: their names list the ops they fuse, "attn" / "attention" among them
    ("inductor Triton (fused elementwise / norms)", re.compile(r"^triton_")),
    ("attention (flash / fmha / cuDNN SDPA / hmar's Triton kernels)",
     re.compile(r"flash|fmha|sdpa|^_(fwd|bwd|rows|delta|dense)\w*_kernel$", re.I)),
    ("GEMM (cuBLAS nvjet / cutlass / xmma)", re.compile(r"nvjet|gemm|xmma|cutlass|sm90_", re.I)),
    ("top-k / sort / scan", re.compile(r"topk|sort|scan|radix|cub::", re.I)),
    ("other Triton", re.compile(r"^_\w+_kernel$|triton", re.I)),
    ("copies / elementwise (ATen)", re.compile(r"elementwise|copy|vectorized|reduce|index|gather|scatter|fill|"
                                               r"cat|memcpy|memset", re.I)),
)

# the names the profiler gives annotation spans (for a torch without FunctionEvent.is_user_annotation)
ANNOTATION = re.compile(r"^(Optimizer\.\w+#|ProfilerStep#)")


def _kernels(prof) -> Iterator[Tuple[str, float]]:
    """``(name, device ms)`` of every profiled kernel: device-side events less annotation spans (the GPU-side spans
    of ``Optimizer.step#AdamW.step``, ``ProfilerStep#N`` and ``record_function`` ranges cover kernels that are
    counted on their own)."""
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if getattr(e, "is_user_annotation", False) or ANNOTATION.match(e.name):
            continue
        us = getattr(e, "device_time", None)
        if us is None:
            us = getattr(e, "cuda_time", 0.0)
        yield e.name, us / 1e3


def kernel_kinds(prof) -> Dict[str, float]:
    """Device time (ms) of the profiled kernels summed by :data:`KINDS` (plus "rest" and "total"); annotation
    spans are not kernels and are left out."""
    out: Dict[str, float] = {}
    for name, ms in _kernels(prof):
        kind = next((k for k, rx in KINDS if rx.search(name)), "rest")
        out[kind] = out.get(kind, 0.0) + ms
    out["total"] = sum(out.values())
    return out


def top_kernels(prof, n: int = 20) -> List[Tuple[str, int, float]]:
    """The ``n`` kernels with the most device time: ``(full name, calls, total ms)``, most first. The profiler's
    table cuts names at 90 characters; inductor's names list the ops a kernel fuses, so the whole name says which
    part of the model a kernel runs."""
    calls: Dict[str, int] = {}
    total: Dict[str, float] = {}
    for name, ms in _kernels(prof):
        calls[name] = calls.get(name, 0) + 1
        total[name] = total.get(name, 0.0) + ms
    return sorted(((k, calls[k], total[k]) for k in total), key=lambda r: -r[2])[:n]


def profile_table(fn: Callable[[], object], rows: int = 25, calls: int = 1) -> str:
    """The profiler's table of ``calls`` calls of ``fn`` (after one unprofiled call), sorted by device time on
    CUDA (self CPU time elsewhere), ``rows`` rows, kernel names up to 90 characters; on CUDA followed by the kernels'
    time by kind (:func:`kernel_kinds`) and the top kernels with their full names (:func:`top_kernels`)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows, max_name_column_width=90)
    if cuda:
        try:
            kinds = kernel_kinds(prof)
            table += "\nkernel time by kind (ms, all profiled calls): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            table += "\ntop kernels (full names; calls, ms of all profiled calls, us a call):\n" + "\n".join(
                f"  {ms:9.3f} ms {c:5d} x {1e3 * ms / c:9.1f} us  {name}" for name, c, ms in top_kernels(prof))
        except Exception as e:  # noqa: BLE001  (a summary only: the table stands without it)
            table += f"\n(kernel kinds not summed: {e})"
    return table
