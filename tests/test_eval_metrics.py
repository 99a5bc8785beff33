"""Precision/recall on point clouds with known answers, the classifier on a tiny synthetic dataset,
evaluate_folder end to end (with a stand-in extractor), and rank-independent sample generation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from hmar.cli import main
from hmar.errors import HMARError
from hmar.evaluation import evaluate_folder, generate_samples, load_classifier, precision_recall, train_classifier
from hmar.evaluation.generate import chunk_seed, plan_chunks
from hmar.evaluation.prdc import knn_sq_radii


# ----------------------------------------------------------------------------- precision / recall

def test_identical_sets_score_one() -> None:
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    r = precision_recall(x, x.copy(), k=3)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0
    assert r["density"] >= 1.0


def test_far_disjoint_sets_score_zero() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 8))
    fake = rng.normal(size=(150, 8)) + 100.0
    r = precision_recall(real, fake, k=3)
    assert r == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_half_copied_half_far() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 8))
    fake = np.concatenate([real[:100], rng.normal(size=(100, 8)) + 100.0])
    r = precision_recall(real, fake, k=3)
    assert r["precision"] == 0.5  # the copies sit on real points, the rest is far outside every ball
    assert 0.5 <= r["recall"] < 1.0  # copied points are covered; the far half covers none


def test_blocked_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(90, 5)), rng.normal(size=(70, 5)) * 1.2 + 0.3
    small = precision_recall(real, fake, k=3, block=7)
    assert small == pytest.approx(precision_recall(real, fake, k=3, block=4096), abs=1e-12)
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    rad_r, rad_f = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(knn_sq_radii(torch.tensor(real, dtype=torch.float32), 3).numpy(), rad_r, rtol=1e-4)
    assert small["precision"] == pytest.approx((d_fr <= rad_r[None]).any(1).mean(), abs=1e-9)
    assert small["recall"] == pytest.approx((d_fr <= rad_f[:, None]).any(0).mean(), abs=1e-9)
    with pytest.raises(HMARError, match="k=3"):
        precision_recall(real[:3], fake, k=3)


# ----------------------------------------------------------------------------- classifier

def _pattern(cls: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    img = rng.random((size, size, 3)) * 0.3
    if cls == 0:
        img[..., 0] += 0.6  # red
    elif cls == 1:
        img[:, ::4, 1] += 0.7  # green vertical stripes
    else:
        img[::4, :, 2] += 0.7  # blue horizontal stripes
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_split(root: Path, per_class: int, seed: int, folder_name=lambda c: f"{c:02d}_c{c}") -> Path:
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / folder_name(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_pattern(c, rng)).save(root / folder_name(c) / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    _write_split(root / "train", 40, 0)
    _write_split(root / "test", 10, 1)
    (root / "classes.json").write_text(json.dumps(["red", "green stripes", "blue stripes"]))
    return root


@pytest.fixture(scope="module")
def tiny_classifier(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "model.safetensors"
    train_classifier(tiny_data, out, epochs=6, batch_size=16, lr=3e-3, width=8, seed=0)
    return out


def test_classifier_learns_tiny_dataset(tiny_classifier: Path) -> None:
    cfg = json.loads(tiny_classifier.with_suffix(".json").read_text())
    assert cfg["class_names"] == ["red", "green stripes", "blue stripes"] and cfg["image_size"] == 16
    assert cfg["train"]["held_out_accuracy"] >= 0.9
    model = load_classifier(tiny_classifier)
    assert model.name.startswith("classifier-") and model.feature_dim == 32
    x = torch.from_numpy(np.stack([_pattern(c, np.random.default_rng(9)) for c in (0, 1, 2)])).permute(0, 3, 1, 2)
    assert model.predict(x).tolist() == [0, 1, 2]
    assert model(x).shape == (3, 32)


def test_classifier_is_reproducible(tiny_data: Path, tmp_path: Path) -> None:
    a = train_classifier(tiny_data, tmp_path / "a.safetensors", epochs=1, batch_size=32, width=4, seed=3)
    b = train_classifier(tiny_data, tmp_path / "b.safetensors", epochs=1, batch_size=32, width=4, seed=3)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.train["held_out_accuracy"] == b.train["held_out_accuracy"]
    with pytest.raises(HMARError, match="safetensors"):
        train_classifier(tiny_data, tmp_path / "c.pt")
    with pytest.raises(HMARError, match="train-classifier"):
        load_classifier(tmp_path / "missing.safetensors")


def test_train_classifier_skips_an_unreadable_image_with_a_warning(tmp_path: Path) -> None:
    """One truncated file aborted train-classifier with PIL's error; it is skipped with a warning (as the trainers
    skip it), and a folder of nothing readable is one error."""
    root = _write_split(tmp_path / "d", 4, 0)
    (root / "00_c0" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")   # the first file: sets the size
    said: list = []
    cfg = train_classifier(root, tmp_path / "c.safetensors", epochs=1, batch_size=8, width=4, progress=said.append)
    assert cfg.num_classes == 3 and cfg.image_size == 16
    assert sum("skipping unreadable image" in m and "000.png" in m for m in said) == 1
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"not an image")
    with pytest.raises(HMARError, match="none of the 1 images"):
        train_classifier(tmp_path / "bad", tmp_path / "c2.safetensors", image_size=16, epochs=1)


def test_classifier_of_the_wrong_kind_is_a_one_line_error(tiny_classifier: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A classifier whose config and weights do not match, a config with unknown keys, a config that is not JSON
    and weights that are not safetensors ended in tracebacks (RuntimeError, TypeError, JSONDecodeError,
    SafetensorError)."""
    cfg = json.loads(tiny_classifier.with_suffix(".json").read_text())
    cases = {"width": (dict(cfg, width=cfg["width"] * 2), None, "does not hold the weights"),
             "extra": (dict(cfg, foo=1), None, "not a valid classifier config"),
             "notjson": ("garbage", None, "not JSON"),
             "notweights": (cfg, b"junk", "does not hold the weights")}
    samples = _write_split(tmp_path / "s", 2, 7, folder_name=str)
    for name, (config, weights, needle) in cases.items():
        w = tmp_path / f"{name}.safetensors"
        w.write_bytes(weights if weights is not None else tiny_classifier.read_bytes())
        w.with_suffix(".json").write_text(config if isinstance(config, str) else json.dumps(config))
        with pytest.raises(HMARError, match=needle):
            load_classifier(w)
        assert main(["eval", "--samples", str(samples), "--reference", str(samples), "--no-inception",
                     "--classifier", str(w)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "train-classifier" in err[0], err


def test_train_classifier_refuses_bad_options_before_training(tiny_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """--image-size 0 and --lr -1 / nan were tracebacks (PIL, AdamW); --max-minutes -1 trained one step and saved
    it; one class made a classifier under which every sample is correct; a held-out split with a class the training
    split lacks failed only after training."""
    out = tmp_path / "m.safetensors"
    base = ["train-classifier", "--data", str(tiny_data), "--out", str(out), "--width", "4"]
    for extra, needle in ((["--image-size", "0"], "--image-size must be at least 8"),
                          (["--image-size", "-4"], "--image-size must be at least 8"),
                          (["--lr", "-1"], "--lr must be a positive number"),
                          (["--lr", "nan"], "--lr must be a positive number"),
                          (["--max-minutes", "-1"], "--max-minutes must be positive")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and needle in err[0], (extra, err)
    assert not out.exists()
    one = tmp_path / "one"
    shutil.copytree(tiny_data / "train" / "00_c0", one / "0")
    with pytest.raises(HMARError, match="at least 2 class folders"):
        train_classifier(one, out, epochs=1, width=4)
    held = tmp_path / "held"
    shutil.copytree(tiny_data / "train", held / "train")
    shutil.copytree(tiny_data / "test" / "00_c0", held / "test" / "05_other")
    said: list = []
    with pytest.raises(HMARError, match="index 5 .* out of range for 3 classes"):
        train_classifier(held, out, epochs=1, width=4, progress=said.append)
    assert not any(m.startswith("epoch") for m in said) and not out.exists()   # refused before the first epoch
    tiny = tmp_path / "tiny4"
    _write_split(tiny, 3, 0)
    for f in tiny.rglob("*.png"):
        Image.open(f).resize((4, 4)).save(f)
    with pytest.raises(HMARError, match="pass --image-size 8"):
        train_classifier(tiny, out, epochs=1, width=4)
    assert train_classifier(tiny, out, epochs=1, width=4, image_size=8).image_size == 8


def test_classifier_save_is_atomic(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights were written in place and the config after them: a failed save left a truncated file, or new
    weights beside the old config."""
    import safetensors.torch as st
    out = tmp_path / "m.safetensors"
    train_classifier(tiny_data, out, epochs=1, batch_size=32, width=4, seed=0)
    before = out.read_bytes(), out.with_suffix(".json").read_text()

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(OSError, match="No space"):
        train_classifier(tiny_data, out, epochs=1, batch_size=32, width=8, seed=1)
    assert (out.read_bytes(), out.with_suffix(".json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]   # no temporary left
    assert load_classifier(out).cfg.width == 4


# ----------------------------------------------------------------------------- evaluate_folder

class StandIn(nn.Module):
    """A small fixed feature extractor in place of the Inception (same interface)."""

    name = "stand-in"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return torch.cat([x.mean((2, 3)), x[:, :, ::4].mean((2, 3)), x[:, :, :, ::4].mean((2, 3)),
                          x.std((2, 3))], 1)


def test_evaluate_folder_end_to_end(tiny_data: Path, tiny_classifier: Path, tmp_path: Path) -> None:
    good = _write_split(tmp_path / "good", 12, 5, folder_name=str)  # class-index folders: the sample layout
    res = evaluate_folder(good, tiny_data / "test", classifier=tiny_classifier, inception=StandIn(),
                          cache_dir=tmp_path / "cache", batch_size=8)
    assert res["class_acc"] >= 0.9 and res["num_samples"] == 36 and res["num_reference"] == 30
    assert res["fid"] is not None and res["classifier_fd"] is not None and res["precision"] > 0.5
    # samples labelled with the wrong classes: accuracy collapses, the distribution metrics do not change
    swapped = _write_split(tmp_path / "swapped", 12, 5, folder_name=lambda c: str((c + 1) % 3))
    res2 = evaluate_folder(swapped, tiny_data / "test", classifier=tiny_classifier, inception=StandIn(),
                           cache_dir=tmp_path / "cache", batch_size=8)
    assert res2["class_acc"] <= 0.2
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-6)
    # one class only: far from the reference in both feature spaces
    only_red = _write_split(tmp_path / "red", 12, 6, folder_name=str)
    shutil.rmtree(only_red / "1")
    shutil.rmtree(only_red / "2")
    res3 = evaluate_folder(only_red, tiny_data / "test", classifier=tiny_classifier, inception=StandIn(),
                           cache_dir=tmp_path / "cache", batch_size=8)
    assert res3["fid"] > res["fid"] and res3["classifier_fd"] > res["classifier_fd"]
    assert res3["recall"] < res["recall"]


class Counting(StandIn):
    """The stand-in extractor, counting the images it sees."""

    seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        Counting.seen += len(images)
        return super().forward(images)


def test_too_few_images_fail_early_naming_the_folder(tiny_data: Path, tmp_path: Path) -> None:
    few = _write_split(tmp_path / "few", 1, 5, folder_name=str)         # 3 samples: not more than k = 3
    kw = dict(inception=Counting(), cache_dir=tmp_path / "cache", batch_size=8)
    with pytest.raises(HMARError, match=r"samples folder .*few has 3 image\(s\); precision/recall with --k 3"):
        evaluate_folder(few, tiny_data / "test", **kw)
    assert Counting.seen == 0                                           # before any feature extraction
    with pytest.raises(HMARError, match="FID needs at least 2"):
        evaluate_folder(few / "0", tiny_data / "test", **kw)
    assert evaluate_folder(few, tiny_data / "test", k=2, **kw)["precision"] is not None
    ref = _write_split(tmp_path / "ref", 1, 6, folder_name=str)
    with pytest.raises(HMARError, match=r"reference .*ref has 3 image\(s\)"):
        evaluate_folder(_write_split(tmp_path / "many", 4, 5, folder_name=str), ref, **kw)


def test_cli_train_eval_reference(tiny_data: Path, tiny_classifier: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "m.safetensors"
    assert main(["train-classifier", "--data", str(tiny_data), "--out", str(model), "--epochs", "1",
                 "--width", "4", "--batch-size", "32"]) == 0
    assert model.is_file() and model.with_suffix(".json").is_file()
    stats = tmp_path / "ref.npz"
    assert main(["eval-reference", "--data", str(tiny_data / "test"), "--out", str(stats), "--no-inception",
                 "--classifier", str(tiny_classifier)]) == 0
    samples = _write_split(tmp_path / "s", 5, 7, folder_name=str)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--samples", str(samples), "--reference", str(stats), "--no-inception",
                 "--classifier", str(tiny_classifier), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "class_acc" in printed and "classifier_fd" in printed
    record = json.loads(out.read_text())
    assert record["metrics"]["class_acc"] >= 0.8 and record["metrics"]["fid"] is None
    assert main(["eval", "--samples", str(samples), "--reference", str(stats), "--no-inception"]) == 2
    assert "nothing to compute" in capsys.readouterr().err
    assert main(["eval", "--samples", str(samples), "--reference", str(stats), "--no-inception",
                 "--classifier", str(model)]) == 2  # stats were made with another classifier
    assert "eval-reference" in capsys.readouterr().err
    # outputs that cannot be right are refused before any feature is computed (they failed after it, or an eval
    # --out naming a sample image overwrote it with JSON)
    import hmar.evaluation.metrics as metrics
    calls = []
    real = metrics.evaluate_folder
    metrics.evaluate_folder = lambda *a, **k: calls.append(1) or real(*a, **k)
    (tmp_path / "afile").write_text("x")
    try:
        for argv, needle in [
            (["eval", "--samples", str(samples), "--reference", str(stats), "--out", str(samples / "0" / "000.png")],
             "written as JSON"),
            (["eval", "--samples", str(samples), "--reference", str(stats), "--out", str(tmp_path)], "written as JSON"),
            (["eval", "--samples", str(samples), "--reference", str(stats), "--cache-dir", str(tmp_path / "afile")],
             "--cache-dir: cannot write into"),
            (["eval-reference", "--data", str(tiny_data / "test"), "--out", str(tmp_path / "r.txt")], "end in .npz"),
        ]:
            assert main(argv + ["--no-inception", "--classifier", str(tiny_classifier)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert needle in err[-1], err
    finally:
        metrics.evaluate_folder = real
    assert not calls and (samples / "0" / "000.png").read_bytes()[:4] == b"\x89PNG"
    stats.rename(tmp_path / "REF.NPZ")                       # the suffix in capitals is still a statistics file
    assert main(["eval", "--samples", str(samples), "--reference", str(tmp_path / "REF.NPZ"), "--no-inception",
                 "--classifier", str(tiny_classifier), "--out", str(out)]) == 0


# ----------------------------------------------------------------------------- generation

def fake_sampler(labels: torch.LongTensor, generator: torch.Generator) -> torch.Tensor:
    """Deterministic given the generator: noise plus a class-dependent level."""
    noise = torch.rand(len(labels), 3, 8, 8, generator=generator)
    return (noise * 0.5 + labels.float()[:, None, None, None] * 0.2).clamp(0, 1)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_generate_samples_independent_of_world_size(tmp_path: Path) -> None:
    single = generate_samples(fake_sampler, num_classes=3, per_class=7, batch_size=3, out_dir=tmp_path / "one", seed=11)
    assert len(single) == 21
    for rank in range(2):
        generate_samples(fake_sampler, 3, 7, 3, tmp_path / "two", seed=11, rank=rank, world_size=2)
    for rank in range(3):
        generate_samples(fake_sampler, 3, 7, 3, tmp_path / "three", seed=11, rank=rank, world_size=3)
    one = _files(tmp_path / "one")
    assert sorted(one)[:3] == ["0/000000.png", "0/000001.png", "0/000002.png"] and len(one) == 21
    assert _files(tmp_path / "two") == one and _files(tmp_path / "three") == one
    assert not list((tmp_path / "one").rglob("*.part"))
    # another seed gives other images; existing files are skipped on a rerun (resume)
    other = generate_samples(fake_sampler, 3, 7, 3, tmp_path / "other", seed=12)
    assert _files(tmp_path / "other") != one and len(other) == 21
    assert generate_samples(fake_sampler, 3, 7, 3, tmp_path / "one", seed=11) == []
    im = Image.open(tmp_path / "one" / "2" / "000006.png")
    assert im.size == (8, 8) and im.mode == "RGB"


def test_generate_plan_and_errors(tmp_path: Path) -> None:
    assert plan_chunks(2, 5, 2) == [(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 0, 2), (1, 2, 2), (1, 4, 1)]
    assert chunk_seed(0, 1, 2) != chunk_seed(0, 2, 1) and chunk_seed(0, 1, 2) == chunk_seed(0, 1, 2)
    with pytest.raises(HMARError, match="rank 2"):
        generate_samples(fake_sampler, 2, 2, 2, tmp_path, seed=0, rank=2, world_size=2)
    with pytest.raises(HMARError, match=r"\[B, 3, H, W\]"):
        generate_samples(lambda lab, g: torch.zeros(len(lab), 8, 8), 1, 1, 1, tmp_path, seed=0)


def test_a_classifier_folder_loads_its_model_safetensors(tiny_classifier: Path) -> None:
    """``--classifier cls/`` (the folder train-classifier wrote model.safetensors into) said "cls.json not found"."""
    a, b = load_classifier(tiny_classifier.parent), load_classifier(tiny_classifier)
    assert a.name == b.name


def test_the_statistics_cache_tells_folders_and_rewritten_images_apart(tmp_path: Path) -> None:
    """Two folders of one name whose BMP files have the same names and byte sizes, and an image rewritten in place at
    the same size: each is a cache miss (the key had been the base name, the relative paths and the sizes)."""
    import os
    from hmar.evaluation.fid import reference_stats
    cache = tmp_path / "cache"

    def folder(parent: str, value: int) -> Path:
        d = tmp_path / parent / "test"
        (d / "0").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value + 20 * i, np.uint8)).save(d / "0" / f"{i}.bmp")
        return d

    a, b = folder("a", 0), folder("b", 100)
    ext = StandIn()
    mu_a = reference_stats(a, [ext], cache)[ext.name].mu
    mu_b = reference_stats(b, [ext], cache)[ext.name].mu
    assert not np.allclose(mu_a, mu_b) and len(list(cache.glob("*.npz"))) == 2
    assert np.array_equal(reference_stats(a, [ext], cache)[ext.name].mu, mu_a)        # a hit stays a hit
    f = a / "0" / "0.bmp"
    st = f.stat()
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(f)                        # same size, new pixels
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert f.stat().st_size == st.st_size
    assert not np.allclose(reference_stats(a, [ext], cache)[ext.name].mu, mu_a)


def test_sample_layouts_generate_json_folders_are_indices_and_the_grid_is_no_sample(
        tiny_data: Path, tmp_path: Path) -> None:
    """A folder that `hmar generate` wrote (generate.json) holds <class index>/ folders even when the class names are
    numbers in another order; `hmar sample`'s grid.png beside flat samples is left out of the statistics."""
    from hmar.evaluation.metrics import _samples
    gen = _write_split(tmp_path / "gen", 2, 3, folder_name=str)
    names = ["1", "0", "2"]                        # e.g. a model whose classes were the sorted folders 1, 0, 2
    assert _samples(gen, names, print).labels == [1, 1, 0, 0, 2, 2]      # a folder of the user's: by name
    (gen / "generate.json").write_text("{}")
    assert _samples(gen, names, print).labels == [0, 0, 1, 1, 2, 2]      # generate's folders: by index
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(_pattern(i % 3, np.random.default_rng(i))).save(flat / f"{i:04d}_c_000.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(flat / "grid.png")
    said = []
    s = _samples(flat, None, said.append)
    assert len(s) == 4 and "grid.png" not in [f.name for f in s.files] and "contact sheet" in said[0]
    res = evaluate_folder(flat, tiny_data / "test", inception=StandIn(), k=2, batch_size=8)
    assert res["num_samples"] == 4
