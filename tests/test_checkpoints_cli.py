"""Official-layout files load strictly; our format round-trips; the CLI turns files into PNGs and
bad input into one-line errors."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.checkpoint import (detect_kind, load_official_model, load_official_tokenizer, load_pretrained,
                             save_pretrained)
from hmar.cli import build_parser, main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    out = {}
    for name in ("hmar-tiny", "var-tiny", "nsp-tiny"):
        m = build_model(model_config(name))
        torch.save(m.state_dict(), d / f"{name}.pth")
        out[name] = (d / f"{name}.pth", m)
    vq = VQVAE(tokenizer_config("vqvae-tiny"))
    torch.save(vq.state_dict(), d / "vq.pth")
    out["vq"] = (d / "vq.pth", vq)
    (d / "notes.txt").write_text("not a checkpoint")
    out["dir"] = d
    return out


def test_official_files_load_strictly(files):
    for name in ("hmar-tiny", "var-tiny", "nsp-tiny"):
        path, ref = files[name]
        m = load_official_model(path)
        assert m.config.kind == name.split("-")[0]
        assert m.config.depth == 4 and m.config.embed_dim == 64 and m.config.num_heads == 2
        for (k, a), (k2, b) in zip(ref.state_dict().items(), m.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    vq = load_official_tokenizer(files["vq"][0], (1, 2, 3, 4))
    assert vq.config.ch == 32 and vq.config.ch_mult == (1, 1, 2, 2, 4) and vq.config.vocab_size == 64


def test_trainer_checkpoint_wrapping_and_kind_detection(files, tmp_path):
    path, ref = files["nsp-tiny"]
    wrapped = tmp_path / "ar-ckpt-last.pth"
    torch.save({"epoch": 3, "trainer": {"transformer_wo_ddp": ref.state_dict()}}, wrapped)
    assert load_official_model(wrapped).config.kind == "nsp"
    assert detect_kind(files["var-tiny"][1].state_dict()) == "var"


def test_stage1_plus_stage2_assemble_hmar(files, tmp_path):
    _, nsp = files["nsp-tiny"]
    # a stage-2 file: stage-1 keys with word_embed split and a mask embedding
    mp = dict(nsp.state_dict())
    mp["word_embed_bias"] = mp.pop("word_embed.bias")
    mp["mask_embed.weight"] = torch.randn(1, 64)
    mp = {k: (v + 1 if k.startswith("blocks.3") else v) for k, v in mp.items()}
    torch.save(mp, tmp_path / "mp.pth")
    m = load_official_model(files["nsp-tiny"][0], mask_path=tmp_path / "mp.pth")
    assert m.config.kind == "hmar"
    sd = m.state_dict()
    # stage-1 blocks 0..3 of depth 4 with 4 branch blocks... tiny nsp has branch_depth 8 capped to 4
    b = m.config.branch_depth
    assert torch.equal(sd[f"mask_blocks.{b - 1}.ffn.fc1.weight"], mp["blocks.3.ffn.fc1.weight"])
    assert torch.equal(sd[f"ns_blocks.{b - 1}.ffn.fc1.weight"], nsp.state_dict()["blocks.3.ffn.fc1.weight"])
    assert torch.equal(sd["mask_embed.weight"], mp["mask_embed.weight"])


def test_our_format_roundtrip(files, tmp_path):
    _, m = files["hmar-tiny"]
    _, vq = files["vq"]
    save_pretrained(tmp_path / "p", m, vq, class_names=list("abcdefghij"), sampling={"cfg": 2.0})
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors", "tokenizer.safetensors"]
    m2, vq2, cfg = load_pretrained(tmp_path / "p")
    assert cfg["model"]["class_names"][1] == "b" and cfg["sampling"]["cfg"] == 2.0
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    for (k, a), (k2, b) in zip(vq.state_dict().items(), vq2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    save_pretrained(tmp_path / "h", m, vq, dtype=torch.float16)
    assert (tmp_path / "h" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "p" / "model.safetensors").stat().st_size


def test_cli_sample_writes_one_png_per_class(files, tmp_path, capsys):
    for name in ("hmar-tiny", "var-tiny", "nsp-tiny"):
        out = tmp_path / name
        rc = main(["sample", "-c", str(files[name][0]), "--vqvae", str(files["vq"][0]), "--classes", "1,2,3",
                   "--out", str(out), "--no-progress", "--seed", "0"])
        assert rc == 0
        pngs = sorted(out.glob("000*.png"))
        assert len(pngs) == 3 and Image.open(pngs[0]).size == (64, 64)
        assert Image.open(out / "grid.png").size[1] > 64 * 3


def test_cli_convert_then_sample(files, tmp_path):
    rc = main(["convert", "-c", str(files["hmar-tiny"][0]), "--vqvae", str(files["vq"][0]), "-o", str(tmp_path / "conv")])
    assert rc == 0
    assert main(["sample", "-c", str(tmp_path / "conv"), "--classes", "0", "--out", str(tmp_path / "g.png"),
                 "--no-progress"]) == 0
    assert Image.open(tmp_path / "g.png").size[0] >= 64


@pytest.mark.parametrize("argv,needle", [
    (["--classes", "10"], "out of range"),
    (["--classes", "1", "--schedule", "[[1],[1,2],[9],[16]]"], "sums to 3"),
    (["--classes", "1", "--schedule", "wavy"], "unknown schedule"),
    (["-c", "{vq}", "--vqvae", "{vq}"], "VQ-VAE"),
    (["-c", "{dir}/missing.pth", "--vqvae", "{vq}"], "does not exist"),
    (["-c", "{dir}/notes.txt", "--vqvae", "{vq}"], "not a PyTorch checkpoint"),
    (["-c", "{hmar}"], "--vqvae"),
    (["-c", "{hmar}", "--vqvae", "{hmar}"], "transformer checkpoint, not a VQ-VAE"),
    (["--classes", "1", "--device", "cuda:7"] if not torch.cuda.is_available() else ["--classes", "99"], "cuda" if not torch.cuda.is_available() else "out of range"),
])
def test_cli_bad_input_is_one_line(files, argv, needle, capsys):
    sub = {"vq": str(files["vq"][0]), "dir": str(files["dir"]), "hmar": str(files["hmar-tiny"][0])}
    argv = [a.format(**sub) for a in argv]
    if "-c" in argv:
        argv = argv + (["--classes", "1"] if "--classes" not in argv else [])
    else:  # the tiny official-layout model (10 classes, 4 scales), whatever model is shipped
        argv = ["-c", sub["hmar"], "--vqvae", sub["vq"]] + argv
    rc = main(["sample", "--no-progress", "--out", "/tmp/hmar-never-written"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle.lower() in err[0].lower(), err


def test_cli_error_has_no_traceback_in_a_real_process(files):
    p = subprocess.run([sys.executable, "-m", "hmar", "sample", "-c", str(files["vq"][0]), "--vqvae",
                        str(files["vq"][0])], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_help_documents_every_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"sample", "convert"} <= set(sub.choices)
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"subcommand {name} has no help line"
        for action in p._actions:
            if action.dest != "help" and action.option_strings:
                assert action.help, f"hmar {name} {action.option_strings} is undocumented"


@pytest.mark.slow
def test_official_d16_layout_with_random_weights_samples_256px(tmp_path):
    """HMAR-d16 in the published layout (1.9 GB fp32) + the official VQ-VAE layout: strict load and
    one 256x256 PNG per class on the CPU."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        m = build_model(model_config("hmar-d16"))
        vq = VQVAE()
    def rand_sd(mod, std):
        sd = {}
        for k, v in mod.state_dict().items():
            if k.endswith(("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")):
                continue
            sd[k] = torch.randn(v.shape, generator=g) * std
        return sd
    sd = rand_sd(m, 0.02)
    from hmar.model.transformer import _bias_buffer, _levels
    sd["lvl_1L"], sd["attn_bias_for_masking"] = _levels(m.patch_nums), _bias_buffer(m.patch_nums, "block_diagonal")
    for i in range(8):
        for br in ("base", "ns", "mask"):
            sd[f"{br}_blocks.{i}.attn.zero_k_bias"] = torch.zeros(1024)
    torch.save(sd, tmp_path / "hmar-d16.pth")
    del sd
    vsd = rand_sd(vq, 0.02)
    vsd["quantize.ema_vocab_hit_SV"] = torch.zeros(10, 4096)
    torch.save(vsd, tmp_path / "vae.pth")
    del vsd
    out = tmp_path / "s"
    rc = main(["sample", "-c", str(tmp_path / "hmar-d16.pth"), "--vqvae", str(tmp_path / "vae.pth"),
               "--classes", "3,980", "--out", str(out), "--no-progress"])
    assert rc == 0
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (256, 256) for p in pngs)


