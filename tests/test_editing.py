"""Zero-shot editing (hmar.editing, HMARPipeline.inpaint/outpaint/class_edit, `hmar edit`).

Random tiny models (64 px, scales 1,2,3,4, vocabulary 64): the images are noise, but every rule is
checked exactly: tokens outside the region equal the source's at every scale, the region is
generated, the per-scale region rule on hand-made masks, seeding, and the documented edge cases.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hmar import editing as E
from hmar.errors import HMARError
from hmar.pipeline import HMARPipeline
from hmar.presets import resolve_schedule
from hmar.sampling import sample

R = 64
PN = (1, 2, 3, 4)


@pytest.fixture(scope="module", params=["hmar-tiny", "var-tiny"])
def pipe(request):
    return HMARPipeline.from_preset(request.param, "vqvae-tiny")


@pytest.fixture(scope="module")
def hmar_pipe():
    return HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny")


def _image(w=R, h=R, seed=0) -> np.ndarray:
    """A smooth random RGB image (uint8 HxWx3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _left_half(w=R, h=R) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[:, : w // 2] = True
    return m


def _grid(t: torch.Tensor):
    return t.int().tolist()


# ------------------------------------------------------------------------------ rules
def test_region_rule_hand_made_masks():
    # one pixel: only the last-scale token that holds it
    m = torch.zeros(R, R, dtype=torch.bool)
    m[0, 0] = True
    r = E.scale_regions(m, PN)
    assert [_grid(x) for x in r[:3]] == [[[0]], [[0, 0], [0, 0]], [[0, 0, 0]] * 3]
    assert _grid(r[3]) == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # left half: coverage exactly 0.5 is *not* a majority (1x1 scale, middle column of 3x3)
    r = E.scale_regions(torch.from_numpy(_left_half()), PN)
    assert _grid(r[0]) == [[0]]
    assert _grid(r[1]) == [[1, 0], [1, 0]]
    assert _grid(r[2]) == [[1, 0, 0]] * 3
    assert _grid(r[3]) == [[1, 1, 0, 0]] * 4
    # a 41x41 square at the top left (rows/cols 0..40)
    m = torch.zeros(R, R, dtype=torch.bool)
    m[:41, :41] = True
    r = E.scale_regions(m, PN)
    assert _grid(r[0]) == [[0]]                         # 1681/4096 = 0.41
    assert _grid(r[1]) == [[1, 0], [0, 0]]              # (0,1): 9/32 of its columns
    # 3x3 footprints (adaptive pooling): cols 0..21, 21..42, 42..63 -> 20/22 covered for the middle
    assert _grid(r[2]) == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert _grid(r[3]) == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]  # any touch
    # full / empty
    assert all(bool(x.all()) for x in E.scale_regions(torch.ones(R, R, dtype=torch.bool), PN))
    assert not any(bool(x.any()) for x in E.scale_regions(torch.zeros(R, R, dtype=torch.bool), PN))


def test_resize_crop_rule():
    assert E.fit_geometry(64, 64, 64) == ((64, 64), (0, 0, 64, 64))
    assert E.fit_geometry(100, 80, 64) == ((80, 64), (8, 0, 72, 64))          # landscape: centre columns
    assert E.fit_geometry(30, 90, 64) == ((64, 192), (0, 64, 64, 128))        # portrait, upscaled
    img = Image.fromarray(_image(100, 80))
    assert E.fit_image(img, 64).size == (64, 64)
    # the mask follows the same geometry, conservatively: a 1-px line survives a 2x reduction
    m = np.zeros((128, 128), dtype=bool)
    m[:, 1] = True
    fm = E.fit_mask(m, 64)
    assert fm[:, 0].all() and not fm[:, 1:].any()
    # landscape mask: only what falls inside the centre crop counts
    m = np.zeros((80, 100), dtype=bool)
    m[:, :10] = True                                    # columns 0..9 -> 0..8 after scaling: cropped away
    assert not E.fit_mask(m, 64).any()


def test_mask_semantics():
    white = Image.new("L", (8, 8), 0)
    white.paste(255, (0, 0, 4, 8))
    assert E.load_mask(white)[:, :4].all() and not E.load_mask(white)[:, 4:].any()
    assert not E.load_mask(Image.new("L", (8, 8), 100)).any()              # dark grey = keep
    assert E.load_mask(Image.new("RGB", (8, 8), (255, 0, 0))).all()       # any bright channel = edit
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))                        # painted layer: alpha decides
    layer.paste((0, 0, 0, 255), (0, 0, 2, 2))
    lm = E.load_mask(layer)
    assert lm.sum() == 4 and lm[:2, :2].all()
    assert E.load_mask(np.eye(4, dtype=bool)).sum() == 4
    assert E.load_mask(np.full((4, 4), 0.6, dtype=np.float32)).all()
    assert E.load_mask(torch.ones(1, 4, 4)).all()


