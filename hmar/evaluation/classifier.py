"""A small in-domain CNN classifier: trained on a dataset's image folder, it scores generated samples
by (a) accuracy against their requested class and (b) a Fréchet distance in its penultimate
feature space. Saved as ``model.safetensors`` plus ``model.json`` (the config) beside it."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..datasets.folder import UNREADABLE_IMAGE, load_image, load_image_folder
from ..errors import HMARError
from ..fileio import atomic_path, ensure_writable_dir

ARCH = "hmar-small-cnn-v1"
MIN_IMAGE_SIZE = 8   # the smallest side the three 2x downsamplings leave a pixel of


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild the classifier (stored as JSON beside the weights)."""

    num_classes: int
    class_names: List[str]
    image_size: int = 32
    width: int = 32
    arch: str = ARCH
    train: Dict[str, object] = field(default_factory=dict)  # how it was trained, and its accuracy

    @property
    def feature_dim(self) -> int:
        """Size of the penultimate features."""
        return 4 * self.width


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Strided stem (w), conv (2w), pool, conv (4w), pool, conv (4w), global average pool, linear head.

    Sized for CPU training: about 12M multiply-adds per 32x32 image at w=32.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        w = cfg.width
        self.body = nn.Sequential(
            _conv(3, w, stride=2), _conv(w, 2 * w), nn.MaxPool2d(2),
            _conv(2 * w, 4 * w), nn.MaxPool2d(2), _conv(4 * w, 4 * w),
        )
        self.head = nn.Linear(4 * w, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 4w]`` of normalised images."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _normalise(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0, 1] ``[N, C, H, W]`` -> float ``[N, 3, size, size]`` in [-1, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2 - 1


