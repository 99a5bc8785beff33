"""Run logging: ``log.txt`` (human), ``metrics.jsonl`` (one JSON object per record), TensorBoard (optional),
and a throughput meter. Only the main process writes."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..fileio import ensure_writable_dir

class RunLogger:
    """Writes records of ``{"step": .., "kind": .., **values}``; ``info`` prints a line and keeps it in log.txt."""

    def __init__(self, run_dir: Union[str, Path], enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.tb = None
        self.bar = None  # a tqdm bar to print through, when one is active
        if not enabled:
            return
        ensure_writable_dir(self.dir, "--out")   # a read-only or system folder: one error, before the work
        self._log = open(self.dir / "log.txt", "a", buffering=1)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(str(self.dir / "tb"))
            except Exception:
                self.tb = None

    def info(self, msg: str) -> None:
        """Print ``msg`` (through the progress bar if any) and append it to log.txt."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        self._log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def record(self, step: int, kind: str, values: Dict[str, Any], echo: bool = True) -> None:
        """One metrics record (also to TensorBoard as ``kind/name`` scalars)."""
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
                elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{kind}/{k}_{i}", x, step)
        if echo:
            self.info(f"[{kind}] step {step} " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def drop_after(self, step: int) -> None:
        """Forget the records of steps after ``step`` (a run resumed from an earlier checkpoint redoes them,
        so metrics.jsonl keeps one record per step and kind). TensorBoard handles this by itself."""
        if not self.enabled:
            return
        path = self.dir / "metrics.jsonl"
        self._jsonl.close()
        keep = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, AttributeError):   # a torn last line of a killed run
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(path)
        self._jsonl = open(path, "a", buffering=1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        self._log.close()
        self._jsonl.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


class Throughput:
    """Images per second over the window since the last :meth:`rate` call."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.n = 0

    def add(self, images: int) -> None:
        self.n += images

    def rate(self) -> float:
        t = time.perf_counter()
        r = self.n / max(t - self.t0, 1e-9)
        self.t0, self.n = t, 0
        return r


def check_finite_loss(loss: float, step: int, run_dir: Union[str, Path]) -> None:
    """Stop a diverged run (a NaN or infinite loss, the same on every process after the reduction) with one error
    instead of training on to the end; the last checkpoint stays, to resume from with other options."""
    import math
    from ..errors import HMARError
    if not math.isfinite(loss):
        raise HMARError(f"the training loss is {loss} at step {step}: the run diverged and was stopped. Resume from "
                        f"the last checkpoint in {run_dir}/checkpoints with --resume and a lower --lr (or "
                        "--grad-clip, or --precision bf16 instead of fp16)")


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1] (mapped to [0, 1], clamped), averaged over images."""
    a = ((x.float() + 1) / 2).clamp(0, 1)
    b = ((y.float() + 1) / 2).clamp(0, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())