def test_input_kinds_give_the_same_image():
    a = _image()
    t01 = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    for img, kw in [(Image.fromarray(a), {}), (a.astype(np.float32) / 255, {}), (t01, {}),
                    ((t01 * 2 - 1)[None], {"value_range": (-1, 1)}), (torch.from_numpy(a).permute(2, 0, 1), {}),
                    (Image.fromarray(a).convert("RGBA"), {})]:
        got = np.asarray(E.load_image(img, **kw))
        assert got.shape == a.shape and np.abs(got.astype(int) - a).max() <= 1
    gray = E.load_image(np.zeros((5, 7), np.uint8))
    assert gray.size == (7, 5) and gray.mode == "RGB"
    with pytest.raises(HMARError, match="value_range"):
        E.load_image(t01 * 2 - 1)                       # [-1, 1] data without saying so
    with pytest.raises(HMARError, match="batch size"):
        E.load_image(torch.zeros(2, 3, 8, 8))
    with pytest.raises(HMARError, match="HxWxC"):
        E.load_image(np.zeros((3, 8, 8, 2), np.uint8))


# ------------------------------------------------------------------------------ the guarantees
def test_outside_tokens_kept_inside_generated(pipe):
    a = _image(96, 80)                                  # not square: resized and centre-cropped
    m = np.zeros((80, 96), dtype=bool)
    m[:, :48] = True
    out = pipe.inpaint(a, m, seeds=[0, 1, 2], return_tokens=True, composite="latent")
    assert len(out.images) == 3 and all(im.size == (R, R) for im in out.images)
    inside_differs = 0
    for k, (reg, src, got) in enumerate(zip(out.regions, out.source_indices, out.indices)):
        keep = ~reg.flatten()
        assert got.shape == (3, PN[k] ** 2)
        assert torch.equal(got[:, keep], src.expand(3, -1)[:, keep]), f"scale {k}: a kept token changed"
        if reg.any():
            inside_differs += int((got[0, ~keep] != got[1, ~keep]).sum()) + int((got[0, ~keep] != got[2, ~keep]).sum())
    assert out.regions[-1].sum() >= 8 and inside_differs > 0   # the region is generated, differently per seed
    # latent composite: outside the last-scale region the decoded latent is the source's, exactly
    f_src = pipe.tokenizer.indices_to_fhat(out.source_indices)
    outside = ~out.regions[-1]
    assert torch.equal(out.f_hat[:, :, outside], f_src.expand(3, -1, -1, -1)[:, :, outside])
    assert not torch.equal(out.f_hat[:, :, ~outside], f_src.expand(3, -1, -1, -1)[:, :, ~outside])


def test_pixel_composite_outside_equals_reconstruction(hmar_pipe):
    a = _image()
    out = hmar_pipe.inpaint(a, _left_half(), generator=3, composite="pixels", return_tokens=True)
    res, rec = np.asarray(out.images[0]), np.asarray(out.reconstruction)
    cell = R // PN[-1]
    cols = int(out.regions[-1].any(0).nonzero().max()) + 1      # last region column (whole cells)
    assert np.array_equal(res[:, cols * cell:], rec[:, cols * cell:])
    assert not np.array_equal(res[:, : cols * cell], rec[:, : cols * cell])


