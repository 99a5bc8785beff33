"""Checkpoints are portable across world sizes and wrappers: a checkpoint written by 2 gloo processes (DDP or
FSDP2) resumes in 1 process and one written by 1 process resumes in 2 (DDP or FSDP2), and the resumed run
follows the loss curve of an uninterrupted run.

What is identical and what is not (fp32, CPU, ``--workers 0``):

* the checkpoint itself: the same keys, shapes and dtypes whoever wrote it (full, unsharded tensors keyed by
  parameter name), and loading it under another world size or wrapper, then reading the states back, gives
  the stored tensors bit for bit (tested both ways, for FSDP including sharding and re-gathering);
* data order, crops and masks: keyed by ``(seed, epoch, image index)``, so the same global batches follow;
* the loss curve after a resume and the final weights: equal to the uninterrupted run up to float rounding
  (rel. 1e-5 here, observed ~1e-7): the mean gradient over the global batch is summed in a different order
  with 1 and 2 processes, exactly as between two uninterrupted runs with 1 and 2 processes
  (tests/test_training_ddp.py);
* class dropout and drop path are OFF for these curve comparisons: they draw from per-rank RNG streams,
  which cannot carry over when the number of ranks changes (the samples move between ranks). The rule then
  is to re-seed every rank from ``(seed, rank, step)`` (``checkpointing.resume_seed``): a resumed run is
  reproducible (tested: two resumes give bit-identical weights) but matches the uninterrupted one only in
  distribution. With the same world size the per-rank states are restored and resuming is bit-identical
  (tests/test_training_resume.py).

``HMAR_WORLD_TEST_DEVICE=cuda`` runs the same tests on 2 GPUs over NCCL (still fp32); CUDA's atomics make
training itself non-deterministic there, so two resumes are compared to a tolerance instead of bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
from hmar.training.tokenize import tokenize_folder

DEVICE = os.environ.get("HMAR_WORLD_TEST_DEVICE", "cpu")
STEPS, AT = 8, 4          # 8 optimiser steps; resume from the checkpoint of step 4 (3 batches per epoch)
CKPT = f"step_{AT:08d}.pt"

# torchrun launches (2 gloo ranks each) run one at a time on one pytest-xdist worker (`make test` uses
# --dist loadgroup): two at once would put 4 ranks on the 2 cores, beside the other worker's tests. One worker
# also makes this module's reference runs (the `runs` fixture, shared by its tests) once, not once per worker.
pytestmark = pytest.mark.xdist_group("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Builds (once per module) the data and, on demand, uninterrupted reference runs by name."""
    root = tmp_path_factory.mktemp("world")
    make_shapes_folder(root / "d", 3, 8, 64, val_per_class=2)
    tok = make_random_tokenizer(root / "tok")
    cache = tokenize_folder(root / "d", tok, root / "c.safetensors", views=2, progress=False, say=lambda m: None)
    return Runs(root, tok, cache)


