"""`hmar generate`: N images per class, identical files whatever the number of processes."""
import hashlib
import json

import pytest
import torch

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.cli import main


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_generate_is_rank_count_independent(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(build_model(model_config("hmar-tiny")).state_dict(), tmp_path / "m.pth")
    torch.save(VQVAE(tokenizer_config("vqvae-tiny")).state_dict(), tmp_path / "v.pth")
    common = ["generate", "-c", str(tmp_path / "m.pth"), "--vqvae", str(tmp_path / "v.pth"), "--per-class", "3",
              "--classes", "3", "--batch-size", "2", "--device", "cpu", "--seed", "5"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(common + ["--out", str(tmp_path / "two")]) == 0
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(one) == 9 and one == two
    # images differ between classes and between images of a class
    assert len(set(one.values())) == 9


@pytest.mark.xdist_group("torchrun")   # one torchrun launch at a time (tests/test_training_ddp.py)
def test_generate_under_torchrun_matches_one_process(tmp_path):
    """Real `torchrun --nproc_per_node 2` (CPU): the two ranks share the chunks and write the files of a
    1-process run, byte for byte."""
    import os
    import socket
    import subprocess
    import sys
    torch.manual_seed(1)
    torch.save(build_model(model_config("hmar-tiny")).state_dict(), tmp_path / "m.pth")
    torch.save(VQVAE(tokenizer_config("vqvae-tiny")).state_dict(), tmp_path / "v.pth")
    common = ["-m", "hmar", "generate", "-c", str(tmp_path / "m.pth"), "--vqvae", str(tmp_path / "v.pth"),
              "--per-class", "3", "--classes", "2", "--batch-size", "2", "--device", "cpu", "--seed", "11"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    two = subprocess.Popen([*torchrun, *common, "--out", str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=120)
    out2, _ = two.communicate(timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, out2[-3000:]
    # chunks (class 0: 2 + 1 images, class 1: 2 + 1) dealt round-robin: rank 0 gets both 2-image chunks
    assert "rank 0/2: wrote 4 images" in out2 and "rank 1/2: wrote 2 images" in out2, out2[-3000:]
    d1, d2 = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(d1) == 6 and d1 == d2


@pytest.mark.parametrize("flag", ["--per-class", "--classes", "--batch-size"])
def test_generate_refuses_counts_below_one_before_writing(tmp_path, capsys, monkeypatch, flag):
    """--per-class 0 was refused as 'num_classes, per_class and batch_size must be positive' after loading the
    model and creating --out."""
    from hmar import HMARPipeline
    loads = []
    monkeypatch.setattr(HMARPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(1)))
    rc = main(["generate", "-c", str(tmp_path / "model"), "--device", "cpu", "--out", str(tmp_path / "o"), flag, "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {flag} must be >= 1, got 0"]
    assert not loads and not (tmp_path / "o").exists()


def test_generate_resume_refuses_other_settings_and_images_beyond_the_plan(tmp_path, capsys):
    """A rerun into the same --out with another --cfg (or model, seed, batch size) kept the old images and added new
    ones, and a smaller --per-class left the old extra images: `hmar eval` then scored a mix. Now generate.json
    records what the images depend on, and a resume must match it (or --overwrite everything)."""
    torch.manual_seed(0)
    torch.save(build_model(model_config("hmar-tiny")).state_dict(), tmp_path / "m.pth")
    torch.save(build_model(model_config("hmar-tiny")).state_dict(), tmp_path / "m2.pth")   # other weights
    torch.save(VQVAE(tokenizer_config("vqvae-tiny")).state_dict(), tmp_path / "v.pth")
    out = tmp_path / "s"
    run = lambda *extra, m="m.pth": main(["generate", "-c", str(tmp_path / m), "--vqvae", str(tmp_path / "v.pth"),  # noqa: E731
                                          "--per-class", "2", "--classes", "2", "--batch-size", "2", "--device",
                                          "cpu", "--seed", "5", "--out", str(out), *extra])
    assert run() == 0
    first = _digest(out)
    assert len(first) == 4 and (out / "generate.json").is_file()
    capsys.readouterr()
    assert run() == 0 and "wrote 0 images" in capsys.readouterr().out            # same settings: a plain resume
    for extra, m, needle in ((["--cfg", "3"], "m.pth", "sampling"), ([], "m2.pth", "model"),
                             (["--seed", "6"], "m.pth", "seed")):   # the last --seed wins in argparse
        rc = run(*extra, m=m)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "made with other settings" in err[-1] and needle in err[-1], err
        assert _digest(out) == first                                                 # nothing written
    assert run("--per-class", "3") == 0 and len(_digest(out)) == 6                   # more images: a resume
    assert {k: v for k, v in _digest(out).items() if k in first} == first
    rc = run("--per-class", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "images outside this run's 2 classes x 1" in err[-1], err
    capsys.readouterr()
    assert run("--cfg", "3", "--overwrite", "--per-class", "3") == 0                 # --overwrite: all regenerated
    assert "wrote 6 images" in capsys.readouterr().out
    assert json.loads((out / "generate.json").read_text())["sampling"]["cfg"] == 3.0
    assert run("--cfg", "3", "--per-class", "3") == 0                                # and it resumes under cfg 3
