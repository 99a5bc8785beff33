"""``HMARPipeline``: the user-facing object that owns a transformer and its tokenizer.

>>> pipe = HMARPipeline.from_pretrained("path/to/model_dir")          # or the shipped default
>>> images = pipe(class_labels=[0, 1], num_images_per_label=2, guidance_scale=1.5,
...               generator=torch.Generator().manual_seed(0))          # list of PIL images
>>> pipe.save_pretrained("out_dir")
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .errors import HMARError
from .model import build_model
from .presets import model_config, tokenizer_config
from .sampling import SampleOutput, class_id, make_generator, sample
from .tokenizer import VQVAE

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

DEFAULT_SAMPLING: Dict[str, Any] = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0,
                                    "schedule": None, "guide_masked": False}
ASSETS = Path(__file__).parent / "assets"


def default_model_dir() -> Optional[Path]:
    """The model shipped inside the package (``hmar/assets/default``), or ``HMAR_DEFAULT_MODEL``; None if absent."""
    env = os.environ.get("HMAR_DEFAULT_MODEL")
    if env:
        return Path(env)
    d = ASSETS / "default"
    return d if (d / "config.json").exists() else None


def to_pil(images: torch.Tensor) -> List["PIL.Image.Image"]:  # noqa: F821
    """``[B, 3, H, W]`` in [0, 1] -> list of RGB PIL images."""
    from PIL import Image
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a ``torch.device``; :class:`HMARError` if it is malformed, holds no data (``meta``) or its
    backend is not available here (CUDA without a GPU, ``mps`` off a Mac, ...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HMARError(f"device {device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise HMARError(f"device {device!r} holds no data (shapes only): use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HMARError(f"device {device!r} asked for, but CUDA is not available here: use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HMARError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                            "GPU(s)")
        return dev
    # torch.backends.mps, torch.xpu, ...: their is_available()
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        alt = "'cuda' or 'cpu'" if torch.cuda.is_available() else "'cpu'"
        raise HMARError(f"device {device!r} asked for, but its backend is not available here: use {alt}")
    return dev


def _edit_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The editing functions' options, accepting ``guidance_scale=`` (the name ``__call__`` uses) for ``cfg=``."""
    if "guidance_scale" in kwargs:
        if "cfg" in kwargs:
            raise HMARError("pass either guidance_scale= or cfg= (the same option), not both")
        kwargs = dict(kwargs)
        kwargs["cfg"] = kwargs.pop("guidance_scale")
    return kwargs


def _label_list(labels: Any) -> List[Any]:
    """``labels`` as a list: a single id (numpy ints, 0-d tensors and arrays too) or name becomes a list of one
    (a string is one name, not its characters); anything that is not a sequence of labels is an error."""
    if isinstance(labels, (numbers.Integral, str)) or \
            (isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim == 0):
        return [labels.item() if isinstance(labels, (torch.Tensor, np.ndarray)) else labels]
    if not hasattr(labels, "__iter__"):
        raise HMARError(f"class_labels must be a class id, a class name or a list of them, got {labels!r}")
    return list(labels)


_OWN_SECTIONS = ("format", "version", "model", "tokenizer", "sampling")   # what save_pretrained writes itself


