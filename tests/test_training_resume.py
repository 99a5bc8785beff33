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


def _prepare(tmp_path):
    """A random tokenizer, a token cache of 30 shape images, and the environment of the training processes."""
    make_shapes_folder(tmp_path / "d", 3, 10, 64)
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tokenize_folder(tmp_path / "d", tok, tmp_path / "c.safetensors", views=2, progress=False,
                            say=lambda m: None)
    return tok, cache, dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    tok, cache, env = _prepare(tmp_path)
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


def _wait_for_step(metrics, step: int, proc, limit: float = 120) -> None:
    t0 = time.time()
    while True:
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert time.time() - t0 < limit
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.01)


def test_ctrl_c_saves_the_current_step_and_resume_continues_exactly(tmp_path):
    """Ctrl-C to the whole process group (trainer and data workers) mid-run, with no periodic checkpoint due:
    the run finishes its step, writes that step's checkpoint, exits 130 with a one-line note, and --resume
    ends bit-identical to an uninterrupted run; metrics.jsonl holds each step once."""
    tok, cache, env = _prepare(tmp_path)
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    extra = ("--ckpt-every", "1000", "--workers", "1", "--log-every", "1")
    a = subprocess.Popen(_cmd(tok, cache, a_dir) + list(extra), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(_cmd(tok, cache, b_dir) + list(extra), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_step(b_dir / "metrics.jsonl", 5, b)
    os.killpg(b.pid, signal.SIGINT)
    _, err = b.communicate(timeout=120)
    assert b.returncode == 130, err[-2000:]
    note = [l for l in err.splitlines() if "stopped by SIGINT after step" in l]
    assert len(note) == 1 and "--resume" in note[0], err[-2000:]
    step = int(note[0].split("after step ")[1].split(";")[0])
    assert 5 <= step < 60
    assert [p.name for p in (b_dir / "checkpoints").glob("*.pt")] == [f"step_{step:08d}.pt"]
    assert not (b_dir / "model").exists()
    c = subprocess.run(_cmd(tok, cache, b_dir, "--resume") + list(extra), env=env, capture_output=True, text=True)
    assert c.returncode == 0, c.stderr[-2000:]
    assert f"step {step}," in c.stderr
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    wa = load_file(str(a_dir / "model" / "model.safetensors"))
    wb = load_file(str(b_dir / "model" / "model.safetensors"))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    import json
    train_steps = [json.loads(l)["step"] for l in (b_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(l)["kind"] == "train"]
    assert train_steps == list(range(1, 61))


def test_sigterm_stops_tokenizer_training_with_a_checkpoint(tmp_path):
    make_shapes_folder(tmp_path / "d", 2, 8, 32)
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "hmar", "train-tokenizer", "--data", str(tmp_path / "d"), "--preset", "vqvae-tiny",
           "--out", str(out), "--max-steps", "400", "--batch-size", "4", "--no-progress", "--no-tensorboard",
           "--log-every", "1", "--eval-batches", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    log = out / "log.txt"
    while not (log.exists() and "[epoch] step" in log.read_text()):   # in the training loop
        assert p.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    ckpts = list((out / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1 and not (out / "tokenizer").exists()
    r = subprocess.run(cmd[:cmd.index("--max-steps") + 1] + [str(int(ckpts[0].stem[5:]) + 2)] +
                       cmd[cmd.index("--max-steps") + 2:] + ["--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "tokenizer" / "tokenizer.safetensors").exists()


def test_resume_from_a_checkpoint_inside_a_log_window_logs_the_same_loss(tmp_path):
    """A checkpoint at step 5 of a 10-step log window: the resumed run's mean loss at step 10 is the mean of steps
    1..10 (the window's first half comes back from the checkpoint), equal to the uninterrupted run's."""
    import json
    import shutil
    tok, cache, env = _prepare(tmp_path)
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    cmd = [sys.executable, "-m", "hmar", "train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data",
           str(cache), "--out", str(a_dir), "--max-steps", "20", "--ckpt-every", "5", "--batch-size", "8",
           "--lr", "1e-3", "--no-progress", "--sample-every", "-1", "--log-every", "10", "--seed", "7",
           "--keep-last", "10"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(a_dir, b_dir)
    shutil.rmtree(b_dir / "model")
    for p in (b_dir / "checkpoints").glob("step_*.pt"):
        if p.name != "step_00000005.pt":
            p.unlink()
    r = subprocess.run(cmd[:cmd.index("--out") + 1] + [str(b_dir)] + cmd[cmd.index("--out") + 2:] + ["--resume"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 5," in r.stderr

    def losses(run):
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    la, lb = losses(a_dir), losses(b_dir)
    assert sorted(la) == sorted(lb) == [10, 20]
    assert lb == la, (la, lb)
    ck = torch.load(a_dir / "checkpoints" / "step_00000005.pt", map_location="cpu", weights_only=False)
    (total, n), = ck["log_window"]
    assert n == 5 and total > 0


def _finished_run(tmp_path, capsys, val=True):
    """A 4-step run (2 epochs of 2 batches) from a token cache of 8 images, with a val split, a sample grid at
    the end and a checkpoint per epoch; returns the CLI arguments that made it (in-process, one torch thread)."""
    from hmar.cli import main
    make_shapes_folder(tmp_path / "d", 2, 4, 64, val_per_class=2 if val else 0)
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tokenize_folder(tmp_path / "d", tok, tmp_path / "c.safetensors", views=1, progress=False,
                            say=lambda m: None)
    argv = ["train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data", str(cache), "--out",
            str(tmp_path / "run"), "--epochs", "2", "--batch-size", "4", "--no-progress", "--no-tensorboard",
            "--log-every", "1", "--sample-classes", "1", "--sample-per-class", "1", "--eval-batches", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    return argv


def _snapshot(run):
    """Every file of a run directory (but log.txt) with its bytes and modification time."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "log.txt"}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_of_a_finished_run_is_a_no_op(tmp_path, capsys, one_thread):
    """--resume after the last step (final model written): no second evaluation of the same step in
    metrics.jsonl, no rewritten checkpoint, model or sample grid; one note, and the model directory back."""
    from hmar.cli import main
    from hmar.training.config import TrainConfig, build_config
    from hmar.training.loop import Trainer
    argv = _finished_run(tmp_path, capsys)
    run = tmp_path / "run"
    before = _snapshot(run)
    assert "samples/final_step_00000004.png" in before and "checkpoints/step_00000004.pt" in before
    assert main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "run already finished at step 4: nothing to do" in err, err
    assert _snapshot(run) == before
    cfg = build_config(TrainConfig, data=argv[argv.index("--data") + 1], tokenizer=argv[argv.index("--tokenizer") + 1],
                       out=str(run), epochs=2, batch_size=4, progress=False, tensorboard=False, resume=True)
    assert Trainer(cfg).run() == run / "model"
    assert _snapshot(run) == before


def test_resume_below_the_checkpoint_step_is_an_error(tmp_path, capsys, one_thread):
    """A checkpoint at step 4 resumed with --max-steps 3 (or --epochs 1: 2 steps) used to end quietly at step 4."""
    from hmar.cli import main
    argv = _finished_run(tmp_path, capsys, val=False)
    run = tmp_path / "run"
    before = _snapshot(run)
    assert main(argv + ["--resume", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the checkpoint is at step 4; --max-steps 3 is below it" in err and "--max-steps >= 4" in err, err
    epochs = argv.index("--epochs") + 1
    assert main(argv[:epochs] + ["1"] + argv[epochs + 1:] + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the checkpoint is at step 4; --epochs 1 gives only 2 steps" in err, err
    assert _snapshot(run) == before
    assert main(argv + ["--resume", "--max-steps", "5"]) == 0     # a longer run goes on from the checkpoint
    assert "resumed from" in capsys.readouterr().err and (run / "checkpoints" / "step_00000005.pt").exists()


def test_resume_with_another_model_or_tokenizer_is_an_error(tmp_path, capsys, one_thread):
    """``--resume`` with ``--model var-tiny`` after an ``hmar-tiny`` (stage-1: nsp) run, or with another tokenizer (other
    codebook: other teacher-forcing inputs), went on silently from the checkpoint; each is one error, nothing
    written."""
    from hmar.cli import main
    make_shapes_folder(tmp_path / "d", 2, 4, 64, val_per_class=0)
    tok, tok2 = make_random_tokenizer(tmp_path / "tok"), make_random_tokenizer(tmp_path / "tok2", seed=1)
    argv = ["train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data", str(tmp_path / "d"), "--out",
            str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-tensorboard",
            "--sample-every", "-1", "--eval-batches", "0"]
    assert main(argv) == 0
    run = tmp_path / "run"
    before = _snapshot(run)
    capsys.readouterr()
    more = ["--resume", "--max-steps", "3"]
    import json
    import shutil
    shutil.copytree(tmp_path / "d", tmp_path / "d2")   # the same images, the class order swapped by classes.json
    names = sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_dir())
    (tmp_path / "d2" / "classes.json").write_text(json.dumps(names[::-1]))
    for swap, needle in ((("--model", "var-tiny"), "another model (kind 'nsp' -> 'var')"),
                         (("--tokenizer", str(tok2)), "another tokenizer"),
                         (("--data", str(tmp_path / "d2")), f"other classes: its class 0 is {names[0]!r}")):
        bad = list(argv)
        bad[bad.index(swap[0]) + 1] = swap[1]
        assert main(bad + more) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert needle in err and "new --out" in err, err
        assert _snapshot(run) == before
    assert main(argv + more) == 0 and (run / "checkpoints" / "step_00000003.pt").exists()


def test_resume_of_a_finished_tokenizer_run_is_a_no_op(tmp_path, capsys, one_thread):
    from hmar.cli import main
    from hmar.training.synthetic import SMALL_TOKENIZER
    make_shapes_folder(tmp_path / "d", 2, 2, 32)
    run = tmp_path / "tok"
    argv = ["train-tokenizer", "--data", str(tmp_path / "d"), "--out", str(run), "--max-steps", "2",
            "--batch-size", "2", "--no-progress", "--no-tensorboard", "--eval-batches", "1", "--tokenizer-override",
            *[f"{k}={v}" for k, v in SMALL_TOKENIZER.items()]]
    assert main(argv) == 0
    before = _snapshot(run)
    assert "tokenizer/tokenizer.safetensors" in before and "checkpoints/step_00000002.pt" in before
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert "run already finished at step 2: nothing to do" in capsys.readouterr().err
    assert _snapshot(run) == before
    assert main(argv + ["--resume", "--max-steps", "1"]) == 2
    assert "the checkpoint is at step 2; --max-steps 1 is below it" in capsys.readouterr().err


def test_resumed_tokenizer_run_is_bit_identical_and_logs_the_same_epochs(tmp_path, capsys, one_thread):
    """GAN, dead-code re-initialisation and hflip on; a checkpoint at step 3, inside the second epoch (2 batches per
    epoch): the resumed run's tokenizer equals the uninterrupted one's, and so does its epoch report at step 4 (its
    window's step 3 used to be lost: loss, l1, ... and reinit_codes of step 4 alone)."""
    import json
    import shutil
    from hmar.cli import main
    from hmar.training.synthetic import SMALL_TOKENIZER
    make_shapes_folder(tmp_path / "d", 2, 2, 32)

    def argv(run):
        return ["train-tokenizer", "--data", str(tmp_path / "d"), "--out", str(run), "--max-steps", "5",
                "--ckpt-every", "3", "--batch-size", "2", "--no-progress", "--no-tensorboard", "--eval-batches", "1",
                "--hflip", "--dead-code-steps", "1", "--disc", "--disc-start", "2", "--disc-channels", "8",
                "--disc-layers", "2", "--tokenizer-override", *[f"{k}={v}" for k, v in SMALL_TOKENIZER.items()]]
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(argv(a)) == 0 and main(argv(b)) == 0
    shutil.rmtree(b / "tokenizer")
    (b / "checkpoints" / "step_00000005.pt").unlink()
    capsys.readouterr()
    assert main(argv(b) + ["--resume"]) == 0
    assert "step 3, epoch 1, batch 1" in capsys.readouterr().err
    wa, wb = (load_file(str(r / "tokenizer" / "tokenizer.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def epochs(run):
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k not in ("time", "img_s")} for r in recs
                if r["kind"] == "epoch"}
    ea, eb = epochs(a), epochs(b)
    assert sorted(ea) == sorted(eb) == [2, 4, 5]
    assert eb == ea, (ea[4], eb[4])
    assert ea[4]["reinit_codes"] > 0 and "d_loss" in ea[4]
