"""Zero-shot image editing: in-painting, out-painting and class-conditional editing.

No training is involved. The source image is encoded into its multi-scale tokens; at every scale
the tokens outside the edit region are *known* (the source's) and only the tokens inside the region
are generated, with :func:`hmar.sampling.sample` and its ``constraints``. For an HMAR model the known
tokens are written over the next-scale draft and act as same-scale context for masked passes that
re-predict the region (the masked branch was trained on uniformly random masks at every scale, so
this is in distribution); for VAR and stage-1 models (no masked branch) the draft is overwritten at
the known positions and the known content reaches the region through the coarse context of the
next scales, as in VAR's editing notebook.

Rules (each is tested in ``tests/test_editing.py``):

* **Inputs.** An image is a path, ``bytes``, a PIL image, a numpy array ``HxW``/``HxWxC``
  (C = 1, 3 or 4; alpha dropped) or a torch tensor ``CxHxW``/``1xCxHxW``. uint8 data is 0..255;
  float data must lie in ``value_range`` (default ``(0, 1)``; pass ``(-1, 1)`` for the tokenizer's
  range) or :class:`HMARError` is raised. EXIF orientation is applied; only the first frame of an
  animation is used. More than ``max_pixels`` pixels (default 50 MP) is refused from the file
  header, before decoding.
* **Resize and crop** (:func:`fit_geometry`). The image is scaled so that its *shorter* side equals
  the model resolution ``R`` (Lanczos; ``round(side * R / shorter)`` for the longer side), then the
  central ``R x R`` square is cut out (offsets ``(W' - R) // 2``, ``(H' - R) // 2``). An image that
  is already ``R x R`` is used as is. Everything outside that square is ignored.
* **Masks.** Same input kinds as images. White (any channel > 127 of 255), ``True``, > 0.5 for
  floats, above half the range for 16-bit and float mask files, non-zero for other integer arrays = *edit*;
  black = keep. For a mask with transparency
  (a painted layer: alpha not all opaque) the alpha channel decides (> 127 = edit), whatever the
  stroke colour. A mask **must have the image's size** (width and height of the input, before any
  resizing), otherwise :class:`HMARError`. It then follows the image's geometry: a model pixel is in
  the region when its footprint in the input mask touches any region pixel (area-average > 0, the
  same operator as the token rule below; deliberately not nearest-neighbour, which could drop thin
  strokes).
* **Per-scale region rule** (:func:`scale_regions`). ``coverage_k = area(mask, pn_k)`` is the
  fraction of each token's pixel footprint covered by the mask (PyTorch's ``area`` resize = adaptive
  average pooling: token ``(i, j)`` of side ``pn`` covers rows ``floor(i R / pn) .. ceil((i+1) R / pn) - 1``
  and the same columns). A token is *in the region* (generated) when

  - at the **last** scale: ``coverage > 0``: any touch. The last scale maps 1:1 to latent pixels, so
    every painted pixel is re-generated and the tokens along the boundary (the seam) are generated;
  - at **coarser** scales: ``coverage > 0.5``: the region covers the majority of the token.
    The tokenizer is residual: the kept fine tokens outside the region are residuals *on top of*
    the source's coarse tokens, so re-generating a coarse token that is mostly outside the region
    would shift the appearance outside it (a small hole would even re-draw the global 1x1 token).
    (VAR's editing notebook likewise thresholds a bilinearly resized mask at 0.5.)

  So a full mask generates everything (plain sampling of ``class_label``, the source is ignored) and
  an empty mask (also: a mask whose painted part lies outside the centre crop) keeps everything: the
  result is the tokenizer's reconstruction of the source, no sampling is run.
* **What "unchanged outside" means**, and how it is measured. (1) Tokens: outside the per-scale
  region the output's token maps equal the source's, exactly, at every scale. (2) Latent: generated
  coarse tokens spread beyond their cell (bicubic up-sampling, 3x3 phi convs), so with
  ``composite="latent"`` the accumulated latent ``f_hat`` outside the last-scale region is
  replaced by the source's: it then equals the source's exactly, and the decoder renders the seam.
  (3) Pixels: the decoder still mixes latent pixels (3x3 convs locally; GroupNorm statistics and
  self-attention globally), so decoded pixels outside are close to, not equal to, the reconstruction.
  ``composite="pixels"`` (default) also pastes the reconstruction's pixels back outside the last-scale region
  (whole ``downsample x downsample`` cells, i.e. the painted area grown to the token grid): the pixels
  there then equal the reconstruction exactly, at the price of a possible hard seam.
  ``composite="none"`` keeps the pure token-level result (VAR's notebook: the surroundings drift).
* **Out-painting** (:func:`outpaint_canvas`). The image is placed on a larger canvas
  (``pad=(left, top, right, bottom)`` in input pixels, or ``target_size=(W, H)`` with the image
  centred); a non-square canvas is centred on a square of its longer side, so that nothing of it is
  cropped away (the extra letterbox is generated too). Everything but the image is the edit region.
  The new area is filled by replicating the image's edge pixels before encoding: this only matters
  for the coarse tokens that the new area covers less than half of.
* **Conditioning.** ``class_label=None`` is unconditional (the null class, as VAR does for in- and
  out-painting); a class id or name edits toward that class (:func:`class_edit`).
* **Seeds.** ``generator`` (int seed, ``torch.Generator`` or None) gives one image; ``seeds=[...]``
  gives one image per seed in one call, each identical to a call with that seed alone.
* **Schedule.** ``schedule=None`` uses the editing schedule (:func:`edit_schedule`): the model's
  default masked-step schedule, plus one masked pass over the region at every other scale >= 1.
"""
from __future__ import annotations

