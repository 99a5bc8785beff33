"""Kill a training process with SIGKILL after it wrote a checkpoint, resume it, and get bit-identical
final weights to an uninterrupted run (CPU, fp32, num_workers=0; class dropout and drop path ON, so the
RNG states must be restored too)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
from hmar.training.tokenize import tokenize_folder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def _cmd(tok, cache, out, *extra):
    return [sys.executable, "-m", "hmar", "train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data",
            str(cache), "--out", str(out), "--max-steps", "60", "--ckpt-every", "10", "--batch-size", "8",
            "--lr", "1e-3", "--no-progress", "--sample-every", "-1", "--log-every", "10", "--seed", "7",
            "--keep-last", "2", *extra]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    make_shapes_folder(tmp_path / "d", 3, 10, 64)
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tokenize_folder(tmp_path / "d", tok, tmp_path / "c.safetensors", views=2, progress=False,
                            say=lambda m: None)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a = subprocess.Popen(_cmd(tok, cache, a_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(_cmd(tok, cache, b_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = b_dir / "checkpoints" / "step_00000010.pt"
    t0 = time.time()
    while not first.exists():
        assert b.poll() is None, "the run ended before writing its first checkpoint"
        assert time.time() - t0 < 120
        time.sleep(0.002)
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL
    assert not (b_dir / "model").exists(), "killed too late: the run had already finished"
    # without --resume the run directory is protected
    r = subprocess.run(_cmd(tok, cache, b_dir), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr
    c = subprocess.run(_cmd(tok, cache, b_dir, "--resume"), env=env, capture_output=True, text=True)
    assert c.returncode == 0, c.stderr[-2000:]
    resumed = [l for l in c.stderr.splitlines() if "resumed from" in l]
    assert len(resumed) == 1 and ("step 10," in resumed[0] or "step 20," in resumed[0]), c.stderr[-2000:]
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    wa = load_file(str(a_dir / "model" / "model.safetensors"))
    wb = load_file(str(b_dir / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 20
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    # the runs really trained, and only the last 2 checkpoints were kept
    w0 = load_file(str(a_dir / "model" / "model.safetensors"))["head.weight"]
    assert float(w0.abs().sum()) > 0
    assert sorted(p.name for p in (b_dir / "checkpoints").glob("step_*.pt")) == ["step_00000050.pt", "step_00000060.pt"]
    import json
    recs = [json.loads(l) for l in (a_dir / "metrics.jsonl").read_text().splitlines()]
    losses_a = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses_a) == 6 and losses_a[-1] < losses_a[0]
