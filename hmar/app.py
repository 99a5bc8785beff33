"""The web demo (Gradio): class-conditional generation, in-painting and out-painting on CPU.

Start it with ``hmar serve`` (see :mod:`hmar.cli.serve`) or :func:`launch`. Safety defaults:

* listens on ``127.0.0.1`` unless another host is asked for;
* uploads are bounded in bytes (Gradio's ``max_file_size``: larger requests get HTTP 413) and in
  pixels (``PIL.Image.MAX_IMAGE_PIXELS`` is set to ``max_pixels`` and Pillow's decompression-bomb
  warning is made an error, so an image with too many pixels is refused from its header, before
  decoding; the handlers check again);
* only images are accepted (image components; anything Pillow cannot read is refused);
* no input is a file path and ``allowed_paths`` is empty: the server never reads or writes a path a
  visitor names;
* a queue with ``default_concurrency_limit`` and ``max_size`` (bursts wait, overflow is refused), and
  ``api_open=False`` so the REST routes cannot skip it;
* ``GRADIO_ANALYTICS_ENABLED=False``; no share link, no SSR node server, no MCP server, no run
  history (which could offer to upload runs to a remote bucket); server-side errors other than ours
  are shown as a bare "Error" (``show_error=False``: no paths or tracebacks leak to the page).

Element ids (stable, used by ``tests/test_webdemo.py``): ``notice``; ``gen_class``, ``gen_seed``,
``gen_cfg``, ``gen_schedule``, ``gen_btn``, ``gen_out``; ``inp_editor``, ``inp_mask``, ``inp_class``,
``inp_seed``, ``inp_cfg``, ``inp_btn``, ``inp_out``, ``inp_status``; ``out_image``, ``out_left``,
``out_top``, ``out_right``, ``out_bottom``, ``out_class``, ``out_seed``, ``out_btn``, ``out_out``.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import HMARError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

UNCONDITIONAL = "(unconditional)"
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_UPLOAD_MB = 10.0
# small model outputs (64 px for the tiny presets) are shown enlarged, without smoothing
_CSS = ("#gen_out img, #inp_out img, #out_out img { width: 256px !important; height: 256px !important; "
        "object-fit: contain; image-rendering: pixelated; }")


def check_limits(max_upload_mb: float, max_pixels: int, concurrency: int, max_queue: int) -> None:
    """:class:`HMARError` unless every server limit is a positive (finite) number."""
    for flag, v in (("--max-upload-mb", max_upload_mb), ("--max-pixels", max_pixels),
                    ("--concurrency", concurrency), ("--max-queue", max_queue)):
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):   # NaN fails too
            raise HMARError(f"{flag} must be a positive number, got {v!r}")
    if max_upload_mb * 2 ** 20 < 1024:   # 1e-9 MiB became a 0-byte limit: every upload refused
        raise HMARError(f"--max-upload-mb {max_upload_mb!r} allows less than 1 KiB: no image fits; use e.g. 10")


def limit_pixels(max_pixels: int) -> None:
    """Make Pillow refuse (not just warn about) images with more than ``max_pixels`` pixels, from the header.
    Process-wide: meant for the server process."""
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.simplefilter("error", Image.DecompressionBombWarning)


class DemoHandlers:
    """The functions behind the buttons (plain Python: testable without a browser).
    Bad input raises ``gr.Error`` with a one-line message that the page shows."""

    def __init__(self, pipe: Any, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.pipe = pipe
        self.max_pixels = int(max_pixels)
        self._lock = threading.Lock()  # one model, one computation at a time (torch uses all cores anyway)
        names = pipe.class_names or []
        self.class_choices: List[Tuple[str, int]] = [
            (f"{i}: {names[i]}" if i < len(names) else str(i), i) for i in range(pipe.num_classes)]
        self.schedules = ["default", "none", "coarse"]
        if hasattr(pipe.model, "masked_logits"):
            from .presets import MASK_SCHEDULES
            pn = tuple(pipe.model.config.patch_nums)
            self.schedules += [k for k, v in MASK_SCHEDULES.items() if [int(s ** 0.5) for s in map(sum, v)] == list(pn)]

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _error(e: Exception):
        import gradio as gr
        return gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def _label(self, choice: Any) -> Optional[int]:
        if choice is None or choice == "" or choice == UNCONDITIONAL or choice == -1:
            return None
        try:
            lab = int(choice)
        except OverflowError:   # inf
            raise HMARError(f"the class must be a class id or name, got {choice!r}") from None
        except (TypeError, ValueError):
            lab = self.pipe.class_index(str(choice).split(":")[0].strip())
        if not 0 <= lab < self.pipe.num_classes:
            raise HMARError(f"class {lab} is out of range (0..{self.pipe.num_classes - 1})")
        return lab

    @staticmethod
    def _seed(seed: Any) -> int:
        try:
            s = int(seed)
        except (TypeError, ValueError, OverflowError):   # OverflowError: inf
            raise HMARError(f"the seed must be an integer, got {seed!r}") from None
        if not 0 <= s < 2 ** 63:
            raise HMARError(f"the seed must be between 0 and 2^63-1, got {s}")
        return s

    @staticmethod
    def _cfg(cfg: Any) -> float:
        try:
            c = float(cfg)
        except (TypeError, ValueError):
            raise HMARError(f"guidance must be a number, got {cfg!r}") from None
        if not 0.0 <= c <= 20.0:
            raise HMARError(f"guidance must be between 0 and 20, got {c}")
        return c

    def _image(self, value: Any, what: str):
        from .editing import load_image
        if value is None:
            raise HMARError(f"no {what}: upload an image first")
        if isinstance(value, (str, os.PathLike)):
            raise HMARError(f"the {what} must be image data, not a path")  # never open visitor-named paths
        return load_image(value, max_pixels=self.max_pixels, what=what)

    def _editor_mask(self, layers: Sequence[Any], size: Tuple[int, int]) -> np.ndarray:
        """Union of the painted layers (alpha > 127), at the background's size."""
        from .editing import load_mask
        region = np.zeros((size[1], size[0]), dtype=bool)
        for layer in layers or []:
            if layer is None or isinstance(layer, (str, os.PathLike)):
                continue
            m = load_mask(layer, max_pixels=self.max_pixels, what="painted layer")
            if m.shape != region.shape:
                raise HMARError(f"the painted layer is {m.shape[1]}x{m.shape[0]} but the image is {size[0]}x{size[1]}")
            region |= m
        return region

    # -------------------------------------------------------------- the three tabs
    def generate(self, class_choice: Any, seed: Any, cfg: Any, schedule: Any = "default"):
        """Generate one image of a class -> PIL image."""
        try:
            label = self._label(class_choice)
            sched = None if schedule in (None, "", "default") else str(schedule)
            with self._lock:
                out = self.pipe.generate([-1 if label is None else label], generator=self._seed(seed),
                                         cfg=self._cfg(cfg), schedule=sched)
            from .pipeline import to_pil
            return to_pil(out.images)[0]
        except HMARError as e:
            raise self._error(e) from None

    def inpaint(self, editor: Optional[Dict[str, Any]], mask_upload: Any, class_choice: Any, seed: Any,
                cfg: Any = 1.5) -> Tuple[Any, str]:
        """In-paint the painted (or uploaded-mask) region of the editor's background -> (PIL image, status)."""
        try:
            editor = editor or {}
            img = self._image(editor.get("background"), "image")
            if mask_upload is not None:
                from .editing import load_mask
                if isinstance(mask_upload, (str, os.PathLike)):
                    raise HMARError("the mask must be image data, not a path")
                mask = load_mask(mask_upload, max_pixels=self.max_pixels)
                if mask.shape != (img.height, img.width):
                    raise HMARError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                    f"{img.width}x{img.height}: upload a mask of the image's size")
            else:
                mask = self._editor_mask(editor.get("layers") or [], img.size)
            label = self._label(class_choice)
            with self._lock:
                res = self.pipe.inpaint(img, mask, label, generator=self._seed(seed), cfg=self._cfg(cfg),
                                        max_pixels=self.max_pixels, return_tokens=True)
            if not bool(res.regions[-1].any()):
                status = "The mask is empty: paint over the region to change. Showing the reconstruction."
            else:
                n = int(res.regions[-1].sum())
                status = f"Regenerated {n} of {res.regions[-1].numel()} last-scale tokens" + \
                         ("" if label is None else f" as class {label}") + "."
            return res.images[0], status
        except HMARError as e:
            raise self._error(e) from None

    def outpaint(self, image: Any, left: Any, top: Any, right: Any, bottom: Any, class_choice: Any, seed: Any,
                 cfg: Any = 1.5):
        """Extend the image by the given percentages of its size on each side -> PIL image."""
        try:
            img = self._image(image, "image")
            try:
                pct = [float(v or 0) for v in (left, top, right, bottom)]
            except (TypeError, ValueError):
                raise HMARError("padding must be numbers (percent of the image size)") from None
            if not all(0 <= v <= 100 for v in pct):            # NaN fails too
                raise HMARError("padding must be between 0 and 100 % of the image size")
            w, h = img.size
            pad = [round(pct[0] * w / 100), round(pct[1] * h / 100), round(pct[2] * w / 100), round(pct[3] * h / 100)]
            with self._lock:
                return self.pipe.outpaint(img, pad=pad, class_label=self._label(class_choice),
                                          generator=self._seed(seed), cfg=self._cfg(cfg),
                                          max_pixels=self.max_pixels)[0]
        except HMARError as e:
            raise self._error(e) from None