def _one_line_error(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_convert_incomplete_or_mismatched_files_name_the_problem(files, tmp_path, capsys):
    """A transformer file without a key the model size is read from was a KeyError traceback; a stage-2 file of
    another model was blamed on the stage-1 file under renamed keys; a VAR file took a stage-2 file; a tokenizer of
    another vocabulary was converted and only refused when sampling."""
    sd = files["hmar-tiny"][1].state_dict()
    for key in ("pos_start", "class_emb.weight", "ns_head.weight", "word_embed.weight"):
        torch.save({k: v for k, v in sd.items() if k != key}, tmp_path / "cut.pth")
        msg = _one_line_error(["convert", "-c", str(tmp_path / "cut.pth"), "--vqvae", str(files["vq"][0]),
                               "-o", str(tmp_path / "o")], capsys)
        assert f"no '{key}'" in msg and "cut.pth" in msg
    torch.save({**sd, "pos_start": torch.zeros(1, 1, 65)}, tmp_path / "wide.pth")
    msg = _one_line_error(["convert", "-c", str(tmp_path / "wide.pth"), "--vqvae", str(files["vq"][0]),
                           "-o", str(tmp_path / "o")], capsys)
    assert "pos_start: 65" in msg and "class_emb.weight: 64" in msg
    nsp = files["nsp-tiny"][1].state_dict()
    mp = {("word_embed_bias" if k == "word_embed.bias" else k): v for k, v in nsp.items()}
    mp["mask_embed.weight"] = torch.zeros(1, 64)
    for name, damaged, needle in [("mp_cut.pth", {k: v for k, v in mp.items() if k != "blocks.3.ffn.fc1.weight"},
                                   "1 missing keys (e.g. blocks.3.ffn.fc1.weight)"),
                                  ("mp_shape.pth", {**mp, "head.weight": torch.zeros(3, 3)},
                                   "shape mismatch: head.weight (3, 3) vs (64, 64)")]:
        torch.save(damaged, tmp_path / name)
        msg = _one_line_error(["convert", "-c", str(files["nsp-tiny"][0]), "--mask-checkpoint", str(tmp_path / name),
                               "--vqvae", str(files["vq"][0]), "-o", str(tmp_path / "o")], capsys)
        assert f"stage-2 file '{tmp_path / name}'" in msg and needle in msg, msg
    torch.save(mp, tmp_path / "mp.pth")
    msg = _one_line_error(["convert", "-c", str(files["var-tiny"][0]), "--mask-checkpoint", str(tmp_path / "mp.pth"),
                           "--vqvae", str(files["vq"][0]), "-o", str(tmp_path / "o")], capsys)
    assert "VAR (block-causal)" in msg
    torch.save(VQVAE(tokenizer_config("vqvae-tiny", vocab_size=128)).state_dict(), tmp_path / "vq128.pth")
    msg = _one_line_error(["convert", "-c", str(files["hmar-tiny"][0]), "--vqvae", str(tmp_path / "vq128.pth"),
                           "-o", str(tmp_path / "o")], capsys)
    assert "vocab 128" in msg and "vocab 64" in msg
    assert not (tmp_path / "o").exists()
    # the assembled stage-1 + stage-2 file still converts
    assert main(["convert", "-c", str(files["nsp-tiny"][0]), "--mask-checkpoint", str(tmp_path / "mp.pth"),
                 "--vqvae", str(files["vq"][0]), "-o", str(tmp_path / "o")]) == 0


def test_cli_convert_checks_its_options_before_loading(files, tmp_path, capsys, monkeypatch):
    """--out naming a file and a --class-names file that is not text are refused before the (slow) load; a binary
    file was a UnicodeDecodeError traceback."""
    from hmar import HMARPipeline
    loads = []
    monkeypatch.setattr(HMARPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(1)))
    (tmp_path / "afile").write_text("x")
    base = ["convert", "-c", str(files["hmar-tiny"][0]), "--vqvae", str(files["vq"][0])]
    assert "is a file" in _one_line_error(base + ["-o", str(tmp_path / "afile")], capsys)
    msg = _one_line_error(base + ["--class-names", str(files["vq"][0]), "-o", str(tmp_path / "o")], capsys)
    assert "not a UTF-8 text file" in msg
    assert not loads and not (tmp_path / "o").exists()


