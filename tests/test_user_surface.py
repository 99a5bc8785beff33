"""The user-facing surface refuses bad input with one clear HMARError / one ``error:`` line, before any
sampling or file writing: sampling options, seeds, schedules, pipeline arguments, damaged model
directories, output paths, editing arguments; and every ``hmar-d<N>`` preset builds."""
import json

import numpy as np
import pytest
import torch

from hmar import HMARPipeline, build_model, model_config
from hmar.cli import main
from hmar.errors import HMARError
from hmar.presets import resolve_schedule
from hmar.sampling import make_generator, sample

TINY_PN = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random pipeline saved in our format (10 classes, 4 scales, 64 px)."""
    d = tmp_path_factory.mktemp("model") / "tiny"
    HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    return HMARPipeline.from_pretrained(model_dir)


@pytest.mark.parametrize("opts,needle", [
    (dict(cfg=float("nan")), "cfg"), (dict(cfg=float("inf")), "cfg"), (dict(cfg=1e39), "cfg"),
    (dict(cfg=-1e300), "cfg"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
])
def test_sampling_options_out_of_domain_are_refused(tiny, opts, needle):
    hmar, _, _, tok = tiny
    with pytest.raises(HMARError, match=needle):
        sample(hmar, tok, [0], generator=0, **opts)


def test_seeds_and_schedule_specs_of_the_wrong_type():
    for bad in ("abc", 1.5, 2 ** 70):
        with pytest.raises(HMARError, match="seed"):
            make_generator(bad, torch.device("cpu"))
    assert make_generator(np.int64(3), torch.device("cpu")).initial_seed() == 3
    for bad in (5, "5", "{}", [1, 4, 9, 16], [[1], [True, 3], [9], [16]]):
        with pytest.raises(HMARError, match="schedule"):
            resolve_schedule(bad, TINY_PN)
    assert resolve_schedule(((1,), (1, 3), (9,), (16,)), TINY_PN) == [[1], [1, 3], [9], [16]]
    # numpy schedules (an object array, numpy ints) were an ambiguous-truth ValueError / "not positive integers"
    for spec in (np.array([[1], [1, 3], [9], [16]], dtype=object), [[np.int64(1)], [1, 3], [9], np.array([16])]):
        out = resolve_schedule(spec, TINY_PN)
        assert out == [[1], [1, 3], [9], [16]] and all(type(c) is int for s in out for c in s)


def test_generate_takes_one_label_as_call_does(pipe):
    """``generate("12")`` sampled classes 1 and 2 (the string's characters), ``generate("cat")`` looked up "c",
    and ``generate(3)`` / a 0-d array raised TypeError; one id or name is one label, as in ``__call__``."""
    for one, many in (("3", [3]), (3, [3]), (np.array(3), [3]), (torch.tensor(3), [3]), (np.array([3, 1]), [3, 1])):
        a = pipe.generate(one, generator=0, decode=False).indices
        b = pipe.generate(many, generator=0, decode=False).indices
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(pipe(np.array(2), output_type="pt")) == 1
    with pytest.raises(HMARError, match="unknown class name 'cat'"):
        pipe.generate("cat")
    with pytest.raises(HMARError, match="class_labels must be"):
        pipe.generate(object())


def test_scale_schedules_that_cannot_work_are_refused():
    from hmar.presets import ModelConfig, TokenizerConfig, tokenizer_config
    from hmar.tokenizer import VQVAE
    # zero / negative sides, non-monotone or repeated scales, an empty list: one clear error, not a shape error
    # deep inside sampling (or a silently broken model)
    for bad in ((0, 1, 2), (1, 3, 2), (1, 1, 2), (1, -2, 3), (), (1, 2.5)):
        with pytest.raises(HMARError, match="patch_nums"):
            model_config("hmar-tiny", patch_nums=bad)
        with pytest.raises(HMARError, match="patch_nums"):
            TokenizerConfig(patch_nums=bad)
    # the start token is one position: a transformer's first scale is 1x1
    with pytest.raises(HMARError, match="start with 1"):
        model_config("var-tiny", patch_nums=(4,))
    with pytest.raises(HMARError, match="patch_nums"):
        VQVAE(tokenizer_config("vqvae-tiny")).set_patch_nums((1, 3, 2))
    assert ModelConfig(kind="var", depth=2, patch_nums=[1, 3, 5]).patch_nums == (1, 3, 5)
    assert model_config("hmar-tiny", patch_nums=(1,)).seq_len == 1


def test_model_sizes_that_cannot_work_are_refused():
    # zero heads / width used to raise ZeroDivisionError or a negative-dimension RuntimeError from torch
    for kw, needle in [(dict(num_heads=0), "num_heads"), (dict(num_heads=-2), "num_heads"), (dict(embed_dim=0), "embed_dim"),
                       (dict(vocab_size=0), "vocab_size"), (dict(z_channels=0), "z_channels"),
                       (dict(mlp_ratio=0), "mlp_ratio")]:
        with pytest.raises(HMARError, match=needle):
            model_config("hmar-tiny", **kw)
    assert model_config("hmar-tiny", embed_dim=48, num_heads=3).head_dim == 16
    from hmar.presets import tokenizer_config
    for kw, needle in [(dict(ch=0), "ch must"), (dict(ch=40), r"widths \[40, 80\]"), (dict(ch_mult=(1, 0)), "ch_mult"),
                       (dict(ch_mult=()), "ch_mult"), (dict(norm_groups=0), "norm_groups"),
                       (dict(num_res_blocks=0), "num_res_blocks"), (dict(vocab_size=-1), "vocab_size")]:
        with pytest.raises(HMARError, match=needle):   # a GroupNorm / conv error deep in torch before
            tokenizer_config("vqvae-tiny", **kw)
    assert tokenizer_config("vqvae-tiny", ch=48, norm_groups=16).ch_mult == (1, 1, 2, 2, 4)
    with pytest.raises(HMARError, match=r"widths \[48\]"):   # ch itself is normalised (the first block's input)
        tokenizer_config("vqvae-tiny", ch=48, ch_mult=(2, 2, 4))


def test_pipeline_call_arguments(pipe):
    for kw, needle in [(dict(num_images_per_label=0), "num_images_per_label"), (dict(batch_size=0), "batch_size"),
                       (dict(output_type="jpg"), "output_type"), (dict(guidance_scale=float("nan")), "cfg")]:
        with pytest.raises(HMARError, match=needle):
            pipe([1], **kw)
    with pytest.raises(HMARError, match="empty"):
        pipe([])
    for bad in (1.5, None):
        with pytest.raises(HMARError, match="class label"):
            pipe([bad])
    one = pipe(3, generator=0, output_type="np")
    assert one.shape == (1, 64, 64, 3) and np.array_equal(one, pipe([" 3 "], generator=0, output_type="np"))
    assert np.array_equal(one, pipe(torch.tensor([3]), generator=0, output_type="np"))


def test_pipeline_device_and_preset_depths(model_dir):
    with pytest.raises(HMARError, match="not a torch device"):
        HMARPipeline.from_pretrained(model_dir, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(HMARError, match="CUDA is not available"):
            HMARPipeline.from_pretrained(model_dir, device="cuda")
    for d in (1, 4, 8, 16):  # "any depth works": HMAR below depth 8 is all branch
        cfg = model_config(f"hmar-d{d}")
        assert cfg.branch_depth == min(8, d)
    m = build_model(model_config("hmar-d2", vocab_size=64, z_channels=8, patch_nums=TINY_PN, num_classes=10))
    assert m.config.depth == 2


def test_damaged_model_directories(model_dir, tmp_path):
    import shutil
    for name, damage, needle in [
        ("nomodel", lambda d: (d / "config.json").write_text(json.dumps({"format": "hmar"})), "no 'model' section"),
        ("badcfg", lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((model_dir / "config.json").read_text()), "model": {"depth": "x"}})), "valid model"),
        ("corrupt", lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
        ("truncated", lambda d: (d / "tokenizer.safetensors").write_bytes(
            (model_dir / "tokenizer.safetensors").read_bytes()[:500]), "not a readable safetensors"),
        ("intweights", lambda d: _retype(d / "model.safetensors", "pos_start", torch.int8),  # was a RuntimeError
         r"1 weights of the wrong type \(e.g. pos_start is int8, not a float\)"),
    ]:
        d = tmp_path / name
        shutil.copytree(model_dir, d)
        damage(d)
        with pytest.raises(HMARError, match=needle):
            HMARPipeline.from_pretrained(d)
    (tmp_path / "file").write_text("x")
    with pytest.raises(HMARError, match="is a file"):
        HMARPipeline.from_preset().save_pretrained(tmp_path / "file")


def _retype(path, key, dtype):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    sd[key] = sd[key].to(dtype)
    save_file(sd, str(path))


def test_pipeline_counts_take_numpy_ints_and_save_needs_a_float_dtype(pipe, tmp_path):
    """num_images_per_label=np.int64(2) was refused as 'must be an integer'; save_pretrained(dtype=torch.int8)
    wrote a directory that did not load, and dtype='float16' was a RuntimeError."""
    two = pipe([1], num_images_per_label=np.int64(2), batch_size=np.int32(1), generator=0, output_type="np")
    assert np.array_equal(two, pipe([1], num_images_per_label=2, batch_size=1, generator=0, output_type="np"))
    assert np.array_equal(pipe(np.int64(1), generator=0, output_type="np"), two[:1])   # one numpy id, not a list
    with pytest.raises(HMARError, match="class_labels must be a class id"):
        pipe(None)
    for bad in (torch.int8, "float16"):
        with pytest.raises(HMARError, match="floating-point torch.dtype"):
            pipe.save_pretrained(tmp_path / "m", dtype=bad)
    assert not (tmp_path / "m").exists()


def _cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


@pytest.mark.parametrize("args,needle", [
    (["--classes", "1", "-n", "0"], "--num-per-class"),
    (["--classes", ",,"], "names no class"),
    (["--classes", "1", "--cfg", "nan"], "cfg"),
    (["--classes", "1", "--cfg", "1e39"], "within"),
    (["--classes", "1", "--device", "mps"], "--device"),
    (["--classes", "1", "--device", "meta"], "holds no data"),
    (["--classes", "1", "--device", "banana"], "not a torch device"),
    (["--classes", "1", "--top-k", "-5"], "top_k"),
    (["--classes", "1", "--schedule", "5"], "schedule"),
    (["--classes", "1", "--seed", "99999999999999999999999"], "64 bits"),
    (["--classes", "1", "--out", "{tmp}/grid.jpg"], "png"),
    (["--classes", "1", "--out", "{tmp}/afile"], "not a directory"),
    (["--classes", "1", "--out", "{tmp}/afile/sub"], "not a directory"),
    (["--classes", "1", "--out", "{tmp}/adir.png"], "is a directory whose name ends in .png"),
])
def test_cli_sample_bad_input_fails_before_sampling(model_dir, tmp_path, capsys, monkeypatch, args, needle):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    calls = []
    monkeypatch.setattr(HMARPipeline, "generate", lambda self, *a, **k: calls.append(1))
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    rc, _, err = _cli(["sample", "-c", str(model_dir), "--no-progress"] + out + args, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle.lower() in err[0].lower(), err
    assert not calls
    assert "--out" in args or not (tmp_path / "o").exists()   # refused before the output folder was made


def test_cfg_near_the_limit_still_samples_finite_tokens(tiny):
    """Guidance up to the limit samples (the guided logits stay finite); one past it is refused, not NaN."""
    from hmar.sampling import MAX_CFG
    hmar, _, _, tok = tiny
    out = sample(hmar, tok, [0, 1], generator=0, cfg=MAX_CFG, decode=False)
    assert all(((t >= 0) & (t < tok.config.vocab_size)).all() for t in out.indices)
    with pytest.raises(HMARError, match="within"):
        sample(hmar, tok, [0], generator=0, cfg=MAX_CFG * 1.01, decode=False)


def test_cli_sample_a_class_given_twice_writes_every_image(model_dir, tmp_path, capsys):
    """``--classes 3,3`` and ``-1,-1`` wrote one file per class (the second overwrote the first) but reported two."""
    rc, out, _ = _cli(["sample", "-c", str(model_dir), "--no-progress", "--classes", "3,3,-1,-1", "-n", "2",
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 0 and "8 PNGs" in out
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == sorted([f"0003_{i:03d}.png" for i in range(4)] + [f"uncond_{i:03d}.png" for i in range(4)]
                           + ["grid.png"])


def test_cli_sample_classes_with_spaces_and_unconditional(model_dir, tmp_path, capsys):
    rc, _, _ = _cli(["sample", "-c", str(model_dir), "--no-progress", "--classes", "-1, 2", "--out",
                     str(tmp_path / "o")], capsys)
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0002_000.png", "grid.png", "uncond_000.png"]


def test_cli_edit_class_minus_one_and_bad_options(model_dir, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    m = np.zeros((64, 64), np.uint8)
    m[:, 32:] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    base = ["-c", str(model_dir), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png")]
    (tmp_path / "afile").write_text("x")
    for op, extra, needle in [("class", ["--class=-1"], "real class"),
                              ("inpaint", ["--class=-5"], "out of range"),
                              ("inpaint", ["--class", "99"], "out of range"),
                              ("inpaint", ["--seeds", "0,99999999999999999999999"], "64 bits"),
                              ("inpaint", ["--seed", "-99999999999999999999999"], "64 bits"),
                              ("inpaint", ["--cfg", "nan"], "cfg"),
                              ("inpaint", ["--max-pixels", "0"], "--max-pixels"),
                              ("inpaint", ["--out", str(tmp_path / "afile" / "o.png")], "not a directory")]:
        rc, _, err = _cli(["edit", op] + base + extra + ([] if "--out" in extra else
                                                          ["--out", str(tmp_path / "new" / "e.png")]), capsys)
        assert rc == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "new").exists()   # refused before the output folder was made
    rc, out, _ = _cli(["edit", "inpaint"] + base + ["--class=-1", "--out", str(tmp_path / "e.png")], capsys)
    assert rc == 0 and "unconditional" in out


def test_class_names_with_spaces_and_bad_seeds_in_editing(pipe, monkeypatch):
    """Editing strips a class name as sampling does (" dog " was unknown there), and a bad seed among several is
    refused before the first seed's image is sampled."""
    from hmar import editing
    from hmar.sampling import class_id
    assert class_id(" Dog ", ["cat", "dog"]) == 1 and class_id(" -1 ", None) == -1 and class_id("3", None) == 3
    for text in ("--1", "1-", "-"):   # no id and no name: an error, not int()'s ValueError
        with pytest.raises(HMARError, match="unknown class name"):
            class_id(text, ["cat", "dog"])
    assert editing._label(" dog ", ["cat", "dog"], 2) == 1 and editing._label(None, None, 2) == -1
    for bad, needle in (("cow", "unknown class name"), (1.5, "integer id"), ("5", "out of range")):
        with pytest.raises(HMARError, match=needle):
            editing._label(bad, ["cat", "dog"], 2)
    calls = []
    monkeypatch.setattr(editing, "sample", lambda *a, **k: calls.append(1))
    with pytest.raises(HMARError, match="64 bits"):
        pipe.inpaint(torch.rand(3, 64, 64), torch.ones(64, 64), seeds=[0, 2 ** 70])
    assert not calls


def test_editing_argument_types(pipe):
    img, mask = torch.rand(3, 64, 64), torch.ones(64, 64)
    with pytest.raises(HMARError, match="seeds"):
        pipe.inpaint(img, mask, seeds="0,1")
    with pytest.raises(HMARError, match="pad"):
        pipe.outpaint(img, pad=4)
    with pytest.raises(HMARError, match="target_size"):
        pipe.outpaint(img, target_size=100)
    a = pipe.outpaint(img, pad=np.array([8, 8, 8, 8]), generator=0)[0]
    assert np.array_equal(np.asarray(a), np.asarray(pipe.outpaint(img, pad=(8, 8, 8, 8), generator=0)[0]))


def test_mask_checkpoint_and_class_names_mismatches(model_dir, tmp_path, capsys):
    from hmar import VQVAE, tokenizer_config
    torch.manual_seed(0)
    for name in ("hmar-tiny", "nsp-tiny"):
        torch.save(build_model(model_config(name)).state_dict(), tmp_path / f"{name}.pth")
    torch.save(VQVAE(tokenizer_config("vqvae-tiny")).state_dict(), tmp_path / "vq.pth")
    torch.save(VQVAE(tokenizer_config("vqvae-64")).state_dict(), tmp_path / "vq48.pth")   # 48 channels, 16 groups
    (tmp_path / "names.txt").write_text("a\nb\n")
    torch.save({"a": torch.zeros(1)}, tmp_path / "odd.pth")   # a file of no known kind: named in the error
    f = {k: str(tmp_path / v) for k, v in dict(hmar="hmar-tiny.pth", nsp="nsp-tiny.pth", vq="vq.pth",
                                                names="names.txt", vq48="vq48.pth").items()}
    for argv, needle in [
        (["sample", "-c", f["hmar"], "--vqvae", f["vq"], "--mask-checkpoint", f["nsp"]], "assembled HMAR"),
        (["sample", "-c", f["nsp"], "--vqvae", f["vq"], "--mask-checkpoint", f["nsp"]], "not a stage-2"),
        (["sample", "-c", str(model_dir), "--mask-checkpoint", f["nsp"]], "model directory"),
        (["convert", "-c", f["hmar"], "--vqvae", f["vq"], "--class-names", f["names"]], "2 names"),
        (["convert", "-c", f["hmar"], "--vqvae", f["vq48"]], "not divisible by its norm_groups 32"),
        (["convert", "-c", f["hmar"], "--vqvae", f["names"].replace("names.txt", "odd.pth")],
         f"{f['names'].replace('names.txt', 'odd.pth')!r} is neither a VQ-VAE nor"),
        (["convert", "-c", f["hmar"], "--vqvae", f["vq"], "--out", str(tmp_path / "names.txt" / "sub")],
         "--out: cannot write into"),
    ]:
        rc, _, err = _cli(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "o")]), capsys)
        assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_from_preset_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny", seed=1)
    assert torch.equal(torch.rand(3), expected)
    b = HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_edit_methods_take_guidance_scale_like_call():
    pipe = HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny")
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    a = np.asarray(pipe.inpaint(img, mask, 1, guidance_scale=3.0)[0])
    b = np.asarray(pipe.inpaint(img, mask, 1, cfg=3.0)[0])
    assert (a == b).all()
    with pytest.raises(HMARError, match="cfg"):            # it is the guidance option that gets the value
        pipe.inpaint(img, mask, 1, guidance_scale=float("nan"))
    with pytest.raises(HMARError, match="not both"):
        pipe.inpaint(img, mask, 1, guidance_scale=3.0, cfg=3.0)