def guard_decoding(component: Any, what: str, max_pixels: int) -> Any:
    """Make an image component's server-side decoding fail with a clean one-line message (a ``gr.Error``)
    instead of Gradio's generic error: for non-images and for images over the pixel bound."""
    import gradio as gr
    from PIL import Image, UnidentifiedImageError

    from .datasets.folder import UNREADABLE_IMAGE
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except UnidentifiedImageError:
            raise gr.Error(f"the {what} is not an image file (PNG, JPEG, WebP, ...)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise gr.Error(f"the {what} has more than the limit of {max_pixels} pixels: downscale it first") from None
        except UNREADABLE_IMAGE:
            raise gr.Error(f"the {what} could not be decoded as an image") from None

    component.preprocess = preprocess
    return component


def build_demo(pipe: Any, *, notice: Optional[str] = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The Gradio ``Blocks`` of the demo for ``pipe`` (not launched)."""
    import gradio as gr
    h = DemoHandlers(pipe, max_pixels)
    cond_choices = [(UNCONDITIONAL, -1)] + h.class_choices
    cfg0 = float(pipe.sampling.get("cfg", 1.5))
    R = pipe.resolution
    with gr.Blocks(title="HMAR demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# HMAR\nHierarchical masked auto-regressive image generation: {pipe.model.config.kind} model, "
                    f"{pipe.num_classes} classes, {R}x{R} pixels, on {pipe.device}.")
        gr.Markdown(notice or "", visible=bool(notice), elem_id="notice")
        with gr.Tab("Generate", elem_id="tab_generate"):
            with gr.Row():
                with gr.Column():
                    gen_class = gr.Dropdown(h.class_choices, value=0, label="Class", elem_id="gen_class")
                    gen_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="gen_seed")
                    gen_cfg = gr.Slider(0.0, 10.0, value=cfg0, step=0.1, label="Guidance", elem_id="gen_cfg")
                    gen_sched = gr.Dropdown(h.schedules, value="default", label="Masked-step schedule",
                                            elem_id="gen_schedule")
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="gen_btn")
                gen_out = gr.Image(label="Result", type="pil", interactive=False, format="png", height=320,
                                   elem_id="gen_out")
            gen_btn.click(h.generate, [gen_class, gen_seed, gen_cfg, gen_sched], gen_out, api_name="generate")
        with gr.Tab("Inpaint", elem_id="tab_inpaint"):
            gr.Markdown(f"Upload an image, paint over the part to regenerate (or upload a black/white mask of the "
                        f"same size: white = regenerate). The image is resized so its shorter side is {R} px and "
                        f"centre-cropped.")
            with gr.Row():
                with gr.Column():
                    inp_editor = gr.ImageEditor(label="Image: paint the region to regenerate", type="pil",
                                                image_mode="RGBA", sources=("upload", "clipboard"),
                                                transforms=(), layers=False, format="png",
                                                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                                elem_id="inp_editor")
                    inp_mask = gr.Image(label="Optional mask (white = regenerate); overrides the painting",
                                        type="pil", image_mode=None, sources=("upload",), format="png",
                                        elem_id="inp_mask")
                    inp_class = gr.Dropdown(cond_choices, value=-1, label="Class (unconditional = the null class)",
                                            elem_id="inp_class")
                    inp_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="inp_seed")
                    inp_cfg = gr.Slider(0.0, 10.0, value=cfg0, step=0.1, label="Guidance", elem_id="inp_cfg")
                    inp_btn = gr.Button("Inpaint", variant="primary", elem_id="inp_btn")
                with gr.Column():
                    inp_out = gr.Image(label="Result", type="pil", interactive=False, format="png", height=320,
                                       elem_id="inp_out")
                    inp_status = gr.Markdown("", elem_id="inp_status")
            guard_decoding(inp_editor, "image", max_pixels)
            guard_decoding(inp_mask, "mask", max_pixels)
            inp_btn.click(h.inpaint, [inp_editor, inp_mask, inp_class, inp_seed, inp_cfg], [inp_out, inp_status],
                          api_name="inpaint")
        with gr.Tab("Outpaint", elem_id="tab_outpaint"):
            gr.Markdown("Upload an image and choose how much to add on each side (percent of its size). "
                        "The canvas is letterboxed to a square; everything new is generated.")
            with gr.Row():
                with gr.Column():
                    out_image = gr.Image(label="Image", type="pil", sources=("upload", "clipboard"), format="png",
                                         elem_id="out_image")
                    with gr.Row():
                        sides = [gr.Slider(0, 100, value=v, step=1, label=f"{n} %", elem_id=f"out_{n.lower()}")
                                 for n, v in (("Left", 25), ("Top", 0), ("Right", 25), ("Bottom", 0))]
                    out_class = gr.Dropdown(cond_choices, value=-1, label="Class", elem_id="out_class")
                    out_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="out_seed")
                    out_btn = gr.Button("Outpaint", variant="primary", elem_id="out_btn")
                out_out = gr.Image(label="Result", type="pil", interactive=False, format="png", height=320,
                                   elem_id="out_out")
            guard_decoding(out_image, "image", max_pixels)
            out_btn.click(h.outpaint, [out_image, *sides, out_class, out_seed], out_out, api_name="outpaint")
    demo.handlers = h  # for tests
    return demo


def launch(pipe: Any = None, *, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
           max_pixels: int = DEFAULT_MAX_PIXELS, concurrency: int = 1, max_queue: int = 32,
           notice: Optional[str] = None, block: bool = True):
    """Build and serve the demo. ``pipe=None``: the shipped default model, else a random tiny one (with a
    visible notice). Returns Gradio's ``(app, local_url, share_url)`` when ``block=False``."""
    check_limits(max_upload_mb, max_pixels, concurrency, max_queue)
    if pipe is None:
        pipe, notice = default_pipeline()
    limit_pixels(max_pixels)
    demo = build_demo(pipe, notice=notice, max_pixels=max_pixels)
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue, api_open=False)
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                       max_file_size=f"{int(max_upload_mb * 1024 * 1024)}b", allowed_paths=[], ssr_mode=False,
                       mcp_server=False, pwa=False, enable_monitoring=False, show_error=False, quiet=False,
                       run_history=False, footer_links=["gradio", "settings"], css=_CSS,
                       prevent_thread_lock=not block)


def default_pipeline() -> Tuple[Any, Optional[str]]:
    """The shipped default model, else the random tiny preset and the notice that says so."""
    from .pipeline import HMARPipeline, default_model_dir
    if default_model_dir() is not None:
        return HMARPipeline.from_pretrained(None), None
    return (HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny"),
            "**Notice:** no trained model is shipped with this installation: this demo runs a RANDOMLY "
            "INITIALISED tiny model (hmar-tiny, 64 px), so every image is noise. Start it with "
            "`hmar serve --checkpoint DIR` to use a trained model.")