def test_cli_files_of_a_model_directory_point_to_the_directory(files, tmp_path, capsys):
    """model.safetensors of our format passed as a checkpoint said 'no lvl_1L buffer'."""
    d = tmp_path / "conv"
    assert main(["convert", "-c", str(files["hmar-tiny"][0]), "--vqvae", str(files["vq"][0]), "-o", str(d)]) == 0
    for name in ("model.safetensors", "config.json"):
        msg = _one_line_error(["sample", "-c", str(d / name), "--vqvae", str(files["vq"][0]), "--out",
                               str(tmp_path / "s")], capsys)
        assert f"one file of the hmar model directory '{d}'" in msg and "pass the directory itself" in msg


def test_cli_sample_writes_pngs_atomically(files, tmp_path, capsys, monkeypatch):
    """A PNG write that fails halfway (a full disk, Ctrl-C) leaves the previous complete file, not a truncated one."""
    out = tmp_path / "s"
    argv = ["sample", "-c", str(files["hmar-tiny"][0]), "--vqvae", str(files["vq"][0]), "--classes", "1,2",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["0001_000.png", "0002_000.png", "grid.png"]
    real_save, calls = Image.Image.save, []

    def save_then_fail(self, fp, *a, **k):      # the second file: half written, then the disk is full
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, "wb") as f:
                f.write(before["0002_000.png"][:40])
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    msg = _one_line_error(argv + ["--seed", "1"], capsys)
    assert "No space left" in msg
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(after) == sorted(before)                      # no temporary file left behind
    assert after["0002_000.png"] == before["0002_000.png"] and after["grid.png"] == before["grid.png"]
    assert after["0001_000.png"] != before["0001_000.png"]      # the first file was rewritten (seed 1), whole
    assert Image.open(out / "0001_000.png").size == (64, 64)


@pytest.mark.parametrize("failing", [1, 2])   # the model's weights, or the tokenizer's once the model's are written
def test_save_pretrained_failed_write_leaves_the_previous_files(files, tmp_path, monkeypatch, failing):
    import safetensors.torch
    _, m = files["hmar-tiny"]
    _, vq = files["vq"]
    d = tmp_path / "p"
    save_pretrained(d, m, vq)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real, calls = safetensors.torch.save_file, []

    def fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) < failing:
            return real(tensors, path, metadata)
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="No space"):
        save_pretrained(d, m, vq, dtype=torch.float16)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before   # nothing replaced, no temporary file left
    with pytest.raises(OSError, match="No space"):                   # into a new folder: no config.json, no weights
        save_pretrained(tmp_path / "new", m, vq)
    assert list((tmp_path / "new").iterdir()) == []
