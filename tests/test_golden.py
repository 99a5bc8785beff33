"""Golden equivalence with the official implementations (outputs stored in ../shared/compat/golden).

For every golden file: build our tokenizer and model from its config, load its state dicts strictly,
and reproduce the code indices exactly and reconstruction / teacher-forcing input / logits to 1e-4.
``HMAR_GOLDEN_DIR`` points at another folder of golden files. A missing folder fails (never skips).
"""
import pytest
import torch

from hmar import VQVAE, build_model
from hmar.presets import ModelConfig, TokenizerConfig

from conftest import golden_dir

FILES = sorted(golden_dir().glob("*.pt")) if golden_dir().is_dir() else []


def test_golden_folder_present():
    assert FILES, f"no golden files in {golden_dir()} (set HMAR_GOLDEN_DIR or put ../shared beside the checkout)"


def _build(g):
    c = g["config"]
    tok = VQVAE(TokenizerConfig(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                                patch_nums=tuple(c["patch_nums"]), share_quant_resi=c["share_quant_resi"]))
    kind = {"hmar": "nsp", "var": "var"}[c["kind"]]
    heads = c["num_heads"]
    cfg = ModelConfig(kind=kind, depth=c["depth"], embed_dim=c["embed_dim"], num_heads=heads,
                      num_classes=c["num_classes"], vocab_size=c["vocab_size"], z_channels=c["z_channels"],
                      patch_nums=tuple(c["patch_nums"]), attn_l2_norm=c.get("attn_l2_norm", True))
    model = build_model(cfg)
    f32 = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    tok.load_state_dict(f32(g["vqvae_state_dict"]), strict=True)
    model.load_state_dict(f32(g["model_state_dict"]), strict=True)
    return tok.eval(), model.eval()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
@torch.no_grad()
def test_golden_equivalence(path):
    g = torch.load(path, weights_only=True)
    tok, model = _build(g)
    idx = tok.img_to_indices(g["image"].float())
    assert len(idx) == len(g["indices"])
    for ours, ref in zip(idx, g["indices"]):
        assert torch.equal(ours, ref.long()), "code indices differ"
    rec = tok.indices_to_img(g["indices"])
    torch.testing.assert_close(rec, g["reconstruction"].float(), atol=1e-4, rtol=0)
    x = tok.next_scale_inputs(g["indices"])
    torch.testing.assert_close(x, g["teacher_forcing_input"].float(), atol=1e-4, rtol=0)
    logits = model(g["labels"], g["teacher_forcing_input"].float())
    torch.testing.assert_close(logits, g["logits"].float(), atol=1e-4, rtol=0)
    # the attention mask pattern stored in the official file is the one the model uses
    assert model.pattern == {"hmar": "block_diagonal", "var": "block_causal"}[g["config"]["kind"]]