def test_seeded_editing_is_reproducible(hmar_pipe):
    a, m = _image(), _left_half()
    one = hmar_pipe.inpaint(a, m, generator=7, return_tokens=True)
    two = hmar_pipe.inpaint(a, m, generator=torch.Generator().manual_seed(7), return_tokens=True)
    assert np.array_equal(np.asarray(one.images[0]), np.asarray(two.images[0]))
    assert all(torch.equal(x, y) for x, y in zip(one.indices, two.indices))
    batch = hmar_pipe.inpaint(a, m, seeds=[5, 7], return_tokens=True)   # each seed as if alone
    assert np.array_equal(np.asarray(batch.images[1]), np.asarray(one.images[0]))


def test_masked_passes_only_rewrite_the_region(hmar_pipe):
    seen = {}

    def cb(info):
        if info.kind == "masked":
            seen.setdefault(info.scale, []).append(info.masked[0].clone())

    out = hmar_pipe.inpaint(_image(), _left_half(), generator=0, return_tokens=True, callback=cb)
    for k in range(1, len(PN)):
        region = out.regions[k].flatten()
        assert k in seen, f"no masked pass at scale {k}"        # the editing schedule refines every scale
        for mk in seen[k]:
            assert not (mk & ~region).any(), f"scale {k}: a masked pass could overwrite a kept token"


def test_full_mask_is_plain_sampling(pipe):
    out = pipe.inpaint(_image(), np.ones((R, R), dtype=bool), class_label=2, generator=4, return_tokens=True)
    sched = None
    if hasattr(pipe.model, "masked_logits"):
        sched = E.edit_schedule(resolve_schedule(None, PN), PN)
    ref = sample(pipe.model, pipe.tokenizer, [2], generator=4, schedule=sched, decode=False,
                 **{k: v for k, v in pipe.sampling.items() if k != "schedule"})
    assert all(torch.equal(x, y) for x, y in zip(out.indices, ref.indices))


def test_empty_mask_returns_the_reconstruction(pipe):
    out = pipe.inpaint(_image(), np.zeros((R, R), dtype=bool), seeds=[0, 1], return_tokens=True)
    rec = np.asarray(out.reconstruction)
    assert all(np.array_equal(np.asarray(im), rec) for im in out.images)
    assert all(torch.equal(x, s.expand_as(x)) for x, s in zip(out.indices, out.source_indices))


def test_outpaint_and_class_edit(hmar_pipe, monkeypatch):
    pipe = hmar_pipe
    a = _image(32, 64)                                  # portrait: padding left and right makes it square
    canvas, m = E.outpaint_canvas(Image.fromarray(a), pad=(16, 0, 16, 0))
    assert canvas.size == (64, 64) and m[:, :16].all() and m[:, 48:].all() and not m[:, 16:48].any()
    assert np.array_equal(np.asarray(canvas)[:, :16], np.repeat(a[:, :1], 16, axis=1))   # edges replicated
    canvas, m = E.outpaint_canvas(Image.fromarray(a), target_size=(40, 64))  # 40x64 -> letterboxed to 64x64
    assert canvas.size == (64, 64) and int((~m).sum()) == 32 * 64
    out = pipe.outpaint(a, pad=(16, 0, 16, 0), return_tokens=True, generator=1)
    for reg, src, got in zip(out.regions, out.source_indices, out.indices):
        keep = ~reg.flatten()
        assert torch.equal(got[:, keep], src[:, keep])
    assert _grid(out.regions[-1]) == [[1, 0, 0, 1]] * 4
    labels = []                                         # which class reaches the sampler
    real = E.sample
    monkeypatch.setattr(E, "sample", lambda m, t, lab, **kw: labels.append(list(lab)) or real(m, t, lab, **kw))
    ce = pipe.class_edit(_image(), _left_half(), new_class=3, return_tokens=True, generator=1)
    pipe.inpaint(_image(), _left_half(), generator=1)
    assert labels == [[3], [-1]]                        # -1: the null class (unconditional)
    for reg, src, got in zip(ce.regions, ce.source_indices, ce.indices):
        assert torch.equal(got[:, ~reg.flatten()], src[:, ~reg.flatten()])
    with pytest.raises(HMARError, match="real class"):
        pipe.class_edit(_image(), _left_half(), new_class=None)
    with pytest.raises(HMARError, match="out of range"):
        pipe.class_edit(_image(), _left_half(), new_class=99)


