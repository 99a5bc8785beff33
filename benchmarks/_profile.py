"""torch.profiler summary shared by the benchmarks: where the time of one call goes, per kernel."""
from __future__ import annotations

from typing import Callable

import torch


def profile_table(fn: Callable[[], object], rows: int = 25, calls: int = 1) -> str:
    """The profiler's table of ``calls`` calls of ``fn`` (after one unprofiled call), sorted by device time on
    CUDA (self CPU time elsewhere), ``rows`` rows."""
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
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
