"""Dataset builders on fake, tiny package contents made here (no network, seconds)."""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hmar.cli import main
from hmar.datasets import build_emoji, build_fashion_mnist, load_image_folder
from hmar.datasets.emoji import CATEGORIES, codepoint_key
from hmar.datasets.fashion_mnist import CLASS_NAMES, read_idx
from hmar.datasets.folder import class_dir_name, folder_class_index, split_for_key
from hmar.errors import HMARError

HAVE_SVG = any(importlib.util.find_spec(m) is not None for m in ("resvg_py", "cairosvg"))


# ----------------------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    src = tmp_path / "fmnist"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", 3), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = rng.integers(1, 256, size=(len(labels), 28, 28), dtype=np.uint8)  # no zeros inside
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return src


def test_idx_roundtrip(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)


def test_fashion_mnist_layout(fake_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    counts = build_fashion_mnist(out, fake_fmnist)
    assert counts == {"train": 30, "test": 20}
    assert json.loads((out / "classes.json").read_text()) == list(CLASS_NAMES)
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"
    assert "Zalando" in (out / "LICENSE.txt").read_text()
    assert sorted(p.name for p in (out / "train").iterdir()) == [class_dir_name(i, n, 10) for i, n in enumerate(CLASS_NAMES)]
    folder = load_image_folder(out / "test")
    assert folder.class_names == list(CLASS_NAMES) and len(folder) == 20
    assert np.bincount(folder.labels).tolist() == [2] * 10

    # pixels: centred copy of the source with a 2-pixel black border
    images = read_idx(fake_fmnist / "train-images-idx3-ubyte.gz")
    labels = read_idx(fake_fmnist / "train-labels-idx1-ubyte.gz")
    im = Image.open(out / "train" / class_dir_name(int(labels[5]), CLASS_NAMES[labels[5]], 10) / "00005.png")
    assert im.size == (32, 32) and im.mode == "L"
    arr = np.asarray(im)
    np.testing.assert_array_equal(arr[2:30, 2:30], images[5])
    assert arr[:2].max() == 0 and arr[30:].max() == 0 and arr[:, :2].max() == 0 and arr[:, 30:].max() == 0


def test_fashion_mnist_limit_and_splits(fake_fmnist: Path, tmp_path: Path) -> None:
    counts = build_fashion_mnist(tmp_path / "o", fake_fmnist, splits=["train"], limit_per_class=1)
    assert counts == {"train": 10}
    assert not (tmp_path / "o" / "test").exists()
    with pytest.raises(HMARError, match="limit-per-class"):
        build_fashion_mnist(tmp_path / "o", fake_fmnist, limit_per_class=0)
    # a rebuild with a smaller limit holds what it reports, not the leftovers of the first build
    build_fashion_mnist(tmp_path / "o", fake_fmnist, splits=["train"], limit_per_class=2)
    (tmp_path / "o" / "train" / "notes.txt").write_text("the user's own file stays")
    assert build_fashion_mnist(tmp_path / "o", fake_fmnist, splits=["train"], limit_per_class=1) == {"train": 10}
    assert len(list((tmp_path / "o" / "train").rglob("*.png"))) == 10
    assert (tmp_path / "o" / "train" / "notes.txt").exists()


def test_fashion_mnist_test_split_is_the_trainers_validation_split(fake_fmnist: Path, tmp_path: Path) -> None:
    """`hmar data fashion-mnist` writes train/ and test/; the trainer looked for val/ only, so it never validated."""
    import shutil

    from hmar.training.data import build_data
    out = tmp_path / "out"
    build_fashion_mnist(out, fake_fmnist)
    data = build_data(str(out), 32, False, 0)
    assert data.val is not None and len(data.val) == 20 and len(data.train) == 30
    assert data.val.root == out / "test" and data.val.train is False
    assert sorted(data.val.labels) == sorted(np.repeat(np.arange(10), 2).tolist())
    shutil.copytree(out / "test", out / "val")                    # a val/ folder, when there is one, comes first
    shutil.rmtree(out / "val" / class_dir_name(0, CLASS_NAMES[0], 10))
    assert build_data(str(out), 32, False, 0).val.root == out / "val"


def test_fashion_mnist_missing_names_package(tmp_path: Path) -> None:
    with pytest.raises(HMARError) as e:
        build_fashion_mnist(tmp_path / "o", tmp_path / "nowhere")
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg and "apt-get update && apt-get install -y dataset-fashion-mnist" in msg
    assert "\n" not in msg
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_cli_fashion_mnist(fake_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "c"), "--source", str(fake_fmnist),
                 "--limit-per-class", "2"]) == 0
    assert "train 20" in capsys.readouterr().out
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "d"), "--source", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "apt-get install -y dataset-fashion-mnist" in err and "\n" not in err


# ----------------------------------------------------------------------------- folder helpers

