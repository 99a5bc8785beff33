"""Our modules have exactly the official state-dict keys, shapes, dtypes and order (built on meta)."""
import json

import pytest
import torch

from hmar import VQVAE, build_model, model_config
from hmar.model.keymaps import hmar_to_nsp, nsp_to_hmar

from conftest import compat_dir


def _manifest(name):
    path = compat_dir() / name
    if not path.exists():
        pytest.fail(f"compat manifest {path} is missing: ../shared must sit beside the checkout")
    return [(k, list(s), d) for k, s, d in json.loads(path.read_text())["tensors"]]


def _ours(module):
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("preset,manifest", [("hmar-d16", "hmar_d16_256.json"), ("var-d16", "var_d16_256.json")])
def test_transformer_keys_match_official(preset, manifest):
    with torch.device("meta"):
        m = build_model(model_config(preset))
    assert _ours(m) == _manifest(manifest)


def test_vqvae_keys_match_official():
    with torch.device("meta"):
        vq = VQVAE()
    ours, ref = _ours(vq), _manifest("var_vqvae_ch160v4096z32.json")
    assert ours == ref
    assert len(ours) == 324
    # parameters only (the manifest's numel also counts the [10, 4096] hit buffer)
    assert sum(v.numel() for v in vq.parameters()) == 108_948_355


def test_stage1_has_var_layout_and_maps_to_hmar():
    """The stage-1 model has VAR's keys; its blocks split into trunk + next-scale branch of HMAR-d16."""
    with torch.device("meta"):
        nsp = build_model(model_config("nsp-d16"))
        hm = build_model(model_config("hmar-d16"))
    assert [k for k, _, _ in _ours(nsp)] == [k for k, _, _ in _manifest("var_d16_256.json")]
    mapped = nsp_to_hmar(nsp.state_dict(), 16, 8)
    mapped["mask_embed.weight"] = hm.mask_embed.weight
    assert set(mapped) == set(hm.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in hm.state_dict().items()}
    back = hmar_to_nsp(hm.state_dict(), 16, 8)
    assert set(back) == set(nsp.state_dict())


@pytest.mark.parametrize("depth", [12, 20, 24, 30])
def test_other_depths_follow_the_size_rule(depth):
    with torch.device("meta"):
        m = build_model(model_config(f"hmar-d{depth}"))
    sd = m.state_dict()
    C = 64 * depth
    assert sd["pos_1LC"].shape == (1, 680, C)
    assert sd["base_blocks.0.attn.scale_mul_1H11"].shape == (1, depth, 1, 1)
    assert len({k.split(".")[1] for k in sd if k.startswith("base_blocks.")}) == depth - 8
    assert len({k.split(".")[1] for k in sd if k.startswith("mask_blocks.")}) == 8
    # parameter counts against the official GPU-counted numbers (hmar-spec section 11b), to 0.01M
    expected = {20: 845.52e6, 24: 1384.33e6, 30: 2556.32e6}
    if depth in expected:
        n = sum(v.numel() for v in m.parameters())
        assert abs(n - expected[depth]) < 0.01e6


def test_var_d16_parameter_count():
    with torch.device("meta"):
        m = build_model(model_config("var-d16"))
    assert sum(v.numel() for v in m.parameters()) == 310_283_520
