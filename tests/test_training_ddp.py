"""Two gloo processes (torchrun, CPU) follow the loss trajectory of one process at the same global batch
(fp32, deterministic data order; class dropout and drop path off, since their random draws are per rank),
with DDP and with FSDP2, each also with its blocks compiled one by one (``--compile-scope blocks``); with ``--fp8``,
DDP and FSDP2 the same."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
from hmar.training.tokenize import tokenize_folder

# torchrun launches (2 gloo ranks each) run one at a time on one pytest-xdist worker (`make test` uses
# --dist loadgroup): two at once would put 4 ranks on the 2 cores, beside the other worker's tests
pytestmark = pytest.mark.xdist_group("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run):
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "val"]


def test_two_processes_match_one(tmp_path):
    make_shapes_folder(tmp_path / "d", 3, 8, 64, val_per_class=2)
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tokenize_folder(tmp_path / "d", tok, tmp_path / "c.safetensors", views=2, progress=False,
                            say=lambda m: None)
    common = ["train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data", str(cache), "--max-steps", "8",
              "--batch-size", "8", "--lr", "2e-3", "--no-progress", "--sample-every", "-1", "--log-every", "1",
              "--class-dropout", "0", "--drop-path", "0", "--seed", "3", "--precision", "fp32", "--eval-every", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]

    def launch(out, launcher, *extra):
        return subprocess.Popen([*launcher, "-m", "hmar", *common, "--out", str(tmp_path / out), *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(p):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]

    one = launch("one", [sys.executable])
    ddp = launch("ddp", [*torchrun, "--master_port", str(_free_port())])
    finish(one)
    finish(ddp)
    finish(launch("fsdp", [*torchrun, "--master_port", str(_free_port())], "--fsdp"))
    blocks = ["--compile", "--compile-backend", "aot_eager", "--compile-scope", "blocks"]   # each block compiled
    finish(launch("ddp-blocks", [*torchrun, "--master_port", str(_free_port())], *blocks))
    finish(launch("fsdp-blocks", [*torchrun, "--master_port", str(_free_port())], "--fsdp", *blocks))
    fp8 = ["--fp8", "--batch-size", "16"]   # 8 x 30 tokens per rank: rows a multiple of 16, as fp8 needs
    finish(launch("one-fp8", [sys.executable], *fp8))
    finish(launch("ddp-fp8", [*torchrun, "--master_port", str(_free_port())], *fp8))
    finish(launch("fsdp-fp8", [*torchrun, "--master_port", str(_free_port())], "--fsdp", *fp8))
    l1, v1 = _losses(tmp_path / "one")
    assert len(l1) == 8 and l1[-1] < l1[0] - 0.1            # it learns
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for name in ("ddp", "fsdp", "ddp-blocks", "fsdp-blocks"):
        l2, v2 = _losses(tmp_path / name)
        assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-6), (name, l1, l2)
        assert [v["val_loss"] for v in v2] == pytest.approx([v["val_loss"] for v in v1], rel=1e-5)
        w2 = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), (name, k)
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text()
    # fp8: DDP and FSDP2 agree (each rank scales its own half of the batch, so one process rounds otherwise and
    # follows within 3 %)
    l8, v8 = _losses(tmp_path / "ddp-fp8")
    lf, vf = _losses(tmp_path / "fsdp-fp8")
    assert lf == pytest.approx(l8, rel=1e-5, abs=1e-6)
    assert [v["val_loss"] for v in vf] == pytest.approx([v["val_loss"] for v in v8], rel=1e-5)
    assert l8 == pytest.approx(_losses(tmp_path / "one-fp8")[0], rel=0.03)
    for name in ("one-fp8", "ddp-fp8", "fsdp-fp8"):
        log = (tmp_path / name / "log.txt").read_text()
        assert "fp8 block GEMMs" in log and "--fp8 needs" not in log, name


def test_sigterm_to_torchrun_stops_every_rank_at_one_checkpoint(tmp_path):
    """SIGTERM to torchrun (what a cluster scheduler sends): it forwards SIGTERM to both ranks, which agree on a
    step (an all-reduce every 10 steps), write one checkpoint there and stop; 1 process resumes from it."""
    import signal
    import time
    make_shapes_folder(tmp_path / "d", 3, 8, 64)
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tokenize_folder(tmp_path / "d", tok, tmp_path / "c.safetensors", views=2, progress=False,
                            say=lambda m: None)
    run = tmp_path / "run"
    args = ["-m", "hmar", "train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data", str(cache),
            "--max-steps", "300", "--batch-size", "8", "--no-progress", "--sample-every", "-1", "--log-every", "1",
            "--ckpt-every", "1000", "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((run / "metrics.jsonl").exists() and '"step": 12,' in (run / "metrics.jsonl").read_text()):
        assert p.poll() is None and time.time() - t0 < 120, "the run ended before it was stopped"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    notes = [l for l in err.splitlines() if l.startswith("stopped by SIGTERM after step")]
    assert len(notes) == 1, err[-3000:]                    # said once (by rank 0), for both ranks
    step = int(notes[0].split("after step ")[1].split(";")[0])
    assert step % 10 == 0 and 12 <= step < 300
    assert [c.name for c in (run / "checkpoints").glob("*.pt")] == [f"step_{step:08d}.pt"]
    r = subprocess.run([sys.executable, *args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"step {step}," in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("joined", [False, True])
def test_a_worker_that_joined_a_group_exits_past_interpreter_shutdown(joined):
    # the hmar executable: a process that joined a process group ends with os._exit (no atexit handlers, no
    # finalisation, where torch's cached device meshes would tear the backend down), with the command's status
    # and its output flushed; any other process exits normally
    code = ("import atexit, sys; import hmar.training.distributed as d; "
            f"d.JOINED_GROUP = {joined}; atexit.register(lambda: print('SHUTDOWN', flush=True)); "
            "sys.argv = ['hmar', 'train', '--model', 'no-such-preset']; from hmar.cli import entry; entry()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error:" in p.stderr, p.stderr
    assert ("SHUTDOWN" in p.stdout) is not joined, p.stdout
