"""Training data: PIL transforms, class folders, corrupt files, errors, batch order, token caches."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from PIL import Image

from hmar.cli import main
from hmar.errors import HMARError
from hmar.training.data import (EpochBatches, ImageFolderDataset, TokenCacheDataset, build_data, keyed_rng,
                                read_token_cache, transform)
from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder


def test_transform_resize_crop_and_range():
    arr = np.zeros((80, 100, 3), np.uint8)
    arr[:, :50] = 255                                   # left half white, right half black
    im = Image.fromarray(arr)
    val = transform(im, 64, train=False)
    assert val.shape == (3, 64, 64) and val.min() >= -1 and val.max() <= 1
    # shorter side 80 -> round(1.125 * 64) = 72, width 90; the centre crop is split at column 45 - 13 = 32
    assert torch.allclose(val[:, :, :30], torch.ones(3, 64, 30), atol=1e-2)
    assert torch.allclose(val[:, :, 34:], -torch.ones(3, 64, 30), atol=1e-2)
    a = transform(im, 64, True, rng=keyed_rng(0, 1, 5, 1))
    b = transform(im, 64, True, rng=keyed_rng(0, 1, 5, 1))
    assert torch.equal(a, b)
    crops = {transform(im, 64, True, rng=keyed_rng(0, e, 5, 1)).sum().item() for e in range(12)}
    assert len(crops) > 1                                # the crop position changes across epochs
    flips = [transform(im, 64, True, hflip=True, rng=keyed_rng(0, e, 5, 1))[0, 0, 0].item() for e in range(12)]
    assert min(flips) < 0 < max(flips)                   # some crops are flipped (black on the left)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)               # fully transparent black
    rgba[:32, :, :] = (255, 0, 0, 255)                   # opaque red top half
    d = tmp_path / "a" / "x"
    d.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(d / "im.png")
    ds = ImageFolderDataset(tmp_path / "a", 64, train=False)
    img = ds[0]["img"]
    assert torch.allclose(img[:, 40:56], torch.ones(3, 16, 64), atol=1e-2)   # transparent -> white
    assert img[0, 8, 8] > 0.99 and img[1, 8, 8] < -0.99                       # red


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    d = tmp_path / "a" / "x"
    d.mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 128 * 257, np.uint16)).save(d / "g16.png")   # mid grey, 16 bits
    assert Image.open(d / "g16.png").mode.startswith("I")
    img = ImageFolderDataset(tmp_path / "a", 64, train=False)[0]["img"]
    assert torch.allclose(img, torch.full_like(img, 128 / 127.5 - 1), atol=1e-2)   # not white


def test_class_names_are_sorted_folder_names_and_splits(tmp_path):
    make_shapes_folder(tmp_path / "d", 3, 2, 64, val_per_class=1)
    data = build_data(str(tmp_path / "d"), 64, False, 0)
    assert data.class_names == ["circle", "cross", "ring"]
    assert len(data.train) == 6 and len(data.val) == 3
    assert sorted(data.val.labels) == [0, 1, 2] and data.val.train is False
    (tmp_path / "d" / "train" / "bird").mkdir()              # an empty class folder would shift "circle"..
    with pytest.raises(HMARError, match="bird hold no images"):
        build_data(str(tmp_path / "d"), 64, False, 0)


def test_corrupt_file_is_replaced_deterministically(tmp_path):
    make_shapes_folder(tmp_path / "d", 2, 3, 64)
    bad = tmp_path / "d" / "circle" / "0001.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageFolderDataset(tmp_path / "d", 64, train=True, seed=0)
    i = ds.files.index(bad)
    item = ds[(i, 0)]
    assert item["bad"] == [str(bad)] and item["index"] == i
    assert torch.equal(item["img"], ds.load(i + 1, 0))  # the next readable index stands in
    assert ds[(i + 1, 0)]["bad"] == []


def test_missing_and_empty_folders_give_one_line_errors(tmp_path, capsys):
    rc = main(["train-tokenizer", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r1"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: data folder") and "does not exist" in err[0]
    assert not (tmp_path / "r1").exists()                  # no half-made run directory is left behind
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    tok = make_random_tokenizer(tmp_path / "tok")
    rc = main(["train", "--data", str(tmp_path / "empty"), "--tokenizer", str(tok), "--out", str(tmp_path / "r2"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: no images") and not any("Traceback" in e for e in err)
    assert not (tmp_path / "r2").exists()


def test_epoch_batches_shard_a_global_order():
    n, gb = 23, 8
    one = list(EpochBatches(n, gb, 0, 1, seed=1, epoch=2))
    two = [list(EpochBatches(n, gb, r, 2, seed=1, epoch=2)) for r in range(2)]
    assert len(one) == 3 and all(len(b) == 8 for b in one)
    for b in range(3):
        assert two[0][b] + two[1][b] == one[b]             # rank r gets the r-th contiguous slice
    flat = [i for b in one for i, _ in b]
    assert sorted(set(flat)) == list(range(n)) and flat[23:] == flat[:1]   # a permutation, wrapped to fill
    assert one != list(EpochBatches(n, gb, 0, 1, seed=1, epoch=3))          # another epoch, another order
    assert list(EpochBatches(n, gb, 0, 1, seed=1, epoch=2, start=2)) == one[2:]
    with pytest.raises(HMARError):
        EpochBatches(n, 9, 0, 2, 0, 0)


def test_tokenize_cache_roundtrip_and_views(tmp_path, capsys):
    make_shapes_folder(tmp_path / "d", 2, 3, 64, val_per_class=1)
    (tmp_path / "d" / "train" / "circle" / "zz.png").write_bytes(b"garbage")
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tmp_path / "c.safetensors"
    rc = main(["tokenize", "--data", str(tmp_path / "d"), "--tokenizer", str(tok), "--out", str(cache),
               "--views", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and err.count("skipping unreadable image") == 1
    splits, meta = read_token_cache(cache)
    idx, lab = splits["train"]
    assert idx.shape == (3, 6, 30) and idx.dtype == torch.int16 and lab.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits["val"][0].shape == (1, 2, 30)
    assert meta["class_names"] == ["circle", "cross"] and meta["skipped_files"] == 1
    # view 0 = the centre crop the trainer's evaluation would encode
    from hmar.training.tokenizer_io import load_tokenizer
    vq = load_tokenizer(tok)
    ds = ImageFolderDataset(tmp_path / "d" / "train", 64, train=False)
    ds.files = [f for f in ds.files if f.name != "zz.png"]
    with torch.no_grad():
        ref = torch.cat(vq.img_to_indices(ds.load(0)[None]), 1)[0]
    assert torch.equal(idx[0, 0].long(), ref)
    # training items pick one of the views from (seed, epoch, index)
    tds = TokenCacheDataset(idx, lab, meta["class_names"], train=True, seed=0)
    seen = {tuple(tds[(0, e)]["idx"].tolist()) for e in range(20)}
    assert 1 < len(seen) <= 3
    assert torch.equal(TokenCacheDataset(idx, lab, [], train=False)[(0, 5)]["idx"], idx[0, 0].long())


def test_cache_from_another_tokenizer_is_refused(tmp_path):
    from hmar.training import TrainConfig
    from hmar.training.loop import Trainer
    from hmar.training.tokenize import tokenize_folder
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    tokenize_folder(tmp_path / "d", make_random_tokenizer(tmp_path / "t1", seed=1), tmp_path / "c.safetensors",
                    progress=False, say=lambda m: None)
    other = make_random_tokenizer(tmp_path / "t2", seed=2)
    with pytest.raises(HMARError, match="another tokenizer"):
        Trainer(TrainConfig(data=str(tmp_path / "c.safetensors"), tokenizer=str(other), out=str(tmp_path / "r"),
                            progress=False, tensorboard=False))


def test_stage2_keeps_the_stage1_tokenizer_and_refuses_other_caches(tmp_path):
    from hmar.training import TrainConfig
    from hmar.training.loop import Trainer
    from hmar.training.tokenize import tokenize_folder
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    t1, t2 = make_random_tokenizer(tmp_path / "t1", seed=1), make_random_tokenizer(tmp_path / "t2", seed=2)
    quiet = dict(progress=False, say=lambda m: None)
    c1 = tokenize_folder(tmp_path / "d", t1, tmp_path / "c1.safetensors", **quiet)
    c2 = tokenize_folder(tmp_path / "d", t2, tmp_path / "c2.safetensors", **quiet)
    common = dict(progress=False, tensorboard=False, max_steps=1, batch_size=2, sample_every=-1)
    Trainer(TrainConfig(data=str(c1), out=str(tmp_path / "s1"), **common)).run()
    masked = dict(stage="masked", init=str(tmp_path / "s1"), **common)
    with pytest.raises(HMARError, match="another tokenizer"):     # tokens of t2, trunk trained on t1's
        Trainer(TrainConfig(data=str(c2), out=str(tmp_path / "s2"), **masked))
    with pytest.raises(HMARError, match="not the tokenizer of the stage-1 model"):
        Trainer(TrainConfig(data=str(tmp_path / "d"), tokenizer=str(t2), out=str(tmp_path / "s2"), **masked))
    Trainer(TrainConfig(data=str(c1), out=str(tmp_path / "s2"), **masked))
    import shutil                                                   # same count of classes, other names
    shutil.copytree(tmp_path / "d", tmp_path / "e")
    first = sorted(p.name for p in (tmp_path / "e").iterdir() if p.is_dir())[0]
    (tmp_path / "e" / first).rename(tmp_path / "e" / "aaa_other")
    with pytest.raises(HMARError, match="same classes, same order"):
        Trainer(TrainConfig(data=str(tmp_path / "e"), out=str(tmp_path / "s3"), **masked))


@pytest.mark.parametrize("argv,needle", [
    (["train-tokenizer", "--tokenizer-override", "foo=1"], "--tokenizer-override: unknown key(s) foo"),
    (["train-tokenizer", "--tokenizer-override", "ch=abc"], "--tokenizer-override ch='abc': expected a value like"),
    (["train-tokenizer", "--tokenizer-override", "ch=16"],
     "--tokenizer-override ch=16: the tokenizer's channel widths [16] (ch 16, times ch_mult) are not divisible by its "
     "norm_groups 32"),
    (["train", "--model-override", "num_heads=3"], "--model-override num_heads=3: embed_dim 64 is not divisible"),
    (["train", "--model-override", "depth=abc"], "--model-override depth='abc': expected a value like 4"),
    (["train", "--model-override", "foo=1"], "--model-override: unknown key(s) foo"),
])
def test_bad_config_overrides_are_one_line_errors(tmp_path, capsys, argv, needle):
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    tok = make_random_tokenizer(tmp_path / "tok")
    extra = ["--tokenizer", str(tok)] if argv[0] == "train" else []
    rc = main(argv + extra + ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "r").exists()


def test_symlinked_class_folders_are_followed_and_hidden_ones_ignored(tmp_path):
    import shutil
    make_shapes_folder(tmp_path / "src", 2, 2, 64)
    (tmp_path / "d").mkdir()
    for c in sorted(p for p in (tmp_path / "src").iterdir() if p.is_dir()):
        (tmp_path / "d" / c.name).symlink_to(c, target_is_directory=True)
    first = sorted((tmp_path / "d").iterdir())[0]
    (first / "loop").symlink_to(tmp_path / "d", target_is_directory=True)   # a cycle is not walked forever
    data = build_data(str(tmp_path / "d"), 64, False, 0)
    assert len(data.train) == 4 and data.class_names == ["circle", "cross"]
    (first / "loop").unlink()
    # Jupyter's .ipynb_checkpoints/ (and macOS ._x.png files) are neither a class nor images of one
    hidden = tmp_path / "src" / ".ipynb_checkpoints"
    hidden.mkdir()
    png = next((tmp_path / "src").rglob("*.png"))
    shutil.copy(png, hidden / "x-checkpoint.png")
    shutil.copy(png, png.parent / "._0000.png")
    data = build_data(str(tmp_path / "src"), 64, False, 0)
    assert len(data.train) == 4 and data.class_names == ["circle", "cross"]


def test_unusable_val_split_is_an_error_not_silently_dropped(tmp_path):
    import shutil
    make_shapes_folder(tmp_path / "d", 2, 2, 64, val_per_class=1)
    (tmp_path / "d" / "val" / "zzz").mkdir()        # a class the train split does not have
    shutil.copy(next((tmp_path / "d" / "val").rglob("*.png")), tmp_path / "d" / "val" / "zzz" / "a.png")
    with pytest.raises(HMARError, match="val split .*zzz is not one of the training classes"):
        build_data(str(tmp_path / "d"), 64, False, 0)
    shutil.rmtree(tmp_path / "d" / "val")            # an empty val folder still is no val split
    (tmp_path / "d" / "val").mkdir()
    assert build_data(str(tmp_path / "d"), 64, False, 0).val is None


def test_resume_after_the_data_shrank_starts_the_next_epoch(tmp_path, capsys):
    """A checkpoint at batch 3 of 4, resumed on data with 2 batches per epoch: the position is past the end of
    the epoch, whose batch sampler was then empty, so the loop spun forever without a step."""
    from hmar.training import TrainConfig
    from hmar.training.loop import Trainer
    make_shapes_folder(tmp_path / "d", 2, 4, 64)
    common = dict(progress=False, tensorboard=False, batch_size=2, sample_every=-1, data=str(tmp_path / "d"),
                  tokenizer=str(make_random_tokenizer(tmp_path / "tok")), out=str(tmp_path / "r"))
    Trainer(TrainConfig(max_steps=3, **common)).run()
    for c in (p for p in (tmp_path / "d").iterdir() if p.is_dir()):
        for f in sorted(c.iterdir())[2:]:
            f.unlink()
    tr = Trainer(TrainConfig(max_steps=5, resume=True, **common))
    tr.acc_loss, tr.acc_n = torch.zeros((), dtype=torch.float64), 0
    tr._resume()
    assert (tr.step, tr.epoch, tr.batch) == (3, 1, 0) and tr.iters_per_epoch == 2
    assert "was written for 8 training samples, --data has 4 now" in capsys.readouterr().err
    tr.run()
    assert tr.step == 5


def test_tokenize_refuses_a_batch_size_below_one(tmp_path):
    from hmar.training.tokenize import tokenize_folder
    make_shapes_folder(tmp_path / "d", 2, 1, 64)
    with pytest.raises(HMARError, match="--batch-size must be >= 1, got 0"):   # was range()'s ValueError
        tokenize_folder(tmp_path / "d", make_random_tokenizer(tmp_path / "tok"), tmp_path / "c.safetensors",
                        batch_size=0, progress=False, say=lambda m: None)


def test_tokenize_refuses_a_class_folder_of_only_unreadable_images(tmp_path):
    """A class whose every file is unreadable became a class of zero samples (tokenize and training went on)."""
    from hmar.training.tokenize import tokenize_folder
    root = make_shapes_folder(tmp_path / "d", 2, 2, 64)
    cls = sorted(p for p in root.iterdir() if p.is_dir())[0]
    for f in cls.iterdir():
        f.write_bytes(b"not an image")
    said = []
    with pytest.raises(HMARError, match=f"class folder\\(s\\) {cls.name} under .* hold no readable image"):
        tokenize_folder(root, make_random_tokenizer(tmp_path / "tok"), tmp_path / "c.safetensors", progress=False,
                        say=said.append)
    assert sum("skipping unreadable image" in m for m in said) == 2 and not (tmp_path / "c.safetensors").exists()


def test_train_from_a_folder_stops_once_every_image_of_a_class_proved_unreadable(tmp_path, capsys):
    """`train` reading a folder directly replaced each unreadable image by another sample; a class of only
    unreadable files got no sample and trained on without a word beyond the per-file warnings. Now the run stops
    with an error naming the class once the last of its files proved unreadable; one bad file of a class still warns
    only."""
    from hmar.training.data import CorruptFiles
    root = make_shapes_folder(tmp_path / "d", 3, 2, 64)
    cls = sorted(p for p in root.iterdir() if p.is_dir())
    ds = ImageFolderDataset(root, 64)
    said = []
    corrupt = CorruptFiles(said.append, ds)
    first, second = sorted(str(f) for f in cls[0].iterdir())
    corrupt.update([first, first])                        # once per file, and one bad file of two: a warning
    assert said == [f"warning: skipping unreadable image {first} (replaced by another sample)"]
    corrupt.update([str(next(cls[1].iterdir()))])          # another class: counted on its own
    with pytest.raises(HMARError, match=f"every image of class '{cls[0].name}' \\(2 file\\(s\\) under .*\\) is "
                                        "unreadable, so the class cannot be learnt"):
        corrupt.update([second])
    assert corrupt.count == 3
    CorruptFiles(said.append).update([first, second])     # no dataset (a token cache's run): warnings only
    resumed = CorruptFiles(said.append, ds)               # a resumed run: the checkpoint's list counts, unwarned
    n = len(said)
    resumed.restore([first])
    assert len(said) == n and resumed.count == 1
    with pytest.raises(HMARError, match=f"every image of class '{cls[0].name}'"):
        resumed.update([second])
    for f in cls[2].iterdir():                            # end to end: the CLI's one-line error, exit code 2
        f.write_bytes(b"not an image")
    rc = main(["train", "--data", str(root), "--tokenizer", str(make_random_tokenizer(tmp_path / "tok")), "--out",
               str(tmp_path / "r"), "--max-steps", "4", "--batch-size", "6", "--no-progress", "--no-tensorboard",
               "--sample-every", "-1", "--eval-batches", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and f"every image of class '{cls[2].name}'" in err[-1], err
    assert sum("skipping unreadable image" in m for m in err) == 2


def test_tokenize_and_train_refuse_a_val_split_with_a_class_the_train_split_lacks(tmp_path, capsys):
    """`train` refused such a val split; `tokenize` warned, wrote the cache without its val split, and a later
    `train --eval-every N` on that cache then failed for want of one. Both now refuse it, tokenize before
    encoding anything."""
    import shutil
    root = make_shapes_folder(tmp_path / "d", 2, 2, 64, val_per_class=1)
    val = root / "val"
    shutil.copytree(next(p for p in val.iterdir() if p.is_dir()), val / "zebra")
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tmp_path / "c.safetensors"
    rc = main(["tokenize", "--data", str(root), "--tokenizer", str(tok), "--out", str(cache), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: val split {val}") and "zebra" in err[-1], err
    assert "give it class folders of the train split, or remove it" in err[-1] and not cache.exists()
    rc = main(["train", "--data", str(root), "--tokenizer", str(tok), "--out", str(tmp_path / "r"), "--max-steps",
               "1", "--batch-size", "2", "--no-progress", "--no-tensorboard", "--sample-every", "-1"])
    err2 = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err2[-1] == err[-1], err2              # one rule, one message
    shutil.rmtree(val / "zebra")
    assert main(["tokenize", "--data", str(root), "--tokenizer", str(tok), "--out", str(cache), "--no-progress"]) == 0
    assert read_token_cache(cache)[0]["val"][0].shape[1] == 2
    # a val split of only unreadable images: an error naming the split, before the train split is encoded
    for f in val.rglob("*.png"):
        f.write_bytes(b"not an image")
    cache.unlink()
    rc = main(["tokenize", "--data", str(root), "--tokenizer", str(tok), "--out", str(cache)])   # progress bars on
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith(f"error: val split {val}: none of the 2 images"), err
    assert "tokenize train" not in err and not cache.exists()   # the train split's progress bar never started


def test_tokenize_refuses_an_out_directory_and_a_file_of_a_tokenizer_directory(tmp_path, capsys):
    """--out naming an existing directory failed after encoding everything ("Is a directory: ...tmp", a .tmp file
    left behind); --tokenizer TOK/tokenizer.safetensors went to the official loader: a raw GroupNorm traceback."""
    make_shapes_folder(tmp_path / "d", 2, 1, 64)
    tok = make_random_tokenizer(tmp_path / "tok")
    (tmp_path / "c.safetensors").mkdir()
    base = ["tokenize", "--data", str(tmp_path / "d"), "--no-progress"]
    assert main(base + ["--tokenizer", str(tok), "--out", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory: pass a file path such as" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "d", "tok"]
    for name in ("tokenizer.safetensors", "config.json"):
        assert main(base + ["--tokenizer", str(tok / name), "--out", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is one file of the tokenizer directory {str(tok)!r}: pass the directory" in err[0]
    assert main(base + ["--tokenizer", str(tok), "--out", str(tmp_path / "new" / "x.safetensors")]) == 0
    assert read_token_cache(tmp_path / "new" / "x.safetensors")[0]["train"][0].shape == (1, 2, 30)


def test_two_links_to_one_class_folder_are_refused_not_read_twice(tmp_path):
    """Two symlinks to one class folder (or a link beside the folder itself) made two classes of the same images."""
    make_shapes_folder(tmp_path / "src", 2, 2, 64)
    (tmp_path / "d").mkdir()
    for name in ("a_circle", "b_circle"):
        (tmp_path / "d" / name).symlink_to(tmp_path / "src" / "circle", target_is_directory=True)
    with pytest.raises(HMARError, match="a_circle and .*b_circle are the same folder") as e:
        build_data(str(tmp_path / "d"), 64, False, 0)
    assert str((tmp_path / "src" / "circle").resolve()) in str(e.value)
    (tmp_path / "src" / "twin").symlink_to(tmp_path / "src" / "cross", target_is_directory=True)
    with pytest.raises(HMARError, match="cross and .*twin are the same folder"):
        build_data(str(tmp_path / "src"), 64, False, 0)
    (tmp_path / "src" / "twin").unlink()
    (tmp_path / "src" / "cross" / "more").symlink_to(tmp_path / "src" / "circle", target_is_directory=True)
    with pytest.raises(HMARError, match="same folder"):                 # duplicates inside one class, too
        build_data(str(tmp_path / "src"), 64, False, 0)
    (tmp_path / "split" / "train").mkdir(parents=True)                # a val split that is the train split
    (tmp_path / "split" / "train" / "circle").symlink_to(tmp_path / "src" / "circle", target_is_directory=True)
    (tmp_path / "split" / "val").symlink_to(tmp_path / "split" / "train", target_is_directory=True)
    with pytest.raises(HMARError, match="val and .*train are the same folder"):
        build_data(str(tmp_path / "split"), 64, False, 0)


def test_exif_orientation_is_applied(tmp_path):
    """A camera stores a portrait photo as landscape pixels plus an EXIF Orientation tag: it loaded sideways."""
    from hmar.datasets.folder import load_image
    arr = np.zeros((60, 80, 3), np.uint8)
    arr[:, :40] = 255                                    # stored: left half white, right half black
    exif = Image.Exif()
    exif[0x0112] = 6                                     # Orientation 6: turn 90 degrees clockwise to view
    d = tmp_path / "a" / "x"
    d.mkdir(parents=True)
    Image.fromarray(arr).save(d / "photo.jpg", quality=95, exif=exif)
    img = ImageFolderDataset(tmp_path / "a", 64, train=False)[0]["img"]
    # upright, the photo is 60 wide and 80 tall, white on top: the centre crop is white above, black below
    assert img[:, :28].mean() > 0.9 and img[:, 36:].mean() < -0.9, img.mean(dim=(0, 2))
    up = load_image(d / "photo.jpg")                     # the evaluation / classifier reader
    assert up.shape == (80, 60, 3) and up[:36].mean() > 230 and up[44:].mean() < 25
    plain = d / "plain.jpg"                              # without the tag nothing turns
    Image.fromarray(arr).save(plain, quality=95)
    assert load_image(plain).shape == (60, 80, 3)


def _cache_with_other_scales(tmp_path):
    """A cache of tokenizer t1 (scales 1,2,3,4) and t1b: the same weights (same fingerprint), scales 1,2,4."""
    import json
    import shutil

    from hmar.training.tokenize import tokenize_folder
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    t1 = make_random_tokenizer(tmp_path / "t1", seed=1)
    cache = tokenize_folder(tmp_path / "d", t1, tmp_path / "c.safetensors", progress=False, say=lambda m: None)
    shutil.copytree(t1, tmp_path / "t1b")
    cfg = json.loads((tmp_path / "t1b" / "config.json").read_text())
    cfg["tokenizer"]["patch_nums"] = [1, 2, 4]
    (tmp_path / "t1b" / "config.json").write_text(json.dumps(cfg))
    return cache, t1, tmp_path / "t1b"


def test_cache_of_other_scales_or_length_is_refused_before_training(tmp_path):
    """The quantizer fingerprint does not see the scales: such a cache passed the checks and failed at the first step
    with torch's split_with_sizes RuntimeError (or, with an equal token count, trained on misread tokens)."""
    from hmar.training import TrainConfig
    from hmar.training.data import write_token_cache
    from hmar.training.loop import Trainer
    cache, t1, t1b = _cache_with_other_scales(tmp_path)
    common = dict(progress=False, tensorboard=False, max_steps=1, batch_size=2, sample_every=-1)
    with pytest.raises(HMARError, match=r"scales \(1, 2, 3, 4\) but the model uses \(1, 2, 4\): re-run `hmar tokenize"):
        Trainer(TrainConfig(data=str(cache), tokenizer=str(t1b), out=str(tmp_path / "r"), **common))
    assert not (tmp_path / "r").exists()
    splits, meta = read_token_cache(cache)                # a cache that does not say its scales: its length tells
    meta.pop("patch_nums")
    write_token_cache(tmp_path / "short.safetensors", {"train": (splits["train"][0][..., :29], splits["train"][1])},
                      meta)
    with pytest.raises(HMARError, match=r"holds 29 tokens per image \(train split\) but the model's scales "
                                        r"\(1, 2, 3, 4\) take 30"):
        Trainer(TrainConfig(data=str(tmp_path / "short.safetensors"), tokenizer=str(t1), out=str(tmp_path / "r"),
                            **common))
    Trainer(TrainConfig(data=str(cache), tokenizer=str(t1), out=str(tmp_path / "ok"), **common)).run()


