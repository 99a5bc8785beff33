"""Stopping a training run on SIGINT / SIGTERM without losing work.

The first signal only raises a flag: the trainer finishes the step it is in, writes a checkpoint (atomically,
as always) and raises :class:`TrainingInterrupted`; ``--resume`` continues from exactly that step. A second
signal gets the handler that was there before (Ctrl-C again: an immediate ``KeyboardInterrupt``; SIGTERM
again: the default, the process ends). ``torchrun`` forwards SIGINT/SIGTERM to its workers as SIGTERM and
waits for them, so a distributed run stops the same way: the ranks agree on the step to stop at through one
small all-reduce every ``every`` steps (every step for a single process, where the check is free).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

from .distributed import DistInfo, all_reduce_max


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving a checkpoint; ``signum`` is the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class GracefulStop:
    """Context manager: while active, SIGINT and SIGTERM request a stop instead of killing the run.

    Handlers can only be installed from the main thread; elsewhere (a training run started from a worker
    thread) the signals keep their usual effect and :meth:`requested` is always False.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, info: DistInfo, every: Optional[int] = None):
        self.info = info
        self.every = every if every is not None else (1 if not info.initialized else 10)
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum
        self._restore()   # a second signal acts as it would without us

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def requested(self, step: int) -> bool:
        """True when a signal arrived (on any rank); every rank gets the same answer at the same ``step``."""
        if not self.info.initialized:
            return self.signum is not None
        if step % self.every:
            return False
        got = all_reduce_max(float(self.signum or 0), self.info)
        if got and self.signum is None:
            self.signum = int(got)
        return bool(got)

    def interrupted(self, step: int, checkpoint: str) -> TrainingInterrupted:
        """The exception to raise once the checkpoint of ``step`` is written."""
        name = signal.Signals(self.signum or signal.SIGINT).name
        return TrainingInterrupted(self.signum or signal.SIGINT,
                                   f"stopped by {name} after step {step}; checkpoint {checkpoint} written: "
                                   "run the same command with --resume to continue from it")


def stop_run(trainer: Any, stop: GracefulStop, bar: Any, saved: bool) -> None:
    """End ``trainer``'s run after a stop was requested: checkpoint (unless this step's is written), close the
    progress bar, log and process group, and raise :class:`TrainingInterrupted`."""
    from .distributed import cleanup
    if not saved:
        trainer.save_checkpoint()
    bar.close()
    trainer.log.bar = None
    err = stop.interrupted(trainer.step, str(trainer.ckpts.dir / f"step_{trainer.step:08d}.pt"))
    if trainer.info.is_main:
        trainer.say(str(err))
    trainer.log.close()
    cleanup(trainer.info)
    raise err


def end_of_step(trainer: Any, stop: GracefulStop, bar: Any, ckpt_every: int, end_epoch: bool) -> bool:
    """The end of a training step: the periodic checkpoint when it is due, then the stop if one was requested
    (:func:`stop_run`). Returns whether a checkpoint was written."""
    from .schedule import is_due
    saved = is_due(ckpt_every, trainer.step, end_epoch)
    if saved:
        trainer.save_checkpoint()
    if trainer.step < trainer.total and stop.requested(trainer.step):
        stop_run(trainer, stop, bar, saved)
    return saved
