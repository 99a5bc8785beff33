"""Fréchet distance between feature distributions, and cached statistics of reference folders.

The matrix square root is computed with symmetric eigendecompositions instead of
``scipy.linalg.sqrtm``: for covariances S1, S2 (symmetric PSD),
``tr sqrtm(S1 S2) = sum_i sqrt(lambda_i)`` where ``lambda_i`` are the eigenvalues of the
symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (``S1 S2`` and it have the same eigenvalues).
This is exact, real-valued by construction, and stable when the covariances are singular (fewer
images than feature dimensions), where ``sqrtm`` needs pytorch-fid's ``eps`` retry.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..datasets.folder import list_images
from ..errors import HMARError
from .features import Extractor, ImageSource, extract_features


def feature_stats(features: Union[np.ndarray, torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, float64) of features ``[N, D]``."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or len(f) < 2:
        raise HMARError(f"need at least 2 feature rows [N, D] for statistics, got shape {f.shape}")
    f = f.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2)`` (eigen-based, see the module doc)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise HMARError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, covariances "
                        f"{s1.shape} vs {s2.shape}; were they computed with the same extractor?")
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@dataclass
class ReferenceStats:
    """Feature statistics of one image set under one extractor (plus optional fp16 features for precision/recall)."""

    extractor: str
    source_hash: str
    count: int
    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None

    @classmethod
    def from_features(cls, features: np.ndarray, extractor: str, source_hash: str = "",
                      keep_features: bool = True) -> "ReferenceStats":
        """Statistics of ``features [N, D]``; keeps an fp16 copy of the features if asked."""
        mu, sigma = feature_stats(features)
        kept = np.asarray(features, dtype=np.float16) if keep_features else None
        return cls(extractor, source_hash, int(len(features)), mu, sigma, kept)

    def fid(self, other: "ReferenceStats") -> float:
        """Fréchet distance to another set's statistics (same extractor required)."""
        if self.extractor != other.extractor:
            raise HMARError(f"cannot compare statistics of extractor {self.extractor!r} with {other.extractor!r}")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: Union[str, Path]) -> Path:
        """Write to ``path`` (.npz); see :func:`save_stats` for several extractors in one file."""
        return save_stats(path, [self])


def save_stats(path: Union[str, Path], stats: Sequence[ReferenceStats]) -> Path:
    """Write statistics of one or more extractors into one ``.npz`` bundle (atomic rename)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise HMARError(f"statistics files end in .npz, got {path.name}")
    arrays: Dict[str, np.ndarray] = {"n_stats": np.array(len(stats))}
    for i, s in enumerate(stats):
        arrays.update({f"s{i}_extractor": np.array(s.extractor), f"s{i}_source_hash": np.array(s.source_hash),
                       f"s{i}_count": np.array(s.count), f"s{i}_mu": s.mu, f"s{i}_sigma": s.sigma})
        if s.features is not None:
            arrays[f"s{i}_features"] = s.features
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_stats(path: Union[str, Path]) -> Dict[str, ReferenceStats]:
    """Read a statistics bundle: extractor name -> :class:`ReferenceStats`."""
    path = Path(path)
    if not path.is_file():
        raise HMARError(f"statistics file {path} not found; create it with `hmar eval-reference`")
    try:
        with np.load(path, allow_pickle=False) as z:
            out: Dict[str, ReferenceStats] = {}
            for i in range(int(z["n_stats"])):
                s = ReferenceStats(str(z[f"s{i}_extractor"]), str(z[f"s{i}_source_hash"]), int(z[f"s{i}_count"]),
                                   z[f"s{i}_mu"], z[f"s{i}_sigma"],
                                   z[f"s{i}_features"] if f"s{i}_features" in z.files else None)
                out[s.extractor] = s
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:   # BadZipFile: a truncated file
        raise HMARError(f"{path} is not an hmar statistics file ({e}); recreate it with `hmar eval-reference`") from e
    return out


def folder_hash(folder: Path, extractor: str, files: Optional[List[Path]] = None) -> str:
    """SHA-256 of the extractor name, the folder's real path and its image list (relative paths, byte sizes and
    modification times): another folder of the same name and files, or an image rewritten in place at the same
    size, is a cache miss."""
    files = files if files is not None else list_images(folder)
    h = hashlib.sha256(f"{extractor}\n{os.path.realpath(folder)}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f.relative_to(folder).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def reference_stats(folder: Union[str, Path], extractors: Sequence[Extractor], cache_dir: Optional[Path] = None,
                    batch_size: int = 50, keep_features: bool = True,
                    progress: Optional[Callable[[int], None]] = None) -> Dict[str, ReferenceStats]:
    """Statistics of an image folder for each extractor, read from / written to ``cache_dir`` when given."""
    folder = Path(folder)
    files = list_images(folder)
    if len(files) < 2:
        raise HMARError(f"reference folder {folder} has {len(files)} images; FID needs at least 2")
    out: Dict[str, ReferenceStats] = {}
    todo: List[Extractor] = []
    for ext in extractors:
        digest = folder_hash(folder, ext.name, files)
        cached = cache_dir / f"{folder.name}-{digest[:16]}.npz" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                s = load_stats(cached).get(ext.name)
            except HMARError:   # an unreadable cache file is a cache miss: it is recomputed and rewritten
                s = None
            if s is not None and s.source_hash == digest and (s.features is not None or not keep_features):
                out[ext.name] = s
                continue
        todo.append(ext)
    if todo:
        feats = extract_features(files, todo, batch_size=batch_size, progress=progress)
        for ext, f in zip(todo, feats):
            digest = folder_hash(folder, ext.name, files)
            s = ReferenceStats.from_features(f, ext.name, digest, keep_features)
            if cache_dir is not None:
                s.save(Path(cache_dir) / f"{folder.name}-{digest[:16]}.npz")
            out[ext.name] = s
    return out


def _as_stats(x: Union[ImageSource, ReferenceStats], extractor: Extractor, batch_size: int,
              cache_dir: Optional[Path]) -> ReferenceStats:
    if isinstance(x, ReferenceStats):
        return x
    if isinstance(x, (str, Path)) and Path(x).suffix.lower() == ".npz":
        bundle = load_stats(x)
        if extractor.name not in bundle:
            raise HMARError(f"{x} holds statistics for {sorted(bundle)}, not for extractor {extractor.name!r}")
        return bundle[extractor.name]
    if isinstance(x, (str, Path)):
        return reference_stats(x, [extractor], cache_dir, batch_size, keep_features=False)[extractor.name]
    (f,) = extract_features(x, [extractor], batch_size=batch_size)
    return ReferenceStats.from_features(f, extractor.name, keep_features=False)


def compute_fid(a: Union[ImageSource, ReferenceStats], b: Union[ImageSource, ReferenceStats],
                extractor: Optional[Extractor] = None, batch_size: int = 50,
                cache_dir: Optional[Path] = None) -> float:
    """FID between two image sets: each a folder, a ``.npz`` statistics file, stats, or an image tensor.

    ``extractor`` defaults to the FID Inception (:func:`hmar.evaluation.inception.load_inception`).
    """
    if extractor is None:
        from .inception import load_inception
        extractor = load_inception()
    sa = _as_stats(a, extractor, batch_size, cache_dir)
    sb = _as_stats(b, extractor, batch_size, cache_dir)
    return sa.fid(sb)
