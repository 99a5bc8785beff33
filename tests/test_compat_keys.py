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


# ------------------------------------------------------------------ official layouts with one key wrong
def _manifest_state_dict(name):
    """The manifest's tensors on the meta device (no memory), with the real level and mask buffers that the scale
    schedule and the model kind are read from."""
    from hmar.model.transformer import _bias_buffer, _levels
    from hmar.presets import PATCH_NUMS
    sd = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, s, d in _manifest(name)}
    if "lvl_1L" in sd:
        sd["lvl_1L"] = _levels(PATCH_NUMS[256])
        sd["attn_bias_for_masking"] = _bias_buffer(PATCH_NUMS[256], "block_diagonal" if "hmar" in name else "causal")
    return sd


def _edge_keys(keys):
    """The keys outside module lists and those of the first and the last entry of every list (block 0 and 15,
    encoder level 0 and 4, ...): each kind of key once, without trying all of them."""
    import re
    last = {}
    for k in keys:
        for m in re.finditer(r"\.(\d+)\.", k):
            last[k[:m.start()]] = max(last.get(k[:m.start()], 0), int(m.group(1)))
    return [k for k in keys if all(int(m.group(1)) in (0, last[k[:m.start()]]) for m in re.finditer(r"\.(\d+)\.", k))]


# (mode, key) that load, as another model size: the only tensor that carries that size (num_classes, the latent
# channels or vocabulary that load_any checks against the tokenizer / transformer), or a statistic reset on load
_OTHER_SIZE = {("first", "class_emb.weight"), ("last", "word_embed.weight"), ("first", "quantize.embedding.weight"),
               ("first", "quantize.ema_vocab_hit_SV"), ("last", "quantize.ema_vocab_hit_SV")}


@pytest.mark.parametrize("manifest", ["hmar_d16_256.json", "var_d16_256.json", "var_vqvae_ch160v4096z32.json"])
def test_official_layout_with_one_key_missing_extra_or_misshapen_names_it(manifest, monkeypatch):
    """The official layouts load (as hmar-d16 / var-d16 / the default VQ-VAE); with one key missing, one extra
    or one of a wrong shape (first or last dimension + 1) the load raises an HMARError that names that key (it
    used to be a bare KeyError for the keys the model size is read from, or an error naming another key)."""
    import hmar.checkpoint as ckpt
    from hmar.errors import HMARError
    from hmar.presets import tokenizer_config
    load = ckpt.load_official_tokenizer if "vqvae" in manifest else ckpt.load_official_model
    base = _manifest_state_dict(manifest)
    current = {}
    monkeypatch.setattr(ckpt, "read_state_dict", lambda path: current["sd"])

    def attempt(sd):
        current["sd"] = sd
        return load("official.pth")

    if "vqvae" in manifest:
        assert attempt(base).config == tokenizer_config("vqvae-ch160")
    else:
        cfg = attempt(base).config
        assert cfg == model_config(manifest.split("_")[0] + "-d16")
    keys = _edge_keys(list(base))
    assert len(keys) < len(base) // 2
    for mode in ("missing", "first", "last"):
        for key in keys:
            sd = dict(base)
            if mode == "last" and sd[key].dim() == 1:
                continue                                  # the same change as "first"
            if mode == "missing":
                del sd[key]
            else:
                shape = list(sd[key].shape)
                shape[0 if mode == "first" else -1] += 1
                sd[key] = torch.zeros(shape, dtype=sd[key].dtype, device=sd[key].device)
            if (mode, key) in _OTHER_SIZE:
                attempt(sd)
                continue
            with pytest.raises(HMARError) as e:
                attempt(sd)
            assert key in str(e.value), (mode, key, str(e.value))
    with pytest.raises(HMARError, match="unexpected keys .e.g. extra.weight"):
        attempt({**base, "extra.weight": torch.zeros(3)})