def test_hflip_on_a_cache_and_eval_every_without_val_are_refused(tmp_path, capsys):
    """Both were silently ignored: cached tokens cannot be flipped, and without a val split nothing is evaluated."""
    from hmar.training.tokenize import tokenize_folder
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    make_shapes_folder(tmp_path / "v", 2, 2, 64, val_per_class=1)
    tok = make_random_tokenizer(tmp_path / "tok")
    quiet = dict(progress=False, say=lambda m: None)
    plain = tokenize_folder(tmp_path / "d", tok, tmp_path / "plain.safetensors", views=3, **quiet)
    flipped = tokenize_folder(tmp_path / "v", tok, tmp_path / "flipped.safetensors", views=3, hflip=True, **quiet)
    common = ["--tokenizer", str(tok), "--no-progress", "--no-tensorboard", "--batch-size", "2", "--max-steps", "1",
              "--sample-every", "-1"]
    for argv, needle in [(["--data", str(plain), "--hflip"], "--hflip cannot flip the tokens of the token cache"),
                         (["--data", str(plain), "--eval-every", "1"], "--eval-every 1 needs a validation split"),
                         (["--data", str(tmp_path / "d"), "--eval-every", "5"], "--eval-every 5 needs a validation "
                                                                               "split")]:
        rc = main(["train", *argv, "--out", str(tmp_path / "r"), *common])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1], err
        assert not (tmp_path / "r").exists()              # refused before the run directory is made
    # a cache that stored flipped views, with a val split, takes both; so does an image folder with val/
    assert main(["train", "--data", str(flipped), "--hflip", "--eval-every", "1", "--out", str(tmp_path / "r1"),
                 *common]) == 0
    assert main(["train", "--data", str(tmp_path / "v"), "--hflip", "--eval-every", "1", "--out",
                 str(tmp_path / "r2"), *common]) == 0


