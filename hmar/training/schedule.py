"""Learning-rate and weight-decay schedules, per optimiser step (the official ``lr_wd_annealing``)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import HMARError

HOLD = 0.05  # lin0: fraction of the post-warm-up steps held at the peak


def lr_factor(step: int, total: int, warmup: int, kind: str = "lin0", start: float = 0.005,
              final: float = 0.1) -> float:
    """Multiplier of the peak lr at ``step`` (0-based) of ``total`` steps.

    Warm-up: linear from ``start`` to 1 over ``warmup`` steps. Then, with ``p`` the fraction of the
    post-warm-up steps done (0 at the first, 1 at the last step):

    * ``lin0``: 1 while ``p < 0.05``, then linear down to ``final`` at ``p = 1``;
    * ``cos``: half-cosine from 1 to ``final``;
    * ``const``: 1.
    """
    if warmup > 0 and step < warmup:
        return start + (1 - start) * step / warmup
    p = min(max((step - warmup) / max(total - 1 - warmup, 1), 0.0), 1.0)
    if kind == "lin0":
        if p < HOLD:
            return 1.0
        return final + (1 - final) * (1 - p) / (1 - HOLD)
    if kind == "cos":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "const":
        return 1.0
    raise HMARError(f"unknown lr schedule {kind!r}: use lin0, cos or const")


def wd_value(step: int, total: int, wd: float, wd_end: float) -> float:
    """Weight decay at ``step``: half-cosine from ``wd`` (step 0) to ``wd_end`` (last step)."""
    p = min(max(step / max(total - 1, 1), 0.0), 1.0)
    return wd_end + (wd - wd_end) * 0.5 * (1 + math.cos(math.pi * p))


@dataclass
class Schedule:
    """``schedule(step) -> (lr, wd)`` for a whole run."""
    peak_lr: float
    total: int
    warmup: int
    kind: str = "lin0"
    start: float = 0.005
    final: float = 0.1
    wd: float = 0.05
    wd_end: float = 0.05
    offset: int = 0   # the step the schedule starts at (--time-budget: once the run's length is known)

    def __call__(self, step: int) -> Tuple[float, float]:
        s, n = step - self.offset, self.total - self.offset
        return (self.peak_lr * lr_factor(s, n, self.warmup, self.kind, self.start, self.final),
                wd_value(s, n, self.wd, self.wd_end))


def is_due(every: int, step: int, end_epoch: bool) -> bool:
    """Whether a periodic action (eval, checkpoint) runs now: every ``every`` steps, or at each epoch's end
    when ``every`` is 0."""
    return (every > 0 and step % every == 0) or (every == 0 and end_epoch)


class TimeBudget:
    """Fit a run to a wall-clock budget: from the measured time per step, set the total number of steps
    (and so the length of the lr schedule) so that training ends when ``seconds`` are spent.

    Steps count from this process's first one (a resumed run gets the whole budget again). The first ``skip``
    steps (start-up, compilation) are not timed; the first estimate comes after ``skip + probe`` steps (until then
    the trainer holds the lr at its warm-up start and starts the schedule after them: :attr:`Schedule.offset`) and
    is refreshed every ``every`` steps (so a run of several processes may overshoot by up to ``every`` steps; one
    process stops as soon as the budget is spent). Every process computes the same answer from the slowest one.
    """

    UNFITTED = 10 ** 12
    """A budgeted run's number of steps until the first estimate (the budget, not --epochs / --max-steps, ends it)."""

    def __init__(self, seconds: float, probe: int = 3, every: int = 50, skip: int = 2):
        if seconds <= 0:
            raise HMARError(f"--time-budget must be > 0 seconds, got {seconds}")
        self.seconds, self.probe, self.every, self.skip = seconds, probe, every, skip
        self.t0 = time.perf_counter()
        self.t_skip: float = 0.0
        self.first: Optional[int] = None   # the run's step count before this process's first step
        self.fitted = False   # True from the first refresh on: the total is then the budget's, not the options'

    def total(self, step: int, total: int, reduce_max=None) -> int:
        """The new total number of steps after ``step`` steps (``total`` unchanged between refreshes)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = step - 1
        k = step - self.first   # this process's steps
        if k == self.skip:
            self.t_skip = now
        elapsed = now - self.t0
        if reduce_max is None and elapsed >= self.seconds:
            return step  # one process: stop as soon as the budget is spent
        # several processes: refresh at the same steps everywhere (the agreement is a collective call)
        if k < self.skip + self.probe or (k - self.skip - self.probe) % self.every:
            return total
        per_step = (now - self.t_skip) / (k - self.skip)
        self.fitted = True
        new = step + max(int((self.seconds - elapsed) / per_step), 0)
        if reduce_max is not None:   # agree across processes: the slowest one decides
            new = -int(reduce_max(-new))
        return max(new, step)
