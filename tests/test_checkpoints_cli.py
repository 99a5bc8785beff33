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
    assert not list((tmp_path / "p").glob("*.tmp"))
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