class ClassifierExtractor(nn.Module):
    """A trained classifier used as a feature extractor (``forward``) and for predictions (``predict``)."""

    def __init__(self, model: SmallCNN, cfg: ClassifierConfig, name: str):
        super().__init__()
        self.model, self.cfg, self.name = model.eval(), cfg, name
        self.feature_dim = cfg.feature_dim

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(_normalise(images.to(self._device()), self.cfg.image_size))

    @torch.no_grad()
    def logits_from_features(self, features: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """Class logits from penultimate features (so one pass gives both)."""
        f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        return self.model.head(f.to(self._device(), torch.float32))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class index per image."""
        return self.logits_from_features(self(images)).argmax(1)


def load_folder_tensor(root: Path, size: int, class_names: Optional[List[str]] = None,
                       progress: Optional[Callable[[str], None]] = None) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """All readable labelled images of a class-folder tree as ``uint8 [N, 3, size, size]`` plus labels (an
    unreadable file is skipped with a warning through ``progress``, as the trainers skip it)."""
    folder = load_image_folder(root, class_names)
    keep = [i for i, lab in enumerate(folder.labels) if lab >= 0]
    if not keep:
        raise HMARError(f"{root} has no class folders; the classifier needs <class>/<image> folders")
    if progress:
        progress(f"loading {len(keep)} images from {root}")
    images, labels = [], []
    for i in keep:
        try:
            images.append(load_image(folder.files[i], size))
        except UNREADABLE_IMAGE as e:
            if progress:
                progress(f"warning: skipping unreadable image {folder.files[i]} ({type(e).__name__}: {e})")
            continue
        labels.append(folder.labels[i])
    if not images:
        raise HMARError(f"none of the {len(keep)} images under {root} could be read: re-save them as PNG or JPEG")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long), folder.class_names


def _first_size(files: List[Path], root: Path) -> Tuple[Path, int]:
    """The first readable image of ``files`` and its height."""
    for f in files:
        try:
            return f, load_image(f).shape[0]
        except UNREADABLE_IMAGE:
            continue
    raise HMARError(f"none of the {len(files)} images under {root} could be read: re-save them as PNG or JPEG")


def _splits(data: Path) -> Tuple[Path, Optional[Path]]:
    """Training folder and held-out folder (``val`` or ``test``) of a dataset root, or the folder itself."""
    if (data / "train").is_dir():
        held = next((data / s for s in ("val", "test") if (data / s).is_dir()), None)
        return data / "train", held
    return data, None


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` with labels ``y``."""
    model.eval()
    correct = 0
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        logits = model(_normalise(x[i:i + batch_size].to(dev), size))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def train_classifier(data: Union[str, Path], out: Union[str, Path], epochs: int = 2, batch_size: int = 128,
                     lr: float = 2e-3, width: int = 32, image_size: Optional[int] = None, seed: int = 0,
                     max_minutes: Optional[float] = None, device: Union[str, torch.device] = "cpu",
                     progress: Optional[Callable[[str], None]] = None) -> ClassifierConfig:
    """Train on ``data`` (a dataset root with ``train/`` or a class-folder tree) and save to ``out``.

    AdamW with a cosine schedule and random 2-pixel shifts; returns the saved config, whose
    ``train`` entry holds the held-out accuracy when ``val/`` or ``test/`` exists.
    """
    data, out = Path(data), Path(out)
    if out.suffix != ".safetensors":
        raise HMARError(f"--out must end in .safetensors (the config goes beside it as .json), got {out.name}")
    if epochs < 1 or batch_size < 1 or width < 1:
        raise HMARError(f"epochs, batch size and width must be positive, got {epochs}, {batch_size}, {width}")
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise HMARError(f"--image-size must be at least {MIN_IMAGE_SIZE} (the CNN downsamples 8x), got {image_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise HMARError(f"--lr must be a positive number, got {lr}")
    if max_minutes is not None and not max_minutes > 0:
        raise HMARError(f"--max-minutes must be positive, got {max_minutes}")
    ensure_writable_dir(out.parent, "--out")   # before the training, not after it
    say = progress or (lambda msg: None)
    train_dir, held_dir = _splits(data)
    if image_size is None:   # the first readable image's size (unreadable files are skipped, with a warning, below)
        first, image_size = _first_size(load_image_folder(train_dir).files, train_dir)
        if image_size < MIN_IMAGE_SIZE:
            raise HMARError(f"{first} is {image_size} px, below the classifier's {MIN_IMAGE_SIZE}: pass "
                            f"--image-size {MIN_IMAGE_SIZE} or more (images are resized to it)")
    x, y, names = load_folder_tensor(train_dir, image_size, progress=say)
    if len(names) < 2:
        raise HMARError(f"{train_dir} holds {len(names)} class: a classifier needs at least 2 class folders "
                        "(with one, every sample would count as correctly classified)")
    held = load_folder_tensor(held_dir, image_size, names, progress=say) if held_dir is not None else None
    cfg = ClassifierConfig(num_classes=len(names), class_names=names, image_size=image_size, width=width)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        model = SmallCNN(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start, step, stopped_early = time.time(), 0, False
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        running = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = _normalise(x[idx], image_size)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if max_minutes is not None and time.time() - start > 60 * max_minutes:
                stopped_early = True
                break
        say(f"epoch {epoch + 1}/{epochs}: loss {running / max(1, (i // batch_size) + 1):.4f} "
            f"({time.time() - start:.0f} s)")
        if stopped_early:
            say(f"stopping after {max_minutes} minutes (--max-minutes)")
            break
    sub = max(1, len(x) // 5000)  # an evenly spread subset of at most ~5k training images
    info: Dict[str, object] = {"data": str(data), "train_images": len(x), "epochs": epochs, "steps": step,
                               "batch_size": batch_size, "lr": lr, "seed": seed,
                               "seconds": round(time.time() - start, 1), "stopped_early": stopped_early,
                               "train_accuracy_5k": accuracy(model, x[::sub], y[::sub], image_size)}
    if held is not None:   # loaded before training: a held-out split that does not match fails at once
        hx, hy, _ = held
        info.update(held_out=str(held_dir), held_out_images=len(hx), held_out_accuracy=accuracy(model, hx, hy, image_size))
    cfg.train = info
    save_classifier(model, cfg, out)
    return cfg


def save_classifier(model: SmallCNN, cfg: ClassifierConfig, out: Path) -> None:
    """Write ``out`` (safetensors weights) and ``out.with_suffix('.json')`` (config)."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    # both written before either is renamed: an interrupted save leaves the previous pair (or none), never half
    with atomic_path(out) as tmp_w, atomic_path(out.with_suffix(".json")) as tmp_m:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp_w),
                  metadata={"format": ARCH})
        tmp_m.write_text(json.dumps(asdict(cfg), indent=1) + "\n")


def load_classifier(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> ClassifierExtractor:
    """Load a classifier saved by :func:`train_classifier` (weights path; config read beside it)."""
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():   # the folder train-classifier wrote into
        path = path / "model.safetensors"
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise HMARError(f"classifier {path} (and its config {meta.name}) not found; train one with "
                        "`hmar train-classifier --data DIR --out model.safetensors`")
    retrain = "; pass a classifier written by `hmar train-classifier` (or train one again)"
    try:
        raw = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HMARError(f"{meta} is not a classifier config (not JSON: {e}){retrain}") from e
    if not isinstance(raw, dict) or raw.get("arch") != ARCH:
        arch = raw.get("arch") if isinstance(raw, dict) else None
        raise HMARError(f"{meta} describes architecture {arch!r}, expected {ARCH!r}{retrain}")
    try:
        cfg = ClassifierConfig(**raw)
        model = SmallCNN(cfg)
    except (TypeError, ValueError, RuntimeError) as e:   # missing / unknown keys, a width or class count of 0
        raise HMARError(f"{meta} is not a valid classifier config ({e}){retrain}") from e
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as e:   # safetensors' own error type for a file that is not safetensors; shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise HMARError(f"{path} does not hold the weights {meta.name} describes ({first}){retrain}") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return ClassifierExtractor(model, cfg, f"classifier-{digest}").to(device)