import io
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .datasets.folder import UNREADABLE_IMAGE, WIDE_GRAY_MODES, gray_unit, to_rgb
from .errors import HMARError
from .presets import resolve_schedule
from .sampling import StepInfo, class_id, make_generator, sample

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

    from .pipeline import HMARPipeline

COMPOSITE_MODES = ("latent", "pixels", "none")
MAX_PIXELS = 50_000_000          # refuse larger inputs (checked from the header, before decoding)
PAD_MODE = "edge"                # how out-painting fills the canvas before encoding
ImageInput = Union[str, os.PathLike, bytes, "PILImage.Image", np.ndarray, torch.Tensor]
Seed = Union[int, torch.Generator, None]
PipeLike = Union["HMARPipeline", Tuple[nn.Module, nn.Module]]

__all__ = ["inpaint", "outpaint", "class_edit", "edit", "EditOutput", "load_image", "load_mask",
           "fit_geometry", "fit_image", "fit_mask", "scale_regions", "edit_schedule", "outpaint_canvas",
           "MAX_PIXELS"]


@dataclass
class EditOutput:
    """Everything an edit produced (``return_tokens=True``)."""
    images: List["PILImage.Image"]          # one per seed, R x R
    indices: List[torch.Tensor]             # per scale [N, pn^2]: the edited token maps
    source_indices: List[torch.Tensor]      # per scale [1, pn^2]: the source's token maps
    regions: List[torch.Tensor]             # per scale bool [pn, pn]: True = generated
    source: "PILImage.Image"                # the source after resize/crop (what was encoded)
    reconstruction: "PILImage.Image"        # the tokenizer's reconstruction of ``source``
    mask: "PILImage.Image"                  # the edit region at R x R ("L": 255 = edit)
    f_hat: Optional[torch.Tensor] = None    # [N, Cz, h, w]: the latent that was decoded (after compositing)
    seeds: List[Any] = field(default_factory=list)


# ------------------------------------------------------------------------------ inputs
def _check_pixels(w: int, h: int, max_pixels: Optional[int], what: str) -> None:
    if w < 1 or h < 1:
        raise HMARError(f"the {what} is empty ({w}x{h} pixels)")
    if max_pixels is not None and w * h > max_pixels:
        raise HMARError(f"the {what} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
                        f"(max_pixels; --max-pixels in the CLI): downscale it first or raise the limit")