# ------------------------------------------------------------------------------ errors
def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (its data is a stub): it must be refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_bad_inputs_raise_one_line_errors(hmar_pipe, tmp_path):
    a = _image()
    with pytest.raises(HMARError, match="must have the image's size"):
        hmar_pipe.inpaint(a, np.zeros((32, 64), dtype=bool))
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    with pytest.raises(HMARError, match="not an image"):
        hmar_pipe.inpaint(txt, _left_half())
    with pytest.raises(HMARError, match="does not exist"):
        hmar_pipe.inpaint(tmp_path / "missing.png", _left_half())
    big = tmp_path / "big.png"
    _png_header_only(big, 8000, 8000)                   # 64 MP > the 50 MP default
    with pytest.raises(HMARError, match="more than the limit"):
        hmar_pipe.inpaint(big, _left_half())
    with pytest.raises(HMARError, match="more than the limit"):
        hmar_pipe.inpaint(a, _left_half(), max_pixels=1000)
    with pytest.raises(HMARError, match="exactly one of"):
        hmar_pipe.outpaint(a)
    with pytest.raises(HMARError, match="composite"):
        hmar_pipe.inpaint(a, _left_half(), composite="blend")
    for e in (HMARError,):
        try:
            hmar_pipe.inpaint(a, np.zeros((32, 64), dtype=bool))
        except e as err:
            assert "\n" not in str(err)


def test_non_integer_class_labels_are_refused(hmar_pipe):
    # a float or a bool is not a class id: it must not be truncated to one (3.5 -> class 3, True -> class 1)
    for bad in (3.5, 2.0, True, torch.tensor(1.5)):
        with pytest.raises(HMARError, match="integer id"):
            hmar_pipe.class_edit(_image(), _left_half(), bad)
    with pytest.raises(HMARError, match="integer id"):
        hmar_pipe.inpaint(_image(), _left_half(), 0.5)


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit")
    Image.fromarray(_image(80, 64)).save(d / "in.png")
    m = np.zeros((64, 80), dtype=np.uint8)
    m[:, :40] = 255
    Image.fromarray(m).save(d / "mask.png")
    Image.fromarray(m[:32]).save(d / "small_mask.png")
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(d / "empty.png")
    Image.fromarray(np.full((64, 80), 255, np.uint8)).save(d / "full.png")
    (d / "text.png").write_text("hello")
    _png_header_only(d / "huge.png", 8000, 8000)
    return d


def _cli(args, capsys):
    from hmar.cli import main
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_inpaint_seeds_and_strip(files, capsys):
    rc, out, err = _cli(["edit", "inpaint", "--image", files / "in.png", "--mask", files / "mask.png",
                         "--out", files / "o.png", "--seeds", "0,1"], capsys)
    assert rc == 0, err
    for name in ("o_s0.png", "o_s1.png", "o_strip.png"):
        assert (files / name).exists()
    assert Image.open(files / "o_s1.png").size == (R, R)
    assert Image.open(files / "o_strip.png").width > 4 * R          # source, mask, 2 results
    rc, out, err = _cli(["edit", "outpaint", "--image", files / "in.png", "--pad", "8,0,8,0", "--class", "1",
                         "--out", files / "op.png"], capsys)
    assert rc == 0 and (files / "op.png").exists(), err
    rc, out, err = _cli(["edit", "class", "--image", files / "in.png", "--mask", files / "mask.png",
                         "--class", "3", "--out", files / "c.png", "--seed", "2"], capsys)
    assert rc == 0 and (files / "c.png").exists(), err


