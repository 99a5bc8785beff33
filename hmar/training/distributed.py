"""Process-group set-up and model wrapping (DDP or FSDP2), in one place.

Launch several processes with ``torchrun --nproc_per_node N -m hmar train ...``: NCCL on GPUs, gloo on
the CPU. A single process (no ``WORLD_SIZE``) runs without a process group.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import HMARError

# set once this process has joined a process group: :func:`exit_process` then ends it without interpreter shutdown
JOINED_GROUP = False


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world``, its device, and whether it writes logs/files."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; any other name checked by :func:`hmar.pipeline.check_device` (a
    malformed name or a backend not available here is an error naming ``--device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..pipeline import check_device
    try:
        return check_device(name)
    except HMARError as e:
        raise HMARError(f"--device: {e}") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    global JOINED_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    JOINED_GROUP = True
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank=rank, world=world, local_rank=local, device=dev, initialized=True)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (if this process joined one).

    torch's DTensor caches still hold FSDP2's device mesh, and with it the backend, after this: a script of your own
    should end its workers with :func:`exit_process`, as ``hmar`` does."""
    if info.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End this process with status ``code``. One that joined a process group ends with ``os._exit`` once stdout and
    stderr are flushed: torch's DTensor caches keep FSDP2's device mesh, and so the gloo/NCCL backend, alive into
    interpreter shutdown, where tearing the backend down can abort the process (SIGABRT, "terminate called without
    an active exception") after a run that has written everything, and the launcher then reports it as failed.
    Any other process exits normally (``sys.exit``)."""
    if JOINED_GROUP:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):   # a closed pipe or stream: nothing more to say there
                pass
        os._exit(code)
    sys.exit(code)


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def all_reduce_(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or mean) of ``t`` over the processes; a no-op for one process."""
    if info.initialized:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= info.world
    return t


def all_reduce_max(v: float, info: DistInfo) -> float:
    """The largest ``v`` over the processes (``v`` itself for one process)."""
    if not info.initialized:
        return float(v)
    t = torch.tensor([float(v)], device=info.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_object(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj``, in rank order."""
    if not info.initialized:
        return [obj]
    out: List[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_(t: torch.Tensor, info: DistInfo, src: int = 0) -> torch.Tensor:
    if info.initialized:
        dist.broadcast(t, src)
    return t


def wrap_model(module: nn.Module, info: DistInfo, fsdp: bool = False,
               blocks: Optional[Callable[[], Iterable[nn.Module]]] = None,
               mp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """DDP (``find_unused_parameters=False, broadcast_buffers=False``) or FSDP2 ``fully_shard`` (each of
    ``blocks()`` sharded on its own, then the root). A single process gets the module back unchanged."""
    if not info.initialized:
        return module
    if fsdp:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # pragma: no cover - old torch
            raise HMARError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
        kw = {}
        if mp_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
        import warnings
        # the root returns logits that we never modify in place; FSDP2 warns about views regardless
        warnings.filterwarnings("ignore", message=r".*FSDP2-wrapped module .* returned a view tensor.*")
        for b in (blocks() if blocks else []):
            fully_shard(b, **kw)
        fully_shard(module, **kw)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    import inspect
    ids = [info.device.index] if info.device.type == "cuda" else None
    # buffers are functions of the config (identical on every rank): never re-broadcast them per forward
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})
    return DDP(module, device_ids=ids, find_unused_parameters=False, **sync)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