class HMARPipeline:
    """A transformer (HMAR, stage-1 or VAR) + its tokenizer + class names + sampling defaults."""

    def __init__(self, model: nn.Module, tokenizer: VQVAE, class_names: Optional[Sequence[str]] = None,
                 sampling: Optional[Dict[str, Any]] = None, is_random: bool = False,
                 extra: Optional[Dict[str, Any]] = None):
        self.model, self.tokenizer = model.eval(), tokenizer.eval()
        self.extra: Dict[str, Any] = dict(extra or {})   # config.json's other sections (e.g. "training"), kept on save
        tokenizer.set_patch_nums(model.config.patch_nums)
        self.class_names = list(class_names) if class_names else (model.config.class_names or None)
        self.sampling = {**DEFAULT_SAMPLING, **{k: v for k, v in (sampling or {}).items() if k in DEFAULT_SAMPLING}}
        self.is_random = is_random

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike, None] = None, *, vqvae: Optional[str] = None,
                        device: Union[str, torch.device] = "cpu", mask_checkpoint: Optional[str] = None
                        ) -> "HMARPipeline":
        """Load our model directory, or an official ``hmar-d*.pth`` / ``var_d*.pth`` plus ``vqvae``.
        ``path=None`` loads the default model shipped with the package."""
        device = check_device(device)
        if path is None:
            path = default_model_dir()
            if path is None:
                raise HMARError("no default model is shipped in this installation: pass a model directory or file")
        model, tok, config = ckpt.load_any(path, vqvae, device, mask_checkpoint)
        names = config.get("model", {}).get("class_names")
        extra = {k: v for k, v in config.items() if k not in _OWN_SECTIONS}
        return cls(model, tok, names, config.get("sampling"), extra=extra)

    @classmethod
    def from_preset(cls, model: str = "hmar-tiny", tokenizer: str = "vqvae-tiny", seed: int = 0,
                    device: Union[str, torch.device] = "cpu") -> "HMARPipeline":
        """A randomly initialised pipeline from preset names (for tests and demos; images are noise)."""
        device = check_device(device)
        with torch.random.fork_rng(devices=[]):          # seeded, without touching the caller's global RNG
            torch.manual_seed(seed)
            m = build_model(model_config(model)).to(device)
            t = VQVAE(tokenizer_config(tokenizer, patch_nums=m.config.patch_nums)).to(device)
        return cls(m, t, is_random=True)

    def save_pretrained(self, directory: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
        """Write the pipeline as ``config.json`` + safetensors files."""
        from .accel import FastDecoder, GraphedModel
        model = self.model.model if isinstance(self.model, GraphedModel) else self.model
        tok = self.tokenizer.tokenizer if isinstance(self.tokenizer, FastDecoder) else self.tokenizer
        if tok.decoder.conv_in.weight.dtype != torch.float32:
            raise HMARError("this pipeline's decoder was converted to low precision by enable_fast_sampling(): "
                            "save from a pipeline loaded without it")
        return ckpt.save_pretrained(directory, model, tok, class_names=self.class_names,
                                    sampling=self.sampling, dtype=dtype, extra=self.extra)

    def enable_fast_sampling(self, compile: bool = False, decode_batch: Optional[int] = None,
                             full_res_chunks: Optional[int] = None, fp8: Optional[bool] = None) -> "HMARPipeline":
        """CUDA only, in place: bf16 transformer whose whole token loop replays as one CUDA graph per batch size and
        set of options (edits: one graph per pass; ``compile=True``: with its blocks ``torch.compile``'d), and a bf16
        compiled decoder whose calls replay as CUDA graphs in the loop graph's memory pool (:mod:`hmar.accel`). The
        same seed samples the tokens
        of the eager bf16 model with fc1's GELU in the GEMM epilogue (which the fast model switches on).
        The first call of each batch size captures its graphs and compiles (about a minute); later calls replay.

        ``decode_batch``: images per decoder call (default :data:`hmar.accel.FAST_DECODE_CHUNK_BYTES`'s choice: 16 in
        one call at 256 and 512 px). Fewer take less memory and more time: on the H200 (16 images, the decoder
        alone, side by side, BENCHMARKS.md section 3a) one call took 24.1 ms with 1.34 GB of activations at 256 px and
        91.6 ms with 5.37 GB at 512 px; 2 x 8 at 256 px 33.1 ms with 0.68 GB, 8 x 2 at 512 px 119.6 ms with 0.72 GB.
        ``full_res_chunks``: :class:`~hmar.accel.FastDecoder`'s (default: none at 256 px, 2 at 512 px, batch 16).
        ``fp8``: the blocks' GEMMs in e4m3 (:mod:`hmar.model.fp8`; Ada / Hopper GPUs; best with ``compile``), a
        one-way conversion of this pipeline's model, set when the pipeline first becomes fast (None: off then, and
        unchanged in later calls)."""
        if self.device.type != "cuda":
            raise HMARError(f"fast sampling needs a CUDA device, but the pipeline is on {self.device}: "
                            "load it with device='cuda'")
        from .accel import GraphedModel, accelerate
        if not isinstance(self.model, GraphedModel):
            accelerate(self, compile_passes=compile, decode_batch=decode_batch, full_res_chunks=full_res_chunks,
                       fp8=bool(fp8))
        else:                                    # already fast: only the decoder's chunking can change
            if fp8 is not None and fp8 != self.model.fp8:
                raise HMARError(f"enable_fast_sampling(fp8={fp8}): this pipeline is already fast with fp8="
                                f"{self.model.fp8}; load the model again to change it")
            if decode_batch is not None:
                self.tokenizer.max_batch = decode_batch
            if full_res_chunks is not None:      # (drops the decoder graphs captured with other chunks)
                self.tokenizer.full_res_chunks = full_res_chunks
        return self

    def to(self, device: Union[str, torch.device]) -> "HMARPipeline":
        self.model.to(device)
        self.tokenizer.to(device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def resolution(self) -> int:
        return self.tokenizer.config.patch_nums[-1] * self.tokenizer.config.downsample

    def class_index(self, label: Union[int, str]) -> int:
        """A class id from an int or a class name (case-insensitive, surrounding spaces ignored)."""
        return class_id(label, self.class_names)

    def _opts(self, **kw: Any) -> Dict[str, Any]:
        return {**self.sampling, **{k: v for k, v in kw.items() if v is not None}}

    # ------------------------------------------------------------------ generation
    def generate(self, labels: Sequence[Union[int, str]], generator: Union[int, torch.Generator, None] = 0,
                 **options: Any) -> SampleOutput:
        """Sample tokens and images (tensor output) for ``labels``; ``options`` override the sampling defaults
        (``cfg``, ``top_k``, ``top_p``, ``temperature``, ``schedule``, ``guide_masked``, ``progress``)."""
        progress = options.pop("progress", False)
        ids = [self.class_index(l) for l in _label_list(labels)]
        return sample(self.model, self.tokenizer, ids, generator=generator, progress=progress, **self._opts(**options))

    def __call__(self, class_labels: Sequence[Union[int, str]], num_images_per_label: int = 1,
                 guidance_scale: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 temperature: Optional[float] = None, schedule: Any = None, guide_masked: Optional[bool] = None,
                 generator: Union[int, torch.Generator, None] = 0, output_type: str = "pil", batch_size: int = 64):
        """Generate ``num_images_per_label`` images per label; returns PIL images (``output_type='pil'``),
        a ``[N, 3, R, R]`` tensor in [0, 1] (``'pt'``) or a uint8 ``[N, R, R, 3]`` array (``'np'``).
        ``class_labels`` may also be a single id or name. ``batch_size`` is part of the seeding: the same
        seed with another batch size gives other images."""
        class_labels = _label_list(class_labels)
        if output_type not in ("pil", "pt", "np"):
            raise HMARError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        for name, v in (("num_images_per_label", num_images_per_label), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:   # numpy ints too
                raise HMARError(f"{name} must be an integer >= 1, got {v!r}")
        num_images_per_label, batch_size = int(num_images_per_label), int(batch_size)
        labels = [l for l in class_labels for _ in range(num_images_per_label)]
        if not labels:
            raise HMARError("class_labels is empty: give at least one class id or name")
        gen = make_generator(generator, self.device)  # one stream across batches
        outs = []
        for i in range(0, len(labels), batch_size):
            o = self.generate(labels[i:i + batch_size], generator=gen, cfg=guidance_scale, top_k=top_k, top_p=top_p,
                              temperature=temperature, schedule=schedule, guide_masked=guide_masked)
            outs.append(o.images)
        images = torch.cat(outs)
        if output_type == "pt":
            return images
        if output_type == "np":
            return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return to_pil(images)

    # ------------------------------------------------------------------ zero-shot editing (hmar.editing)
    def inpaint(self, image: Any, mask: Any, class_label: Union[int, str, None] = None, **kwargs: Any):
        """Regenerate the white part of ``mask`` (the image's size); ``class_label=None``: unconditional.
        Options and rules: :func:`hmar.editing.edit`. Returns PIL images (or an ``EditOutput``)."""
        from .editing import inpaint
        return inpaint(self, image, mask, class_label, **_edit_options(kwargs))

    def outpaint(self, image: Any, pad: Optional[Sequence[int]] = None, target_size: Optional[Sequence[int]] = None,
                 class_label: Union[int, str, None] = None, **kwargs: Any):
        """Extend ``image`` by ``pad=(left, top, right, bottom)`` pixels or to ``target_size=(W, H)`` and
        generate the border (:func:`hmar.editing.outpaint`)."""
        from .editing import outpaint
        return outpaint(self, image, pad, target_size, class_label, **_edit_options(kwargs))

    def class_edit(self, image: Any, region_mask: Any, new_class: Union[int, str], **kwargs: Any):
        """Regenerate the ``region_mask`` part of ``image`` as class ``new_class`` (:func:`hmar.editing.class_edit`)."""
        from .editing import class_edit
        return class_edit(self, image, region_mask, new_class, **_edit_options(kwargs))


def make_grid(images: Sequence["PIL.Image.Image"], ncols: int, pad: int = 2) -> "PIL.Image.Image":  # noqa: F821
    """Tile PIL images into a grid with ``ncols`` columns (white padding)."""
    from PIL import Image
    if not images:
        raise HMARError("no images to put in a grid")
    w, h = images[0].size
    nrows = (len(images) + ncols - 1) // ncols
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid
