"""The README's examples work as written: every ``hmar`` command line of its shell blocks parses with the CLI (no
renamed or missing flag, no bad choice), and its Python blocks run, on tiny models and files made here in place of
the weights they name."""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.checkpoint import save_pretrained
from hmar.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(lang: str):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def command_lines():
    """Each ``hmar`` command of the bash blocks as argv (continuations joined, comments and ``[optional]`` brackets
    dropped); ``hmar SUB ...`` takes the arguments of the block's last full ``hmar SUB`` line."""
    out, full = [], {}
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line.replace("[", "").replace("]", ""), comments=True)
            if "hmar" not in argv:
                continue
            argv = argv[argv.index("hmar") + 1:]
            if "..." in argv:
                i = argv.index("...")
                argv = full[argv[0]] + argv[i + 1:]
            elif "&&" in argv:
                argv = argv[:argv.index("&&")]
            else:
                full[argv[0]] = argv
            out.append(argv)
    return out


def test_readme_has_the_commands_it_documents():
    subs = {a[0] for a in command_lines()}
    assert {"sample", "convert", "edit", "serve", "train", "train-tokenizer", "tokenize", "data", "generate",
            "eval", "train-classifier"} <= subs, subs


@pytest.mark.parametrize("argv", command_lines(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README's `hmar {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny HMAR in our format and in the official layout, for the README's file names."""
    d = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model, vq = build_model(model_config("hmar-tiny", num_classes=400)), VQVAE(tokenizer_config("vqvae-tiny"))
    save_pretrained(d / "hmar-d16", model, vq)
    torch.save(model.state_dict(), d / "hmar-d16.pth")
    torch.save(vq.state_dict(), d / "vae_ch160v4096z32.pth")
    return d


def test_readme_pipeline_block_runs(tiny_dir, monkeypatch):
    """Block 1 (from_pretrained in both formats, the call with its options, save_pretrained) as written."""
    monkeypatch.chdir(tiny_dir)
    code = blocks("python")[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = scope["images"]
    assert len(images) == 8 and all(isinstance(im, Image.Image) for im in images)
    from hmar import HMARPipeline
    again = HMARPipeline.from_pretrained("my-model/")(class_labels=[207, 360], num_images_per_label=4,
                                                      guidance_scale=1.7, generator=torch.Generator().manual_seed(0))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))


def test_readme_sample_block_runs():
    """Block 2 with the tiny presets in place of hmar-d16 and the full tokenizer (same names, same calls)."""
    code = blocks("python")[1].replace('model_config("hmar-d16")', 'model_config("hmar-tiny")') \
                              .replace("VQVAE()", 'VQVAE(tokenizer_config("vqvae-tiny"))')
    assert 'model_config("hmar-tiny")' in code and "vqvae-tiny" in code
    scope = {"tokenizer_config": tokenizer_config}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.images.shape[0] == 3 and len(out.indices) == len(model_config("hmar-tiny").patch_nums)


def test_readme_editing_block_runs():
    """Block 3 with the shipped model: inpaint, outpaint and a class edit by class name."""
    from hmar import HMARPipeline
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), bool)
    mask[:, 32:] = True
    scope = {"HMARPipeline": HMARPipeline, "image": image, "mask": mask, "region_mask": mask}
    code = blocks("python")[2]
    pipe = HMARPipeline.from_pretrained(None)
    assert "Flags" in pipe.class_names      # the class name the block edits toward
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"] is not None
