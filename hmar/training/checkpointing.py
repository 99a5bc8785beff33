"""Resumable training checkpoints: atomic files, keep-last-N, full (gathered) model/optimiser states,
RNG states of every rank and the data position.

A checkpoint is ``RUNDIR/checkpoints/step_XXXXXXXX.pt`` (``torch.save`` of plain containers and tensors,
loadable with ``weights_only=True``). It is written to a temporary name, fsynced and renamed, so a
process killed at any moment leaves either the previous or the new file, never a torn one.

Portable across world sizes and wrappers: the model and optimiser states are full (unsharded) CPU tensors
keyed by parameter names (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``; no
``module.`` prefix, no DTensor), so a file written by 1 process, N DDP processes or N FSDP2 processes loads
into any of these (every rank reads the file through a memory map: the pages are shared, not copied per rank).
The data position is counted in global batches and the data order, crops, flips and stage-2 masks are keyed
by ``(seed, epoch, image index)``, so they do not depend on the number of processes either; the global
batch size must stay the same (checked).

RNG states: ``rng[r]`` holds rank ``r``'s Python/NumPy/torch (CPU and CUDA) states and ``world`` the number of
processes that wrote them. Resumed with the same number of processes, every rank restores its own states
(bit-identical continuation). Resumed with another number, every rank is re-seeded with
:func:`resume_seed` ``(seed, rank, step)`` instead: deterministic, but the per-rank draws of class dropout and
drop path (the only consumers of these streams in training) differ from an uninterrupted run, which is then
matched statistically, not numerically. With those two off, a resumed run follows the uninterrupted loss
curve up to float rounding: the gradient mean over the global batch is summed in a different order with a
different number of processes (about 1e-7 relative per step in fp32), which is also why 1 and 2
uninterrupted processes differ at that level.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import HMARError
from .distributed import DistInfo, all_gather_object

_NAME = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ RNG states
def capture_rng() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as weights-only-loadable containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per visible device; a machine showing fewer devices restores those it has
        for i, s in enumerate(list(state["cuda"])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------------------------ model / optimiser
def _options(info: DistInfo):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=info.initialized)


def get_states(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], info: DistInfo) -> Dict[str, Any]:
    """Full (unsharded, CPU) model and optimiser state dicts keyed by parameter names. Collective under
    DDP/FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opts = _options(info)
    out = {"model": {k: v.detach().cpu().clone() for k, v in get_model_state_dict(model, options=opts).items()}}
    out["optim"] = [_to_cpu(get_optimizer_state_dict(model, o, options=opts)) for o in optimizers]
    return out


def _to_cpu(x: Any) -> Any:
    """Every tensor in nested dicts / lists / tuples on the CPU. On one GPU the state dicts are not offloaded,
    and fused AdamW keeps its ``step`` counters on the GPU: without this the file would hold CUDA tensors
    (and differ in layout from a file written by several processes)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def set_states(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], states: Dict[str, Any],
               info: DistInfo) -> None:
    """Load what :func:`get_states` returned (on every rank)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    opts = _options(info)
    set_model_state_dict(model, states["model"], options=opts)
    for o, s in zip(optimizers, states["optim"]):
        set_optimizer_state_dict(model, o, s, options=opts)


