"""End to end on a synthetic image folder (3 classes of coloured shapes at 64 px, one corrupt file):
train-tokenizer -> tokenize -> stage 1 (next-scale) -> stage 2 (masked) -> `hmar sample`, plus VAR trained
straight from the image folder. Every stage must lower its loss; the corrupt file gives one warning and
training goes on. Runs with one torch thread: on a shared 2-core machine that is much faster than two."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hmar.cli import main
from hmar.training.synthetic import SMALL_TOKENIZER, make_shapes_folder

TOK_OVERRIDES = [f"{k}={v}" for k, v in SMALL_TOKENIZER.items()]


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", 3, 30, 64, val_per_class=3)
    (root / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_tokenizer_stage1_stage2_sample(shapes, tmp_path):
    tok_run, s1, s2 = tmp_path / "tok", tmp_path / "s1", tmp_path / "s2"
    # ---------------------------------------------------------------- tokenizer
    rc = main(["train-tokenizer", "--data", str(shapes), "--out", str(tok_run), "--epochs", "3", "--batch-size", "16",
               "--lr", "2e-3", "--dead-code-steps", "10", "--eval-batches", "1", "--disc", "--disc-start", "12",
               "--disc-channels", "8", "--no-progress", "--tokenizer-override", *TOK_OVERRIDES])
    assert rc == 0
    ep = _records(tok_run, "epoch")
    assert len(ep) == 3
    assert ep[-1]["l1"] < ep[0]["l1"] and ep[-1]["l2"] < ep[0]["l2"]   # ("loss" includes the GAN term later)
    assert ep[-1]["val_psnr"] > ep[0]["val_psnr"]
    assert "d_loss" in ep[-1] and "g_loss" in ep[-1] and "d_loss" not in ep[0]   # GAN after its start step
    assert len(ep[-1]["usage_pct"]) == 4 and all(0 < u <= 100 for u in ep[-1]["usage_pct"])
    assert ep[-1]["corrupt_files"] == 1
    log = (tok_run / "log.txt").read_text()
    assert log.count("skipping unreadable image") == 1 and "broken.png" in log
    assert (tok_run / "tokenizer" / "tokenizer.safetensors").exists()
    assert list((tok_run / "samples").glob("recon_epoch_*.png"))

    # ---------------------------------------------------------------- stage 1 (from a token cache)
    cache = tmp_path / "shapes.safetensors"
    assert main(["tokenize", "--data", str(shapes), "--tokenizer", str(tok_run), "--out", str(cache), "--views", "2",
                 "--no-progress"]) == 0
    rc = main(["train", "--model", "hmar-tiny", "--tokenizer", str(tok_run), "--data", str(cache), "--out", str(s1),
               "--epochs", "5", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "3", "--log-every", "6",
               "--no-progress"])
    assert rc == 0
    val = _records(s1, "val")
    tr = _records(s1, "train")
    assert len(val) == 5 and val[-1]["val_loss"] < val[0]["val_loss"] - 0.2
    assert tr[-1]["loss"] < tr[0]["loss"]
    assert len(val[-1]["val_loss_per_scale"]) == 4 and val[-1]["val_acc"] > val[0]["val_acc"]
    cfg1 = json.loads((s1 / "model" / "config.json").read_text())
    assert cfg1["model"]["kind"] == "nsp" and cfg1["model"]["class_names"] == ["circle", "cross", "ring"]
    assert cfg1["model"]["num_classes"] == 3 and cfg1["training"]["loss_weight"] == "gaussian"
    assert list((s1 / "samples").glob("final_step_*.png"))

    # ---------------------------------------------------------------- stage 2 (masked branch)
    rc = main(["train", "--stage", "masked", "--init", str(s1), "--data", str(cache), "--out", str(s2),
               "--epochs", "3", "--batch-size", "16", "--lr", "3e-3", "--log-every", "6", "--no-progress",
               "--sample-every", "-1"])
    assert rc == 0
    val2 = _records(s2, "val")
    assert val2[-1]["val_loss"] < val2[0]["val_loss"] and val2[0]["val_loss_per_scale"][0] == 0  # scale 0 unmasked
    cfg2 = json.loads((s2 / "model" / "config.json").read_text())
    assert cfg2["model"]["kind"] == "hmar" and cfg2["model"]["branch_depth"] == 2
    w1 = load_file(str(s1 / "model" / "model.safetensors"))
    w2 = load_file(str(s2 / "model" / "model.safetensors"))
    # frozen: the trunk and the next-scale branch are stage 1's blocks; trained: the masked branch
    assert torch.equal(w2["base_blocks.0.attn.mat_qkv.weight"], w1["blocks.0.attn.mat_qkv.weight"])
    assert torch.equal(w2["ns_blocks.1.ffn.fc2.weight"], w1["blocks.3.ffn.fc2.weight"])
    assert torch.equal(w2["ns_head.weight"], w1["head.weight"])
    assert not torch.equal(w2["mask_blocks.1.ffn.fc2.weight"], w1["blocks.3.ffn.fc2.weight"])

    # ---------------------------------------------------------------- sampling uses the result
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(s2 / "model"), "--out", str(grid), "-n", "2", "--no-progress",
                 "--device", "cpu"]) == 0
    from PIL import Image
    assert Image.open(grid).size[0] > 64
    from hmar.pipeline import HMARPipeline
    pipe = HMARPipeline.from_pretrained(s2 / "model")
    assert pipe.class_names == ["circle", "cross", "ring"] and pipe.class_index("ring") == 2


def test_var_baseline_from_the_image_folder(shapes, tmp_path):
    from hmar.training.synthetic import make_random_tokenizer
    tok = make_random_tokenizer(tmp_path / "tok")
    run = tmp_path / "var"
    assert main(["train", "--model", "var-tiny", "--tokenizer", str(tok), "--data", str(shapes), "--out", str(run),
                 "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--log-every", "6", "--no-progress",
                 "--sample-every", "-1"]) == 0
    val = _records(run, "val")
    assert len(val) == 2 and val[-1]["val_loss"] < val[0]["val_loss"] - 0.05
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["model"]["kind"] == "var" and cfg["training"]["loss_weight"] == "uniform"
    log = (run / "log.txt").read_text()
    assert "loss weighting uniform" in log and log.count("skipping unreadable image") == 1
    assert _records(run, "train")[-1]["corrupt_files"] == 1


@pytest.fixture
def step_clock(monkeypatch):
    """TimeBudget's clock advanced 0.05 s per reading (one per step): budgeted runs of a known length, whatever
    the machine's load."""
    import types
    import hmar.training.schedule as sch
    t = [0.0]

    def tick():
        t[0] += 0.05
        return t[0]

    monkeypatch.setattr(sch, "time", types.SimpleNamespace(perf_counter=tick))