class Runs:
    def __init__(self, root: Path, tok: Path, cache: Path):
        self.root, self.done = root, {}
        self.common = ["train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data", str(cache),
                       "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "2e-3", "--no-progress",
                       "--sample-every", "-1", "--log-every", "1", "--seed", "3", "--precision", "fp32",
                       "--eval-every", "4", "--ckpt-every", str(AT), "--keep-last", "5", "--workers", "0",
                       "--device", DEVICE]
        self.exact = ["--class-dropout", "0", "--drop-path", "0"]
        self.env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                        NVSHMEM_DISABLE_NVLS="1")

    def launch(self, out: str, nproc: int, *extra: str) -> subprocess.Popen:
        launcher = [sys.executable]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        return subprocess.Popen([*launcher, "-m", "hmar", *self.common, "--out", str(self.root / out), *extra],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def finish(p: subprocess.Popen) -> str:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:   # torchrun's summary ends stderr: show the ranks' own messages too
            lines = [l for l in err.splitlines() if not l.startswith(("[rank", "I1", "W1")) or "rror" in l]
            raise AssertionError("\n".join(lines)[-12000:])
        return err

    def reference(self, *specs) -> None:
        """Uninterrupted runs ``(name, nproc, *flags)`` not made yet, two at a time."""
        todo = [s for s in specs if s[0] not in self.done]
        procs = [(s[0], self.launch(s[0], s[1], *s[2:])) for s in todo]
        for name, p in procs:
            self.done[name] = self.finish(p)

    def resume(self, src: str, dst: str, nproc: int, *extra: str) -> subprocess.Popen:
        """A fresh run directory holding only ``src``'s step-4 checkpoint, resumed with ``nproc`` processes."""
        d = self.root / dst / "checkpoints"
        d.mkdir(parents=True)
        shutil.copy(self.root / src / "checkpoints" / CKPT, d / CKPT)
        return self.launch(dst, nproc, "--resume", *extra)

    def train_losses(self, name: str) -> Dict[int, float]:
        recs = [json.loads(l) for l in (self.root / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}

    def val_losses(self, name: str) -> List[float]:
        recs = [json.loads(l) for l in (self.root / name / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in recs if r["kind"] == "val" and r["step"] == STEPS]

    def weights(self, name: str) -> Dict[str, torch.Tensor]:
        return load_file(str(self.root / name / "model" / "model.safetensors"))

    def ckpt(self, name: str, step: int = AT) -> dict:
        return torch.load(str(self.root / name / "checkpoints" / f"step_{step:08d}.pt"), weights_only=True)


ONE = ("one", 1, "--class-dropout", "0", "--drop-path", "0")
DDP = ("ddp", 2, "--class-dropout", "0", "--drop-path", "0")
FSDP = ("fsdp", 2, "--class-dropout", "0", "--drop-path", "0", "--fsdp")


def _flat(states: dict) -> Dict[str, torch.Tensor]:
    """``{path: tensor}`` of the model and optimiser states (non-tensor leaves as 0-d tensors when numeric)."""
    out: Dict[str, object] = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = x
    walk("", states)
    return out


def _same_layout(a: dict, b: dict) -> None:
    fa, fb = _flat(a["states"]), _flat(b["states"])
    assert fa.keys() == fb.keys()
    for k in fa:
        assert type(fa[k]) is type(fb[k]), k
        if isinstance(fa[k], torch.Tensor):
            assert type(fb[k]) is torch.Tensor and fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype, k
            assert fa[k].device.type == "cpu"
            assert torch.allclose(fa[k], fb[k], rtol=1e-4, atol=1e-6), k
        else:
            assert fa[k] == fb[k], k


def _bit_identical(a: dict, b: dict) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    bad = [k for k in fa if (not torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] != fb[k])]
    assert not bad, bad[:5]


def _follows(runs: Runs, resumed: str, ref: str = "one") -> None:
    """``resumed`` trained steps AT+1..STEPS along ``ref``'s curve and ended with ``ref``'s weights."""
    lr, la = runs.train_losses(resumed), runs.train_losses(ref)
    assert sorted(lr) == list(range(AT + 1, STEPS + 1))
    assert la[STEPS] < la[1] - 0.1                                      # the reference learns
    assert [lr[s] for s in sorted(lr)] == pytest.approx([la[s] for s in sorted(lr)], rel=1e-5, abs=1e-6)
    assert runs.val_losses(resumed) == pytest.approx(runs.val_losses(ref), rel=1e-5)
    wr, wa = runs.weights(resumed), runs.weights(ref)
    assert wr.keys() == wa.keys()
    for k in wa:
        assert torch.allclose(wr[k], wa[k], rtol=1e-4, atol=1e-6), k


def _readback(runs: Runs, src: str, dst: str, nproc: int, *extra: str) -> subprocess.Popen:
    """Resume ``src``'s step-4 checkpoint with ``nproc`` processes and ``--max-steps 4``: no step is taken and
    the states are written back (gathered again) to ``dst``'s step-4 checkpoint."""
    return runs.resume(src, dst, nproc, *runs.exact, "--max-steps", str(AT), *extra)


def _read_back_exactly(runs: Runs, src: str, dst: str) -> None:
    a, b = runs.ckpt(src), runs.ckpt(dst)
    assert b["world"] != a["world"]
    _bit_identical(a["states"], b["states"])


def test_ddp_two_to_one(runs):
    runs.reference(ONE, DDP)
    a, b = runs.ckpt("one"), runs.ckpt("ddp")
    assert (a["world"], len(a["rng"]), b["world"], len(b["rng"])) == (1, 1, 2, 2)
    _same_layout(b, a)                                # the 2-process file has the 1-process layout
    cont, back = runs.resume("ddp", "ddp_to_1", 1, *runs.exact), _readback(runs, "ddp", "ddp_back_1", 1)
    err = runs.finish(cont)
    runs.finish(back)
    assert "written by 2 processes, now 1" in err and "resumed from" in err
    _follows(runs, "ddp_to_1")
    _follows(runs, "ddp_to_1", "ddp")
    _read_back_exactly(runs, "ddp", "ddp_back_1")


def test_ddp_one_to_two(runs):
    runs.reference(ONE)
    err = runs.finish(runs.resume("one", "one_to_ddp", 2, *runs.exact))
    assert "written by 1 processes, now 2" in err
    _follows(runs, "one_to_ddp")


def test_fsdp_two_to_one(runs):
    runs.reference(ONE, FSDP)
    _same_layout(runs.ckpt("fsdp"), runs.ckpt("one"))   # gathered: no DTensor, no shards, same names
    cont, back = runs.resume("fsdp", "fsdp_to_1", 1, *runs.exact), _readback(runs, "fsdp", "fsdp_back_1", 1)
    runs.finish(cont)
    runs.finish(back)
    _follows(runs, "fsdp_to_1")
    _follows(runs, "fsdp_to_1", "fsdp")
    _read_back_exactly(runs, "fsdp", "fsdp_back_1")


def test_fsdp_one_to_two(runs):
    runs.reference(ONE)
    runs.finish(runs.resume("one", "one_to_fsdp", 2, *runs.exact, "--fsdp"))
    _follows(runs, "one_to_fsdp")
    runs.finish(_readback(runs, "one", "one_back_fsdp", 2, "--fsdp"))   # sharded over 2 ranks, gathered again
    _read_back_exactly(runs, "one", "one_back_fsdp")


def test_reseeding_rule_and_batch_check(runs):
    """Class dropout ON: a 2-process checkpoint resumed twice in 1 process gives bit-identical weights
    (re-seeded from (seed, rank, step)); resuming with another global batch size is refused."""
    runs.reference(("drop", 2))                        # hmar-tiny's default class dropout
    a, b = runs.resume("drop", "drop_a", 1), runs.resume("drop", "drop_b", 1)
    err = runs.finish(a)
    runs.finish(b)
    assert "re-seeded" in err
    wa, wb = runs.weights("drop_a"), runs.weights("drop_b")
    if DEVICE == "cpu":
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    else:
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
    bad = runs.resume("drop", "drop_bs", 1, "--batch-size", "4")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "--batch-size 8" in err and "GLOBAL" in err, err[-2000:]