@pytest.mark.parametrize("case,args,needle", [
    ("wrong-size mask", ["inpaint", "--mask", "small_mask.png"], "must have the image's size"),
    ("non-image file", ["inpaint", "--mask", "mask.png", "--image", "text.png"], "not an image"),
    ("oversized image", ["inpaint", "--mask", "mask.png", "--image", "huge.png"], "more than the limit"),
    ("bad pad", ["outpaint", "--pad", "1,2"], "--pad"),
    ("class out of range", ["class", "--mask", "mask.png", "--class", "42"], "out of range"),
    ("repeated seed", ["inpaint", "--mask", "mask.png", "--seeds", "0,0"], "repeats a seed"),
])
def test_cli_errors_are_one_line(files, capsys, case, args, needle):
    op, rest = args[0], args[1:]
    full = ["edit", op, "--image", files / "in.png", "--out", files / "e.png"]
    for i in range(0, len(rest), 2):
        val = rest[i + 1]
        full += [rest[i], files / val if val.endswith(".png") else val]
    rc, out, err = _cli(full, capsys)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_cli_empty_and_full_masks(files, capsys):
    rc, out, err = _cli(["edit", "inpaint", "--image", files / "in.png", "--mask", files / "empty.png",
                         "--out", files / "empty_out.png"], capsys)
    assert rc == 0 and "reconstruction" in err
    rc, out, err = _cli(["edit", "inpaint", "--image", files / "in.png", "--mask", files / "full.png",
                         "--out", files / "full_out.png", "--class", "0"], capsys)
    assert rc == 0 and (files / "full_out.png").exists() and "note" not in err   # a full mask is asked for


def test_cli_outpaint_that_keeps_nothing_says_so(files, capsys):
    rc, out, err = _cli(["edit", "outpaint", "--image", files / "in.png", "--pad", "2000",
                         "--out", files / "far_out.png"], capsys)   # 80 px of a 2080 px canvas: < 1 token at 64 px
    assert rc == 0 and "covers no whole token" in err and "--pad" in err and (files / "far_out.png").exists()
    rc, out, err = _cli(["edit", "outpaint", "--image", files / "in.png", "--pad", "8",
                         "--out", files / "near_out.png"], capsys)
    assert rc == 0 and "note" not in err


def test_cli_error_in_a_real_process(files):
    """The installed entry point: exit status 2, one `error:` line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "hmar", "edit", "inpaint", "--image", str(files / "text.png"),
                        "--mask", str(files / "mask.png")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert [l for l in p.stderr.splitlines() if l.strip()] == [l for l in p.stderr.splitlines() if l.startswith("error:")]


def test_wide_grayscale_masks_and_images_are_scaled_by_their_range(tmp_path):
    """A 16-bit mask with a dark (1000 of 65535) background was all "edit" (non-zero), and a float TIFF image of
    0..1 loaded black (over 255); both are read by their mode's range, the same way as the trainers read images."""
    import numpy as np
    from PIL import Image
    from hmar import editing
    from hmar.datasets.folder import load_image as train_load
    m = np.full((40, 50), 1000, np.uint16)
    m[10:30, 10:30] = 65535
    Image.fromarray(m).save(tmp_path / "m16.png")
    assert editing.load_mask(tmp_path / "m16.png").mean() == pytest.approx(400 / 2000)
    f = np.full((40, 50), 0.2, np.float32)
    f[10:30, 10:30] = 1.0
    Image.fromarray(f, "F").save(tmp_path / "mf.tif")
    assert editing.load_mask(tmp_path / "mf.tif").mean() == pytest.approx(400 / 2000)
    g = np.full((8, 8), 0.5, np.float32)
    Image.fromarray(g, "F").save(tmp_path / "img.tif")
    a = np.asarray(editing.load_image(tmp_path / "img.tif"))
    assert a.shape == (8, 8, 3) and (a == 128).all()
    assert (train_load(tmp_path / "img.tif") == 128).all()          # the trainers' loader agrees
    v = np.full((8, 8), 200, np.uint16)
    v[0, 0] = 300                                                   # 16-bit data: over 65535 in both loaders
    Image.fromarray(v).save(tmp_path / "v16.png")
    assert (np.asarray(editing.load_image(tmp_path / "v16.png"))[1:, 1:] == 1).all()
    assert (train_load(tmp_path / "v16.png")[1:, 1:] == 1).all()