def _open_pil(src: Union[str, os.PathLike, bytes], max_pixels: Optional[int], what: str) -> "PILImage.Image":
    """Open an image file (or bytes) lazily, check its size from the header, then decode it."""
    from PIL import Image, UnidentifiedImageError

    from .datasets.folder import upright
    name = "the uploaded data" if isinstance(src, (bytes, bytearray)) else repr(os.fspath(src))
    if not isinstance(src, (bytes, bytearray)):
        p = os.fspath(src)
        if not os.path.exists(p):
            raise HMARError(f"{what} file {p!r} does not exist: check the path")
        if os.path.isdir(p):
            raise HMARError(f"{what} path {p!r} is a directory: pass an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src))
            _check_pixels(im.width, im.height, max_pixels, what)
            im = upright(im)                             # decode (only after the size check), EXIF orientation
    except HMARError:
        raise
    except UnidentifiedImageError:
        raise HMARError(f"{what}: {name} is not an image file that Pillow can read "
                        f"(PNG, JPEG, WebP, BMP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HMARError(f"{what}: {name} has too many pixels (decompression-bomb limit): downscale it first") from None
    except UNREADABLE_IMAGE as e:
        raise HMARError(f"{what}: {name} could not be decoded ({type(e).__name__}: {str(e)[:100]})") from None
    return im


def _to_hwc(x: Union[np.ndarray, torch.Tensor], what: str) -> np.ndarray:
    """An array as ``H x W x C``: numpy is HWC/HW, torch is CHW / 1xCxHxW / HxW."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise HMARError(f"the {what} tensor has batch size {t.shape[0]}: pass one image (1xCxHxW or CxHxW)")
            t = t[0]
        if t.dim() == 3:
            if t.shape[0] not in (1, 2, 3, 4):
                raise HMARError(f"the {what} tensor has shape {tuple(x.shape)}: tensors are CxHxW or 1xCxHxW "
                                f"with C in 1..4 (numpy arrays are HxWxC)")
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise HMARError(f"the {what} tensor has shape {tuple(x.shape)}: expected CxHxW, 1xCxHxW or HxW")
        if t.dtype == torch.bfloat16:
            t = t.float()
        a = t.numpy()
    else:
        a = np.asarray(x)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise HMARError(f"the {what} array has shape {tuple(a.shape)}: numpy arrays are HxW or HxWxC with C in "
                        f"1..4 (torch tensors are CxHxW)")
    return a


def _array_to_unit(a: np.ndarray, value_range: Tuple[float, float], what: str) -> np.ndarray:
    """uint8 / integer / float data -> float32 in [0, 1]."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == bool:
        raise HMARError(f"the {what} is a boolean array: pass uint8 (0..255) or float data")
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise HMARError(f"the {what} has integer values outside 0..255: pass uint8 or float data")
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise HMARError(f"the {what} has dtype {a.dtype}: pass uint8 or float data")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise HMARError(f"the {what} contains NaN or infinite values")
    lo, hi = float(value_range[0]), float(value_range[1])
    if hi <= lo:
        raise HMARError(f"value_range {value_range} must be (low, high) with low < high")
    tol = 1e-3 * (hi - lo)
    if a.size and (a.min() < lo - tol or a.max() > hi + tol):
        other = "(-1, 1)" if lo >= 0 else "(0, 1)"
        raise HMARError(f"the {what}'s values span [{a.min():.3g}, {a.max():.3g}], outside value_range=({lo:g}, {hi:g}): "
                        f"pass value_range={other} if that is its range, or rescale it")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def load_image(src: ImageInput, *, max_pixels: Optional[int] = MAX_PIXELS,
               value_range: Tuple[float, float] = (0.0, 1.0), what: str = "image") -> "PILImage.Image":
    """Any supported image input -> an RGB PIL image at its own size (see the module docstring)."""
    from PIL import Image
    if isinstance(src, (str, os.PathLike, bytes, bytearray)):
        src = _open_pil(src, max_pixels, what)
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, max_pixels, what)
        if src.mode in WIDE_GRAY_MODES:   # scaled by the mode's range, as the trainers read it
            return to_rgb(src)
        return src.convert("RGB") if src.mode != "RGB" else src
    if isinstance(src, (np.ndarray, torch.Tensor)):
        a = _to_hwc(src, what)
        _check_pixels(a.shape[1], a.shape[0], max_pixels, what)
        a = _array_to_unit(a, value_range, what)
        if a.shape[2] in (2, 4):
            a = a[:, :, :-1]                                # drop alpha
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        return Image.fromarray((a * 255.0).round().astype(np.uint8), "RGB")
    raise HMARError(f"unsupported {what} type {type(src).__name__}: pass a path, bytes, a PIL image, "
                    f"a numpy array (HxWxC) or a torch tensor (CxHxW)")


def _mask_from_unit(a: np.ndarray) -> np.ndarray:
    """HxWxC float in [0, 1] -> bool HxW: alpha decides when there is transparency, else the brightest channel."""
    if a.shape[2] in (2, 4):
        alpha = a[:, :, -1]
        if alpha.size and alpha.min() < 1.0:
            return alpha > 0.5
        a = a[:, :, :-1]
    return a.max(axis=2) > 0.5


def load_mask(src: ImageInput, *, max_pixels: Optional[int] = MAX_PIXELS, what: str = "mask") -> np.ndarray:
    """Any supported mask input -> bool ``H x W`` (True = edit), at its own size (see the module docstring)."""
    from PIL import Image
    if isinstance(src, (str, os.PathLike, bytes, bytearray)):
        src = _open_pil(src, max_pixels, what)
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, max_pixels, what)
        if src.mode in WIDE_GRAY_MODES:   # white = edit: above half of the mode's range
            return gray_unit(src) > 0.5
        if src.mode == "P":
            src = src.convert("RGBA")
        if src.mode not in ("L", "LA", "RGB", "RGBA"):
            src = src.convert("RGBA" if "A" in src.getbands() else "RGB")
        a = np.asarray(src)
        return _mask_from_unit((a if a.ndim == 3 else a[:, :, None]).astype(np.float32) / 255.0)
    if isinstance(src, (np.ndarray, torch.Tensor)):
        if isinstance(src, torch.Tensor) and src.dim() == 3 and src.shape[0] > 4 and src.shape[-1] in (1, 3, 4):
            raise HMARError(f"the {what} tensor has shape {tuple(src.shape)}: tensors are CxHxW (numpy arrays are HxWxC)")
        a = _to_hwc(src, what)
        _check_pixels(a.shape[1], a.shape[0], max_pixels, what)
        if a.dtype == bool:
            return a.any(axis=2)
        if a.dtype == np.uint8:
            return _mask_from_unit(a.astype(np.float32) / 255.0)
        if np.issubdtype(a.dtype, np.integer):
            return (a != 0).any(axis=2)
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise HMARError(f"the {what} contains NaN or infinite values")
            return _mask_from_unit(a)
        raise HMARError(f"the {what} has dtype {a.dtype}: pass bool, uint8 or float data")
    raise HMARError(f"unsupported {what} type {type(src).__name__}: pass a path, bytes, a PIL image, "
                    f"a numpy array (HxW) or a torch tensor (HxW)")