def _budget_argv(tok, shapes, run, budget):
    return ["train", "--model", "var-tiny", "--tokenizer", str(tok), "--data", str(shapes), "--out", str(run),
            "--time-budget", str(budget), "--max-steps", "10", "--batch-size", "8", "--lr", "1e-3", "--log-every", "1",
            "--no-progress", "--sample-every", "-1", "--eval-batches", "1", "--no-tensorboard", "--ckpt-every", "5",
            "--keep-last", "20"]


def test_time_budget_sets_the_length_and_the_schedule_starts_once_it_is_known(shapes, tmp_path, step_clock):
    """--time-budget overrides --max-steps (10 here): the run ends when the budget is spent (2 s at 0.05 s a step:
    40 steps). Until the step time is measured the lr is the warm-up start; then warm-up, hold and decay run over
    the fitted length (it used to decay on the --max-steps schedule, then jump back up), to the final lr."""
    from hmar.training.schedule import TimeBudget
    from hmar.training.synthetic import make_random_tokenizer
    run = tmp_path / "run"
    assert main(_budget_argv(make_random_tokenizer(tmp_path / "tok"), shapes, run, 2)) == 0
    lrs = [r["lr"] for r in _records(run, "train")]
    b = TimeBudget(1.0)
    probe = b.skip + b.probe
    assert 38 <= len(lrs) <= 40
    assert lrs[:probe] == pytest.approx([1e-3 * 0.005] * probe)
    top = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-3) and top > probe - 1
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:top], lrs[1:top + 1]))          # up to the peak
    assert all(a >= b - 1e-12 for a, b in zip(lrs[top:], lrs[top + 1:]))           # then down only
    assert lrs[-1] == pytest.approx(1e-4)                                          # --final-lr-ratio 0.1
    assert "steps fitted to --time-budget 2s" in (run / "log.txt").read_text()


def test_a_resumed_time_budget_run_goes_on_with_its_schedule(shapes, tmp_path, step_clock):
    """Resuming a --time-budget run started its schedule over (warm-up start lr, then a new warm-up), and timed
    nothing (its timing start was a step of the first process). Resumed at step 10 of a 2 s run with 1.5 s left,
    it takes the lr of the uninterrupted run at every step."""
    from hmar.training.synthetic import make_random_tokenizer
    run = tmp_path / "run"
    argv = _budget_argv(make_random_tokenizer(tmp_path / "tok"), shapes, run, 2)
    assert main(argv) == 0
    whole = {r["step"]: r["lr"] for r in _records(run, "train")}
    for ck in (run / "checkpoints").glob("step_*.pt"):
        if int(ck.stem.split("_")[1]) > 10:
            ck.unlink()
    at = argv.index("--time-budget") + 1
    assert main(argv[:at] + ["1.5"] + argv[at + 1:] + ["--resume"]) == 0
    resumed = [(r["step"], r["lr"]) for r in _records(run, "train") if r["step"] > 10]   # the log restarts at 10
    assert resumed[0][0] == 11 and len(resumed) >= 25
    assert [lr for _, lr in resumed[:25]] == pytest.approx([whole[s] for s, _ in resumed[:25]])
