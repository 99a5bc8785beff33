"""`hmar generate`: N images per class, identical files whatever the number of processes."""
import hashlib

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