def test_stage2_from_a_stage1_model_refuses_a_zero_branch_depth():
    from hmar import HMAR, build_model, model_config
    from hmar.errors import HMARError
    nsp = build_model(model_config("nsp-tiny"))
    with pytest.raises(HMARError, match="branch_depth 0"):
        HMAR.from_next_scale(nsp, branch_depth=0)
    assert HMAR.from_next_scale(nsp, branch_depth=1).config.branch_depth == 1


def test_unwritable_output_folders_are_refused_before_the_work_and_files_get_the_umask_mode(tmp_path, capsys):
    """An --out under a file or in a system folder (/proc) failed only after the work, as a traceback from
    safetensors' writer (tokenize, train-classifier, convert); and safetensors' own temporary file left the written
    models 0600 (others could not read a shared model). Each output folder is now checked first."""
    import os
    import sys
    from hmar.fileio import ensure_writable_dir
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HMARError, match="cannot write into"):
        ensure_writable_dir(tmp_path / "afile" / "sub", "--out")
    assert ensure_writable_dir(tmp_path / "new" / "deep").is_dir()
    HMARPipeline.from_preset("hmar-tiny", "vqvae-tiny").save_pretrained(tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "m").iterdir()} == {0o666 & ~umask}
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
        make_shapes_folder(tmp_path / "d", 2, 2, 64)
        tok = make_random_tokenizer(tmp_path / "tok")
        for argv in (["tokenize", "--data", str(tmp_path / "d"), "--tokenizer", str(tok), "--out",
                      "/proc/hmar-test/c.safetensors"],
                     ["train-classifier", "--data", str(tmp_path / "d"), "--out", "/proc/hmar-test.safetensors"],
                     ["train", "--data", str(tmp_path / "d"), "--tokenizer", str(tok), "--out", "/proc/hmar-run"]):
            rc, _, err = _cli(argv, capsys)
            assert rc == 2 and err[-1].startswith("error: --out: cannot write into '/proc"), err