# ------------------------------------------------------------------------------ geometry
def fit_geometry(width: int, height: int, resolution: int) -> Tuple[Tuple[int, int], Tuple[int, int, int, int]]:
    """The resize/crop rule: ``((W', H'), (left, top, right, bottom))``: scale so the shorter side is
    ``resolution`` (the longer one rounded), then cut the central ``resolution`` square."""
    s = resolution / min(width, height)
    w2 = resolution if width <= height else max(resolution, int(round(width * s)))
    h2 = resolution if height <= width else max(resolution, int(round(height * s)))
    left, top = (w2 - resolution) // 2, (h2 - resolution) // 2
    return (w2, h2), (left, top, left + resolution, top + resolution)


def fit_image(img: "PILImage.Image", resolution: int) -> "PILImage.Image":
    """Resize (Lanczos, shorter side -> ``resolution``) and centre-crop an RGB image to ``resolution``^2."""
    from PIL import Image
    (w2, h2), box = fit_geometry(img.width, img.height, resolution)
    if (img.width, img.height) != (w2, h2):
        img = img.resize((w2, h2), Image.LANCZOS)
    return img.crop(box) if (w2, h2) != (resolution, resolution) else img


def fit_mask(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """The same geometry for a bool mask; a model pixel is in the region if its footprint touches the
    region (area resize, > 0). Returns bool ``[resolution, resolution]``."""
    h, w = mask.shape
    (w2, h2), (l, t, r, b) = fit_geometry(w, h, resolution)
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    if (w, h) != (w2, h2):
        m = F.interpolate(m, size=(h2, w2), mode="area")
    return m[0, 0, t:b, l:r] > 0


def scale_regions(mask: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """The per-scale region rule: bool ``[pn, pn]`` per scale, True = generated.
    ``coverage = area(mask, pn)``; last scale ``coverage > 0``, coarser scales ``coverage > 0.5``."""
    m = mask.float()[None, None]
    out = []
    for si, pn in enumerate(patch_nums):
        cov = F.interpolate(m, size=(pn, pn), mode="area")[0, 0]
        out.append(cov > 0 if si == len(patch_nums) - 1 else cov > 0.5)
    return out


def _int_tuple(values: Any, what: str) -> List[int]:
    """A sequence (list, tuple, array) of integers as a list, or :class:`HMARError` naming the expected form."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    ok = isinstance(values, (list, tuple)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                    for v in values)
    if not ok:
        raise HMARError(f"{what} must be a list or tuple of integers, got {values!r}")
    return [int(v) for v in values]


def outpaint_canvas(img: "PILImage.Image", pad: Optional[Sequence[int]] = None,
                    target_size: Optional[Sequence[int]] = None, *,
                    max_pixels: Optional[int] = MAX_PIXELS) -> Tuple["PILImage.Image", np.ndarray]:
    """The square out-painting canvas and its mask (True = to generate).

    The image is extended by ``pad=(left, top, right, bottom)`` pixels, or centred on a
    ``target_size=(W, H)`` canvas (an odd remainder goes right/bottom); a non-square canvas is then
    centred on a square of its longer side (letterbox), so that the resize/crop rule keeps all of it.
    Everything but the image is the region, filled by replicating the image's edge pixels."""
    from PIL import Image
    if (pad is None) == (target_size is None):
        raise HMARError("out-painting needs exactly one of pad=(left, top, right, bottom) or target_size=(W, H)")
    w, h = img.size
    if pad is not None:
        pad = _int_tuple(pad, "pad=(left, top, right, bottom)")
        if len(pad) != 4 or min(pad) < 0:
            raise HMARError(f"pad must be 4 non-negative integers (left, top, right, bottom), got {pad}")
        l, t, r, b = pad
    else:
        ts = _int_tuple(target_size, "target_size=(W, H)")
        if len(ts) != 2 or ts[0] < w or ts[1] < h:
            raise HMARError(f"target_size must be (W, H) at least the image size {w}x{h}, got {tuple(target_size)}")
        l, t = (ts[0] - w) // 2, (ts[1] - h) // 2
        r, b = ts[0] - w - l, ts[1] - h - t
    W, H = w + l + r, h + t + b
    S = max(W, H)
    _check_pixels(S, S, max_pixels, "out-painting canvas")
    l, t = l + (S - W) // 2, t + (S - H) // 2            # letterbox to a square
    r, b = S - w - l, S - h - t
    a = np.pad(np.asarray(img.convert("RGB")), ((t, b), (l, r), (0, 0)), mode=PAD_MODE)
    m = np.ones((S, S), dtype=bool)
    m[t:t + h, l:l + w] = False
    return Image.fromarray(a, "RGB"), m


def edit_schedule(base: Sequence[Sequence[int]], patch_nums: Sequence[int]) -> List[List[int]]:
    """``base`` plus one masked pass (``[1, n - 1]``) at every scale >= 1 that has none, so that the
    masked branch re-predicts the region with the known tokens of that scale as context."""
    out = []
    for si, (s, pn) in enumerate(zip(base, patch_nums)):
        n = pn * pn
        out.append([1, n - 1] if si > 0 and len(s) == 1 and n > 1 else list(s))
    return out


# ------------------------------------------------------------------------------ core
def _unpack(pipe: PipeLike) -> Tuple[nn.Module, nn.Module, Dict[str, Any], Optional[List[str]]]:
    from .pipeline import DEFAULT_SAMPLING
    if hasattr(pipe, "model") and hasattr(pipe, "tokenizer"):
        return pipe.model, pipe.tokenizer, dict(pipe.sampling), pipe.class_names
    if isinstance(pipe, (tuple, list)) and len(pipe) == 2:
        model, tok = pipe
        return model, tok, dict(DEFAULT_SAMPLING), getattr(model.config, "class_names", None)
    raise HMARError(f"expected an HMARPipeline or a (model, tokenizer) pair, got {type(pipe).__name__}")


def _label(label: Union[int, str, None], names: Optional[List[str]], num_classes: int) -> int:
    lab = -1 if label is None else class_id(label, names)
    if not -1 <= lab < num_classes:
        raise HMARError(f"class id {lab} is out of range: this model has {num_classes} classes "
                        f"(0..{num_classes - 1}; None or -1 for unconditional)")
    return lab


def _to_pil(x: torch.Tensor) -> List["PILImage.Image"]:
    from .pipeline import to_pil
    return to_pil(x)


@torch.no_grad()
def edit(pipe: PipeLike, image: ImageInput, mask: ImageInput, class_label: Union[int, str, None] = None, *,
         generator: Seed = 0, seeds: Optional[Sequence[int]] = None, cfg: Optional[float] = None,
         top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: Optional[float] = None,
         schedule: Any = None, guide_masked: Optional[bool] = None, composite: Union[str, bool] = "pixels",
         value_range: Tuple[float, float] = (0.0, 1.0), max_pixels: Optional[int] = MAX_PIXELS,
         return_tokens: bool = False, callback: Optional[Callable[[StepInfo], None]] = None,
         ) -> Union[List["PILImage.Image"], EditOutput]:
    """Regenerate the ``mask`` region of ``image`` (the common core of in-painting, out-painting and
    class editing). Sampling options default to the pipeline's; see the module docstring for the rules.
    Returns one PIL image per seed, or an :class:`EditOutput` with ``return_tokens=True``."""
    model, tok, defaults, names = _unpack(pipe)
    composite = {True: "latent", False: "none"}.get(composite, composite) if isinstance(composite, bool) else composite
    if composite not in COMPOSITE_MODES:
        raise HMARError(f"composite={composite!r} is unknown: use one of {', '.join(COMPOSITE_MODES)}")
    img = load_image(image, max_pixels=max_pixels, value_range=value_range)
    m = load_mask(mask, max_pixels=max_pixels)
    if m.shape != (img.height, img.width):
        raise HMARError(f"the mask is {m.shape[1]}x{m.shape[0]} but the image is {img.width}x{img.height} "
                        f"(width x height): the mask must have the image's size (white = edit, black = keep)")
    return _edit_fitted(model, tok, defaults, names, img, m, class_label, generator=generator, seeds=seeds,
                        cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, schedule=schedule,
                        guide_masked=guide_masked, composite=composite, return_tokens=return_tokens,
                        callback=callback)


def _edit_fitted(model, tok, defaults, names, img, m, class_label, *, generator, seeds, cfg, top_k, top_p,
                 temperature, schedule, guide_masked, composite, return_tokens, callback):
    from PIL import Image
    cfgm = model.config
    patch_nums = tuple(cfgm.patch_nums)
    if tuple(tok.patch_nums) != patch_nums:
        tok.set_patch_nums(patch_nums)
    R = tok.config.patch_nums[-1] * tok.config.downsample
    label = _label(class_label, names, cfgm.num_classes)
    opts = {**defaults, **{k: v for k, v in dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                                  guide_masked=guide_masked).items() if v is not None}}
    opts.pop("schedule", None)
    has_mask = hasattr(model, "masked_logits")
    sched = None
    if has_mask:
        sched = (resolve_schedule(schedule, patch_nums) if schedule is not None
                 else edit_schedule(resolve_schedule(defaults.get("schedule"), patch_nums), patch_nums))
    if seeds is not None:
        seed_list: List[Any] = _int_tuple(seeds, "seeds=[0, 1, ...]")
        if not seed_list:
            raise HMARError("seeds is empty: give at least one seed")
    else:
        seed_list = [generator]
    device = model.device
    for sd in seed_list:   # a bad seed (2**70, "abc") is refused before any seed's image is sampled
        make_generator(sd, device)

    src = fit_image(img, R)
    region_px = fit_mask(m, R)
    regions = scale_regions(region_px, patch_nums)
    x = torch.from_numpy(np.asarray(src, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device)
    src_idx = tok.img_to_indices(x)
    f_src = tok.indices_to_fhat(src_idx)
    last = regions[-1].to(device)
    need_recon = return_tokens or composite == "pixels" or not bool(last.any())
    recon = tok.fhat_to_img(f_src) if need_recon else None

    if not bool(last.any()):                 # nothing to generate: the reconstruction, exactly
        idx = [s.repeat(len(seed_list), 1) for s in src_idx]
        f_out = f_src.repeat(len(seed_list), 1, 1, 1)
        imgs = recon.repeat(len(seed_list), 1, 1, 1)
    else:
        constraints = []
        for s, reg in zip(src_idx, regions):
            keep = ~reg.flatten()[None].to(device)
            constraints.append(None if not bool(keep.any()) else (s, keep))
        per_scale: List[List[torch.Tensor]] = [[] for _ in patch_nums]
        fs = []
        for sd in seed_list:
            out = sample(model, tok, [label], constraints=constraints, generator=sd, decode=False, schedule=sched,
                         callback=callback, **opts)
            for k, t in enumerate(out.indices):
                per_scale[k].append(t)
            f = out.f_hat
            if composite != "none":
                f = torch.where(last[None, None], f, f_src)
            fs.append(f)
        idx = [torch.cat(t) for t in per_scale]
        f_out = torch.cat(fs)
        # one decode per seed: batched convolutions may round differently, and a seed's image must not
        # depend on which other seeds were asked for in the same call
        imgs = torch.cat([tok.fhat_to_img(f) for f in fs])
        if composite == "pixels":
            cell = F.interpolate(last[None, None].float(), size=(R, R), mode="nearest") > 0
            imgs = torch.where(cell, imgs, recon)
    pil = _to_pil((imgs + 1) / 2)
    if not return_tokens:
        return pil
    return EditOutput(images=pil, indices=idx, source_indices=src_idx, regions=[r.cpu() for r in regions],
                      source=src, reconstruction=_to_pil((recon + 1) / 2)[0],
                      mask=Image.fromarray(region_px.cpu().numpy().astype(np.uint8) * 255, "L"), f_hat=f_out,
                      seeds=seed_list)


def inpaint(pipe: PipeLike, image: ImageInput, mask: ImageInput, class_label: Union[int, str, None] = None,
            **kwargs: Any) -> Union[List["PILImage.Image"], EditOutput]:
    """In-painting: regenerate the white part of ``mask`` (same size as ``image``), unconditionally by
    default (``class_label=None``: the null class). ``kwargs``: see :func:`edit`."""
    return edit(pipe, image, mask, class_label, **kwargs)


def outpaint(pipe: PipeLike, image: ImageInput, pad: Optional[Sequence[int]] = None,
             target_size: Optional[Sequence[int]] = None, class_label: Union[int, str, None] = None,
             **kwargs: Any) -> Union[List["PILImage.Image"], EditOutput]:
    """Out-painting: extend ``image`` by ``pad=(left, top, right, bottom)`` pixels, or centre it on a
    ``target_size=(W, H)`` canvas, and generate the new border (the canvas then follows the
    resize/crop rule). ``kwargs``: see :func:`edit`."""
    max_pixels = kwargs.get("max_pixels", MAX_PIXELS)
    img = load_image(image, max_pixels=max_pixels, value_range=kwargs.pop("value_range", (0.0, 1.0)))
    canvas, m = outpaint_canvas(img, pad, target_size, max_pixels=max_pixels)
    return edit(pipe, canvas, m, class_label, **kwargs)


def class_edit(pipe: PipeLike, image: ImageInput, region_mask: ImageInput, new_class: Union[int, str],
               **kwargs: Any) -> Union[List["PILImage.Image"], EditOutput]:
    """Class-conditional editing: regenerate the ``region_mask`` part of ``image`` as class ``new_class``
    (an id or a name). ``kwargs``: see :func:`edit`."""
    if new_class is None or str(new_class).strip().startswith("-"):
        raise HMARError("class editing needs a real class (id or name) as new_class; use inpaint for unconditional edits")
    return edit(pipe, image, region_mask, new_class, **kwargs)