# ------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """``RUNDIR/checkpoints``: save (rank 0 writes), list, prune to the last ``keep`` files, load the newest."""

    def __init__(self, directory: Union[str, Path], keep: int = 3, info: Optional[DistInfo] = None):
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.info = info or DistInfo()

    def paths(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        ps = self.paths()
        return ps[-1] if ps else None

    def save(self, step: int, payload: Dict[str, Any]) -> Optional[Path]:
        """Write ``payload`` with the RNG states of all ranks added (collective: call on every rank)."""
        rngs = all_gather_object(capture_rng(), self.info)
        if not self.info.is_main:
            return None
        payload = {**payload, "rng": rngs, "world": self.info.world, "step": step}
        for stale in self.dir.glob(".step_*.pt.tmp*") if self.dir.is_dir() else []:
            stale.unlink(missing_ok=True)   # left by a process killed while writing
        path = atomic_save(payload, self.dir / f"step_{step:08d}.pt")
        for old in self.paths()[:-self.keep]:
            try:
                old.unlink()
            except FileNotFoundError:
                pass
        return path

    def load_latest(self, say: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
        """The newest loadable checkpoint (older ones are tried if the newest cannot be read), or None."""
        for p in reversed(self.paths()):
            try:
                # memory-mapped: the ranks of a machine share the file's pages instead of holding a copy each
                ck = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
                ck["path"] = str(p)
                return ck
            except Exception as e:  # pragma: no cover - atomic writes make this unlikely
                say(f"warning: cannot read checkpoint {p} ({type(e).__name__}: {e}); trying an older one")
        return None

    def restore_rng(self, ck: Dict[str, Any], say: Callable[[str], None] = print) -> bool:
        """Restore this rank's RNG states; False (after a note) when the number of processes changed,
        in which case the caller re-seeds with :func:`resume_seed`."""
        rngs = ck.get("rng") or []
        if len(rngs) == self.info.world:
            restore_rng(rngs[self.info.rank])
            return True
        say(f"warning: checkpoint was written by {len(rngs)} processes, now {self.info.world}: the per-rank RNG "
            "streams (class dropout, drop path) are re-seeded from (seed, rank, step); model, optimiser, schedule "
            "and data position carry over unchanged")
        return False


def gather_log_window(window: Any, info: DistInfo) -> List[Any]:
    """Every rank's running sums since its last log line (``window``: this rank's, picklable), for a checkpoint:
    a resumed run then logs the same means as an uninterrupted one."""
    return [list(w) if isinstance(w, tuple) else w for w in all_gather_object(window, info)]


def this_rank_log_window(ck: Dict[str, Any], info: DistInfo) -> Optional[Any]:
    """This rank's entry of a checkpoint's ``log_window``; None when the run had another number of processes
    (the window then starts empty) or the checkpoint has none."""
    window = ck.get("log_window") or []
    return window[info.rank] if len(window) == info.world else None


def resume_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank`` after resuming at ``step`` with another number of processes than the
    checkpoint's (a fresh run seeds rank ``r`` with ``seed * 1000 + r + 1``; ``step >= 1`` here)."""
    return seed * 1000 + rank + 1 + 7919 * step


def resume_point(trainer: Any, stage: str) -> Optional[Dict[str, Any]]:
    """The newest checkpoint of ``trainer`` (None, with a note, when there is none); it must be of ``stage``
    and of the same global batch size (the data position and the schedule count global batches)."""
    ck = trainer.ckpts.load_latest(trainer.say)
    if ck is None:
        trainer.say(f"--resume: no checkpoint in {trainer.ckpts.dir}, starting from scratch")
        return None
    if ck.get("stage") != stage:
        raise HMARError(f"{ck['path']} is a {ck.get('stage')} checkpoint but this run is {stage}")
    old_batch = (ck.get("config") or {}).get("batch_size")
    if old_batch is not None and int(old_batch) != int(trainer.cfg.batch_size):
        was = ck.get("world", len(ck.get("rng") or []) or "?")
        raise HMARError(f"{ck['path']} was trained with --batch-size {old_batch} ({was} process(es)) but this run has "
                        f"--batch-size {trainer.cfg.batch_size}: --batch-size is the GLOBAL batch; keep "
                        f"{old_batch} when resuming with {trainer.info.world} process(es) (each gets "
                        f"{old_batch} / {trainer.info.world})")
    return ck


def already_finished(trainer: Any, ck: Dict[str, Any], output: Path) -> bool:
    """Whether resuming from ``ck`` has nothing to do: the checkpoint is at the run's last step and ``output``
    (the final model / tokenizer directory) was written at that step (a one-line note says so). A checkpoint
    past the last step is an error: the run would quietly end at the checkpoint's step instead of the one asked
    for (with --time-budget the number of steps is fitted during the run, so it is not checked here)."""
    step, total, cfg = int(ck["step"]), trainer.total, trainer.cfg
    if step > total and not cfg.time_budget:
        if cfg.max_steps:
            raise HMARError(f"{ck['path']}: the checkpoint is at step {step}; --max-steps {cfg.max_steps} is below "
                            f"it: pass --max-steps >= {step} or resume without it")
        raise HMARError(f"{ck['path']}: the checkpoint is at step {step}; --epochs {cfg.epochs} gives only {total} "
                        f"steps: pass more --epochs or --max-steps >= {step}")
    if step != total:
        return False
    try:
        done = int(json.loads((output / "config.json").read_text())["training"]["steps"]) == step
    except (OSError, ValueError, KeyError, TypeError):   # not written (killed before the end), or torn
        done = False
    if done:
        trainer.say(f"run already finished at step {step}: nothing to do; pass a larger --max-steps (or --epochs) "
                    f"to train on; output: {output}")
    return done


def restore_position(trainer: Any, ck: Dict[str, Any]) -> None:
    """Step, epoch, batch within the epoch, skipped files and RNG states of a resumed ``trainer``."""
    from .distributed import seed_everything
    from .data import EpochBatches
    trainer.step, trainer.epoch, trainer.batch = int(ck["step"]), int(ck["epoch"]), int(ck["batch"])
    n = len(trainer.data.train)
    if ck.get("num_train") is not None and int(ck["num_train"]) != n:
        trainer.say(f"warning: {ck['path']} was written for {ck['num_train']} training samples, --data has {n} now: "
                    "the resumed run's data order differs from the original run's")
    if trainer.batch >= EpochBatches.batches_per_epoch(n, trainer.cfg.batch_size):
        # past the end of a (now shorter) epoch: an empty epoch would never advance the loop; start the next one
        trainer.epoch, trainer.batch = trainer.epoch + 1, 0
    trainer.log.drop_after(trainer.step)
    trainer.corrupt.restore(ck.get("corrupt", []))
    if not trainer.ckpts.restore_rng(ck, trainer.say):
        seed_everything(resume_seed(trainer.cfg.seed, trainer.info.rank, trainer.step))
    trainer.say(f"resumed from {ck['path']}: step {trainer.step}, epoch {trainer.epoch}, batch {trainer.batch}")


def require_fresh_or_resume(run_dir: Path, resume: bool) -> None:
    """Refuse to silently mix a new run into a run directory that has checkpoints."""
    mgr = CheckpointManager(run_dir / "checkpoints")
    if mgr.latest() is not None and not resume:
        raise HMARError(f"{run_dir} already has checkpoints ({mgr.latest().name}): pass --resume to continue "
                        "that run, or choose another --out")