def test_a_file_given_as_image_folder_is_named_a_file(tmp_path: Path) -> None:
    """`hmar eval --reference model.safetensors` (or a single image) said the folder 'does not exist'."""
    f = tmp_path / "ref.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(HMARError, match="ref.safetensors is a file, not a folder of images"):
        load_image_folder(f)
    with pytest.raises(HMARError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_folder_helpers() -> None:
    assert class_dir_name(3, "T-shirt/top", 10) == "03_t-shirt-top"
    assert class_dir_name(7, "Food & Drink", 120) == "007_food-drink"
    assert folder_class_index("7") == 7 and folder_class_index("03_dress") == 3
    assert folder_class_index("Trouser", CLASS_NAMES) == 1 and folder_class_index("ankle-boot", CLASS_NAMES) == 9
    assert folder_class_index("hat", CLASS_NAMES) is None
    assert folder_class_index("01_trouser", CLASS_NAMES) == 1 and folder_class_index("01_c1", CLASS_NAMES) == 1
    with pytest.raises(HMARError, match=r"'03_trouser' has index 3, which is class 'Dress', but 'trouser' is class 1"):
        folder_class_index("03_trouser", CLASS_NAMES)   # the folder and classes.json contradict each other
    assert split_for_key("1f600", 0.3) == split_for_key("1f600", 0.3)
    splits = [split_for_key(f"k{i}", 0.05) for i in range(4000)]
    assert 0.03 < splits.count("val") / 4000 < 0.07
    assert codepoint_key("0023-FE0F-20E3") == "23-20e3" == codepoint_key("23-20e3")


# ----------------------------------------------------------------------------- emoji

EMOJI = [  # unified, category, subcategory, sort_order, skin variations
    ("1F600", "Smileys & Emotion", "face-smiling", 1, []),
    ("1F44B", "People & Body", "hand-fingers-open", 2, ["1F3FB", "1F3FF"]),
    ("1F3FB", "Component", "skin-tone", 3, []),
    ("1F436", "Animals & Nature", "animal-mammal", 4, []),
    ("0023-FE0F-20E3", "Symbols", "keycap", 5, []),
]


def _png(color, size: int = 64) -> bytes:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # transparent corners
    im.paste(Image.new("RGBA", (size // 2, size // 2), color), (size // 4, size // 4))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _svg(color: str) -> bytes:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
            f'<circle cx="36" cy="36" r="20" fill="{color}"/></svg>').encode()


def _emoji_json() -> list:
    out = []
    for uni, cat, sub, order, skins in EMOJI:
        e = {"unified": uni, "image": uni.lower() + ".png", "category": cat, "subcategory": sub,
             "sort_order": order, "has_img_google": True, "has_img_twitter": True}
        if skins:
            e["skin_variations"] = {s: {"unified": f"{uni}-{s}", "image": f"{uni}-{s}".lower() + ".png"} for s in skins}
        out.append(e)
    return out


def _datasource_files(style: str) -> dict:
    files = {"package.json": json.dumps({"name": f"emoji-datasource-{style}"}).encode(),
             "emoji.json": json.dumps(_emoji_json()).encode()}
    for e in _emoji_json():
        names = [e["image"]] + [v["image"] for v in (e.get("skin_variations") or {}).values()]
        for n in names:
            files[f"img/{style}/64/{n}"] = _png((200, 30, 30, 255))
    return files


def _write_dir(root: Path, files: dict) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _write_tgz(path: Path, files: dict) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo("package/" + rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def emoji_src(tmp_path: Path) -> Path:
    src = tmp_path / "npm"
    _write_dir(src / "node_modules" / "emoji-datasource-google", _datasource_files("google"))
    _write_tgz(src / "emoji-datasource-twitter-16.0.0.tgz", _datasource_files("twitter"))  # npm pack layout
    om = [
        {"hexcode": "1F600", "group": "smileys-emotion", "subgroups": "face-smiling", "skintone": ""},
        {"hexcode": "1F44B", "group": "people-body", "subgroups": "hand-fingers-open", "skintone": ""},
        {"hexcode": "1F44B-1F3FB", "group": "people-body", "subgroups": "hand-fingers-open", "skintone": 1},
        {"hexcode": "1F3FB", "group": "component", "subgroups": "skin-tone", "skintone": ""},
        {"hexcode": "E000", "group": "extras-openmoji", "subgroups": "brand", "skintone": ""},
        {"hexcode": "1F3A8", "group": "activities", "subgroups": "arts-crafts", "skintone": ""},
    ]
    files = {"package.json": json.dumps({"name": "openmoji"}).encode(), "data/openmoji.json": json.dumps(om).encode(),
             "LICENSE.txt": b"Creative Commons Attribution-ShareAlike 4.0 (full text)"}
    for e in om:
        files[f"color/svg/{e['hexcode']}.svg"] = _svg("#3050c0")
    _write_dir(src / "openmoji", files)
    tw = {"package.json": json.dumps({"name": "@twemoji/svg"}).encode()}
    for name in ("1f600", "1f44b-1f3ff", "23-20e3", "1f1ef"):  # 1f1ef: lone regional indicator, no label
        tw[f"{name}.svg"] = _svg("#f0c020")
    _write_dir(src / "node_modules" / "@twemoji" / "svg", tw)
    return src


def _images(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_emoji_png_sources(emoji_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    counts = build_emoji(out, emoji_src, size=32, sources=["google", "twitter"], val_fraction=0.0)
    # per style: 4 labelled base emoji + 2 skin variants (the Component entry is dropped)
    assert counts["train"] == {"google": 6, "twitter": 6} and counts["val"] == {}
    assert json.loads((out / "classes.json").read_text()) == list(CATEGORIES) and len(CATEGORIES) == 9
    files = _images(out)
    assert "train/01_people-body/google_1f44b-1f3fb.png" in files
    assert "train/07_symbols/twitter_23-20e3.png" in files
    assert not any("1f3fb.png" in f and "1f44b" not in f for f in files)
    im = Image.open(out / "train/00_smileys-emotion/google_1f600.png")
    assert im.size == (32, 32) and im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white
    lic = (out / "LICENSE.txt").read_text()
    assert "Apache License 2.0" in lic and "CC-BY 4.0" in lic and "MIT" in lic


def test_emoji_skin_tones_and_subcategory(emoji_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    counts = build_emoji(out, emoji_src, size=64, sources=["google"], drop_skin_tones=True,
                         label="subcategory", val_fraction=0.0)
    assert counts["train"] == {"google": 4}
    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["face-smiling", "hand-fingers-open", "animal-mammal", "keycap"]  # Unicode order, no Component
    assert "train/03_keycap/google_23-20e3.png" in _images(out)


def test_emoji_split_is_deterministic_and_keeps_styles_together(emoji_src: Path, tmp_path: Path) -> None:
    a = build_emoji(tmp_path / "a", emoji_src, sources=["google", "twitter"], val_fraction=0.5)
    b = build_emoji(tmp_path / "b", emoji_src, sources=["google", "twitter"], val_fraction=0.5)
    assert a == b and _images(tmp_path / "a") == _images(tmp_path / "b")
    for f in _images(tmp_path / "a"):
        split, _, name = f.split("/")
        key = name.split("_", 1)[1][:-4]
        assert split == split_for_key(key, 0.5)
        other = "twitter" if name.startswith("google") else "google"
        assert f"{split}/{f.split('/')[1]}/{other}_{key}.png" in _images(tmp_path / "a")


@pytest.mark.skipif(not HAVE_SVG, reason="needs resvg-py or cairosvg")
def test_emoji_svg_sources(emoji_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    counts = build_emoji(out, emoji_src, size=96, val_fraction=0.0, workers=1)  # default above 64: SVG sources
    # openmoji: 1F600, 1F44B, 1F44B-1F3FB, 1F3A8 (component and extras dropped); twemoji: 3 joinable of 4
    assert counts["train"] == {"openmoji": 4, "twemoji": 3}
    files = _images(out)
    assert "train/05_activities/openmoji_1f3a8.png" in files
    assert "train/01_people-body/twemoji_1f44b-1f3ff.png" in files
    im = Image.open(out / "train/00_smileys-emotion/twemoji_1f600.png")
    assert im.size == (96, 96) and im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = im.getpixel((48, 48))
    assert r > 200 and b < 100  # the yellow disc was drawn
    lic = (out / "LICENSE.txt").read_text()
    assert "CC BY-SA 4.0" in lic and "ShareAlike" in lic and "CC-BY 4.0" in lic
    sub = build_emoji(tmp_path / "t", emoji_src, size=96, sources=["openmoji"], label="subcategory", val_fraction=0.0)
    assert sub["train"] == {"openmoji": 3}  # arts-crafts is no subcategory of this emoji.json: dropped
    assert json.loads((tmp_path / "t" / "classes.json").read_text())[:2] == ["face-smiling", "hand-fingers-open"]


def test_emoji_errors(emoji_src: Path, tmp_path: Path) -> None:
    with pytest.raises(HMARError, match=r"npm pack emoji-datasource-google@16\.0\.0"):
        build_emoji(tmp_path / "o", tmp_path / "empty", sources=["google"])
    with pytest.raises(HMARError, match=r"npm pack @twemoji/svg@15\.0\.0"):
        build_emoji(tmp_path / "o", tmp_path / "empty", size=128, sources=["twemoji"])
    with pytest.raises(HMARError, match="upscale"):
        build_emoji(tmp_path / "o", emoji_src, size=256, sources=["google"])
    with pytest.raises(HMARError, match="unknown emoji source 'apple'"):
        build_emoji(tmp_path / "o", emoji_src, sources=["apple"])
    with pytest.raises(HMARError, match="--label"):
        build_emoji(tmp_path / "o", emoji_src, label="colour")


def test_cli_emoji(emoji_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "emoji", "--source", str(emoji_src), "--out", str(tmp_path / "c"), "--size", "16",
                 "--sources", "google", "--val-fraction", "0", "--workers", "1"]) == 0
    assert "train: 6 images" in capsys.readouterr().out
    assert main(["data", "emoji", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "d"),
                 "--sources", "twitter"]) == 2
    assert "npm pack emoji-datasource-twitter@16.0.0" in capsys.readouterr().err