def test_save_pretrained_keeps_the_other_sections_of_config_json(model_dir, tmp_path):
    """Re-saving a loaded model dropped config.json's "training" section (steps, data, options of the run)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "m").mkdir()
    for f in model_dir.iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    cfg["training"] = {"steps": 7, "data": "somewhere"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    pipe = HMARPipeline.from_pretrained(tmp_path / "m")
    assert pipe.extra == {"training": {"steps": 7, "data": "somewhere"}}
    pipe.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["training"] == cfg["training"] and again["model"] == cfg["model"]


def test_an_empty_checkpoint_and_a_broken_classes_json_are_one_line_errors(tmp_path, capsys):
    """A 0-byte .pth crashed inside the error message (IndexError); a malformed classes.json was a JSON traceback."""
    (tmp_path / "empty.pth").write_bytes(b"")
    rc, _, err = _cli(["sample", "-c", str(tmp_path / "empty.pth"), "--vqvae", str(tmp_path / "empty.pth"),
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "the file is empty" in err[-1], err
    from hmar.training.synthetic import make_shapes_folder
    root = make_shapes_folder(tmp_path / "d", 2, 2, 64)
    (root / "classes.json").write_text("{")
    rc, _, err = _cli(["train-classifier", "--data", str(root), "--out", str(tmp_path / "c.safetensors")], capsys)
    assert rc == 2 and "classes.json is not valid JSON" in err[-1] and "fix or delete it" in err[-1], err


def test_a_schedule_for_a_model_without_masked_branch_is_checked_and_noted(tmp_path, capsys):
    """`sample --schedule` on a VAR model was validated, then silently unused."""
    HMARPipeline.from_preset("var-tiny", "vqvae-tiny").save_pretrained(tmp_path / "var")
    rc, _, err = _cli(["sample", "-c", str(tmp_path / "var"), "--schedule", "none", "--classes", "1", "--out",
                       str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 0 and any("this var model has no masked branch" in e for e in err), err
    rc, _, err = _cli(["sample", "-c", str(tmp_path / "var"), "--schedule", "[[1]]", "--classes", "1", "--out",
                       str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and "schedule" in err[-1]


def test_cli_outpaint_errors_name_the_flags(model_dir, tmp_path, capsys):
    """`--pad ''` said "pad=(left, top, right, bottom) or target_size=(W, H)" (the Python names) and a huge --pad
    advised downscaling the image."""
    from PIL import Image
    Image.new("RGB", (50, 40), "red").save(tmp_path / "i.png")
    base = ["edit", "outpaint", "-c", str(model_dir), "--image", str(tmp_path / "i.png"), "--out", str(tmp_path / "o.png")]
    for extra, needle in ((["--pad", ""], "exactly one of --pad"), (["--pad", "100000"], "pass a smaller --pad / --size"),
                          (["--size", "10x10"], "--size must be (W, H) at least the image size")):
        rc, _, err = _cli(base + extra, capsys)
        assert rc == 2 and needle in err[-1], err


def test_sample_classes_keep_a_class_name_that_holds_commas_whole():
    """`sample --classes "cats, dogs"` said: unknown class name 'cats' (the text was split at every comma)."""
    from hmar.cli.sample import split_classes
    names = ["cats, dogs", "x", "a,b,c"]
    assert split_classes("cats, dogs", names) == ["cats, dogs"]
    assert split_classes("x,cats, dogs,1", names) == ["x", "cats, dogs", "1"]
    assert split_classes("a,b,c,x", names) == ["a,b,c", "x"] and split_classes("a,b", names) == ["a", "b"]
    assert split_classes("1,2,,3", []) == ["1", "2", "3"]
    assert split_classes("Cats, Dogs", names) == ["Cats, Dogs"]                   # in any case, as one name is