def test_a_batch_larger_than_the_training_set_warns_and_a_huge_one_is_refused(tmp_path, capsys):
    """--batch-size 100000 on 8 images built a batch of 100000 repeated images and was killed for memory; beyond
    8x the set it is refused before the model is built, above the set size it is a warning."""
    from hmar.training.data import MAX_REPEATS
    make_shapes_folder(tmp_path / "d", 2, 2, 64)          # 4 images
    tok = make_random_tokenizer(tmp_path / "tok")
    base = ["--data", str(tmp_path / "d"), "--no-progress", "--no-tensorboard", "--max-steps", "1",
            "--eval-batches", "0"]
    for cmd in (["train", "--tokenizer", str(tok), "--sample-every", "-1"], ["train-tokenizer"]):
        rc = main(cmd + base + ["--out", str(tmp_path / f"big-{cmd[0]}"), "--batch-size", str(4 * MAX_REPEATS + 1)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and f"is more than {MAX_REPEATS}x the 4 training samples" in err[-1], err
        assert not (tmp_path / f"big-{cmd[0]}").exists()
        rc = main(cmd + base + ["--out", str(tmp_path / f"ok-{cmd[0]}"), "--batch-size", "8"])
        err = capsys.readouterr().err
        assert rc == 0 and "warning: --batch-size 8 is larger than the 4 training samples" in err, err


def test_a_run_directory_loads_as_its_model_and_its_checkpoints_say_where_the_model_is(tmp_path, capsys):
    """`hmar sample -c RUN` said RUN is no model directory; it loads RUN/model (as --tokenizer takes a run dir).
    RUN/checkpoints (resumable states) is pointed at RUN/model."""
    from hmar import HMARPipeline
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--tokenizer", str(make_random_tokenizer(tmp_path / "tok")),
                 "--out", str(run), "--max-steps", "1", "--batch-size", "4", "--no-progress", "--no-tensorboard",
                 "--sample-every", "-1", "--eval-batches", "0"]) == 0
    a, b = HMARPipeline.from_pretrained(run), HMARPipeline.from_pretrained(run / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    capsys.readouterr()
    assert main(["sample", "-c", str(run / "checkpoints"), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "holds resumable training states, not a model" in err[-1] and str(run / "model") in err[-1], err
    ck = next((run / "checkpoints").glob("step_*.pt"))                 # one state file: the same pointer
    assert main(["sample", "-c", str(ck), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a resumable training state, not a model" in err[-1] and str(run / "model") in err[-1], err


def test_one_folder_to_class_rule_for_training_and_evaluation(tmp_path):
    """Training and evaluation read class folders alike: index folders 0..n-1 by index (``10/`` after ``9/``, not
    after ``1/`` as sorted names), other numeric names (years) as sorted names, a classes.json class without images
    refused for training."""
    from hmar.datasets.folder import load_image_folder
    from hmar.training.data import index_folder

    def make(root, names):
        for n in names:
            (root / n).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(root / n / "a.png")
        return root

    idx = make(tmp_path / "idx", [str(i) for i in range(11)])
    files, labels, names = index_folder(idx)
    assert [int(f.parent.name) for f in files] == labels and names == [str(i) for i in range(11)]
    ev = load_image_folder(idx)
    assert ev.labels == [int(f.parent.name) for f in ev.files] and ev.class_names == names
    years = make(tmp_path / "years", ["2021", "2019", "2020"])
    files, labels, names = index_folder(years)
    assert names == ["2019", "2020", "2021"] and labels == [0, 1, 2]
    ev = load_image_folder(years)
    assert ev.class_names == names and ev.labels == labels                  # not a 2022-class folder
    assert load_image_folder(years, names).labels == labels                 # with a classifier's names
    (years / "classes.json").write_text(json.dumps(["2019", "2020", "2021", "ghost"]))
    with pytest.raises(HMARError, match=r"class\(es\) 'ghost' of .*years have no images"):
        index_folder(years)


def test_folder_rule_edge_cases(tmp_path):
    """NN_name folders keep their names; a val folder without classes.json must be a training class by name; two
    folders of one class, a duplicate index and an empty index folder are refused; generate.json folders by index."""
    from hmar.datasets.folder import load_image_folder
    from hmar.training.data import index_folder

    def make(root, names, empty=()):
        for n in names:
            (root / n).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(root / n / "a.png")
        for n in empty:
            (root / n).mkdir(parents=True)
        return root

    nn_ = make(tmp_path / "nn", ["01_dog", "00_cat"])
    assert index_folder(nn_)[1:] == ([0, 1], ["00_cat", "01_dog"]) and load_image_folder(nn_).class_names == [
        "00_cat", "01_dog"]
    train = make(tmp_path / "v" / "train", ["0", "1", "3"])
    val = make(tmp_path / "v" / "val", ["0", "1", "2", "3"])
    with pytest.raises(HMARError, match=r"val/2 is not one of the training classes \['0', '1', '3'\]"):
        index_folder(val, index_folder(train)[2])
    clash = make(tmp_path / "clash", ["0", "1", "2"])
    (clash / "classes.json").write_text(json.dumps(["1", "2", "3"]))   # folder 1 is the name '1', folder 0 index 0
    with pytest.raises(HMARError, match=r"clash/0 and .*clash/1 both map to class 0 \('1'\)"):
        load_image_folder(clash)
    dup = make(tmp_path / "dup", ["00_cat", "00_dog", "01_bird"])
    assert load_image_folder(dup).class_names == ["00_cat", "00_dog", "01_bird"]   # not index folders: sorted names
    with pytest.raises(HMARError, match=r"hold no images"):
        load_image_folder(make(tmp_path / "gap", ["0", "1", "2"], empty=["3"]))
    gen = make(tmp_path / "gen", ["0", "2"])
    (gen / "generate.json").write_text("{}")
    assert load_image_folder(gen, by_index=True).labels == [0, 2]              # a partial generate run
    make(gen, ["00_a"])
    with pytest.raises(HMARError, match="<class index>/ folders only"):
        load_image_folder(gen, by_index=True)
