"""Unit tests of the training components: loss weights, schedules, optimiser groups, masks, losses,
config precedence, codebook statistics, GAN/perceptual parts, checkpoint files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from hmar.errors import HMARError
from hmar.model import build_model
from hmar.presets import PATCH_NUMS, model_config
from hmar.training.config import TokenizerTrainConfig, TrainConfig, add_config_args, build_config
from hmar.training.losses import draw_masks, masked_ce, scale_loss_weights, token_loss_weights, weighted_ce
from hmar.training.optim import param_groups
from hmar.training.schedule import Schedule, lr_factor, wd_value

SPEC_256 = [0.0247, 0.0642, 0.1150, 0.1379, 0.1402, 0.1329, 0.1208, 0.1054, 0.0882, 0.0709]
SPEC_512 = [0.0196, 0.0667, 0.1141, 0.1389, 0.1379, 0.1246, 0.1112, 0.1037, 0.0958, 0.0876]


# ------------------------------------------------------------------------------------ loss weights
def test_gaussian_weights_match_the_official_values():
    w256 = scale_loss_weights(PATCH_NUMS[256], "gaussian")
    w512 = scale_loss_weights(PATCH_NUMS[512], "gaussian")
    assert np.allclose(w256.numpy(), SPEC_256, atol=5e-5)
    assert np.allclose(w512.numpy(), SPEC_512, atol=5e-5)
    assert abs(float(w256.sum()) - 1) < 1e-12
    assert int(w256.argmax()) == 4  # peak at the 5x5 scale


def test_uniform_and_equal_weights():
    u = scale_loss_weights(PATCH_NUMS[256], "uniform")
    assert abs(float(u[-1]) - 256 / 680) < 1e-12 and abs(float(u[0]) - 1 / 680) < 1e-12  # 37.6 % / 0.15 %
    t = token_loss_weights(PATCH_NUMS[256], "uniform")
    assert t.shape == (680,) and torch.allclose(t, torch.full((680,), 1 / 680))
    e = token_loss_weights(PATCH_NUMS[256], "equal")
    assert abs(float(e.sum()) - 10) < 1e-4 and abs(float(e[-1]) - 1 / 256) < 1e-9
    g = token_loss_weights(PATCH_NUMS[256], "gaussian")
    assert abs(float(g[-256:].sum()) - SPEC_256[-1]) < 5e-5
    with pytest.raises(HMARError):
        scale_loss_weights(PATCH_NUMS[256], "lognormal")


def test_weighted_ce_is_batch_mean_of_weighted_token_sums():
    torch.manual_seed(0)
    logits, tgt = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    w = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    loss, ce = weighted_ce(logits, tgt, w)
    ref = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), tgt, reduction="none")
    assert torch.allclose(ce, ref)
    assert torch.allclose(loss, (ref * w).sum(1).mean())


# ------------------------------------------------------------------------------------ schedule
def test_lin0_schedule_warmup_hold_and_decay():
    total, warm = 1000, 100
    assert lr_factor(0, total, warm) == pytest.approx(0.005)
    assert lr_factor(50, total, warm) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_factor(100, total, warm) == 1.0
    # hold for 5 % of the 899 post-warm-up step intervals
    assert lr_factor(100 + 44, total, warm) == 1.0
    assert lr_factor(total - 1, total, warm, final=0.1) == pytest.approx(0.1)
    mid = lr_factor(100 + round(0.525 * 899), total, warm, final=0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5, abs=2e-3)
    vals = [lr_factor(s, total, warm) for s in range(100, total)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # non-increasing after warm-up
    assert lr_factor(total - 1, total, warm, kind="cos", final=0.0) == pytest.approx(0.0)
    s = Schedule(3e-4, total, warm, wd=0.05, wd_end=0.08)
    assert s(0) == (pytest.approx(1.5e-6), pytest.approx(0.05))
    assert s(total - 1)[1] == pytest.approx(0.08)
    assert wd_value(499, 999, 0.05, 0.08) == pytest.approx(0.065, abs=1e-4)


# ------------------------------------------------------------------------------------ optimiser groups
def test_weight_decay_groups_follow_the_official_rule():
    m = build_model(model_config("nsp-tiny"))
    groups = param_groups(m.named_parameters())
    decay = set(groups[0]["names"])
    keep = set(groups[1]["names"])
    assert groups[0]["wd_scale"] == 1.0 and groups[1]["wd_scale"] == 0.0
    for name in ("pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias",
                 "head.bias", "word_embed.bias"):
        assert name in keep, name
    for name in ("class_emb.weight", "word_embed.weight", "head.weight", "blocks.0.attn.mat_qkv.weight",
                 "blocks.0.ffn.fc1.weight"):
        assert name in decay, name
    assert len(decay) + len(keep) == len(list(m.parameters()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the fused CUDA kernel)"))])
@pytest.mark.parametrize("clip", [2.0, 0.0])
def test_clipping_inside_the_fused_adamw_equals_clip_grad_norm_then_step(clip, device, monkeypatch):
    """clip_and_step hands the clipping factor to the fused AdamW kernel (its grad_scale hook) instead of a
    foreach multiply over every gradient: same parameters, moments and returned norms as clip_grad_norm_ + step
    (fused and not) to fp32 rounding, over steps that clip (norm 10x) and steps that don't; no multiply pass."""
    from hmar.training.optim import clip_and_step

    def run(fused, in_kernel):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s).to(device)) for s in ((64, 32), (32,), (7, 5))]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
        norms = []
        for i in range(4):
            for p in ps:
                p.grad = torch.randn_like(p) * (10.0 if i % 2 == 0 else 0.01)
            norms.append(float(clip_and_step(opt, ps, clip, in_kernel=in_kernel)))
            assert not hasattr(opt, "grad_scale")                # the factor is this step's only
        return ps, [opt.state[p]["exp_avg_sq"] for p in ps], norms

    muls = []
    real_mul = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: (muls.append(1), real_mul(*a, **k))[1])
    ref_p, ref_v, ref_n = run(fused=False, in_kernel=False)     # clip_grad_norm_ + the plain AdamW
    assert len(muls) == (4 if clip > 0 else 0) and (clip == 0 or ref_n[0] > 100 * clip)
    muls.clear()
    for fused in (True, False):
        ps, vs, norms = run(fused=fused, in_kernel=True)
        assert muls == [] or not fused                           # fused: no multiply pass over the gradients
        muls.clear()
        assert norms == pytest.approx(ref_n, rel=1e-6)
        for a, b in zip(ps + vs, ref_p + ref_v):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_and_step_takes_the_plain_way_where_the_kernel_cannot_clip():
    """A group that is not fused (it would refuse a grad_scale), params short of the optimiser's (the factor would
    scale the others too), or bf16 gradients: clip_grad_norm_ and a plain step, same result as calling them."""
    from hmar.training.optim import clip_and_step

    def params():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))]

    def grads(ps):
        for p in ps:
            p.grad = torch.full_like(p, 3.0)

    for case in ("mixed groups", "subset"):
        a, b = params(), params()
        groups = lambda ps: ([{"params": [ps[0]], "fused": True}, {"params": [ps[1]], "fused": False}]
                             if case == "mixed groups" else ps)
        oa, ob = torch.optim.AdamW(groups(a), lr=0.1, fused=case == "subset"), torch.optim.AdamW(groups(b), lr=0.1)
        grads(a), grads(b)
        sub = a if case == "mixed groups" else a[:1]
        na = clip_and_step(oa, sub, 1.0)
        nb = torch.nn.utils.clip_grad_norm_(b if case == "mixed groups" else b[:1], 1.0)
        ob.step()
        assert float(na) == pytest.approx(float(nb)) and not hasattr(oa, "grad_scale")
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
        if case == "subset":                                  # the parameter left out is stepped unclipped
            assert torch.equal(a[1].grad, torch.full_like(a[1], 3.0))
    a = [nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    a[0].grad = torch.full_like(a[0], 3.0)
    clip_and_step(torch.optim.AdamW(a, lr=0.1, fused=True), a, 1.0)   # the kernel's fp32 grad_scale: no error


# ------------------------------------------------------------------------------------ stage-2 masks / loss
def test_masks_per_sample_ceil_counts_and_never_scale0():
    pn = (1, 2, 3, 4)
    keys = [(0, 1, i) for i in range(64)]
    m = draw_masks(keys, pn)
    assert m.shape == (64, 30) and not m[:, 0].any()
    assert torch.equal(m, draw_masks(keys, pn))            # deterministic in the keys
    assert not torch.equal(m[0], m[1])                      # not shared across the batch
    counts = m[:, 1:5].sum(1)
    assert counts.min() >= 1 and counts.max() <= 4
    # per sample, the counts of all scales come from the same gamma: n_k = ceil(g * pn_k^2)
    from hmar.training.data import keyed_rng
    for b in range(8):
        g = keyed_rng(*keys[b], 3).random()
        exp = [max(1, math.ceil(g * p * p)) for p in pn[1:]]
        got = [int(m[b, s:s + p * p].sum()) for s, p in zip((1, 5, 14), pn[1:])]
        assert got == exp
    half = draw_masks(keys[:4], pn, gamma=0.5)
    assert [int(half[0, s:s + p * p].sum()) for s, p in zip((1, 5, 14), pn[1:])] == [2, 5, 8]
    # the ratio is ~U(0,1) per sample: mean ratio near 0.5, the 4x4 share is exactly mean(ceil(16 g) / 16)
    big = draw_masks([(0, 0, i) for i in range(2000)], pn)
    g = np.array([keyed_rng(0, 0, i, 3).random() for i in range(2000)])
    assert abs(g.mean() - 0.5) < 0.05 and g.min() < 0.01 and g.max() > 0.99
    assert float(big[:, 14:].float().mean()) == pytest.approx(np.mean(np.ceil(16 * g) / 16), abs=1e-6)


def test_masked_ce_token_mean_is_split_invariant():
    torch.manual_seed(0)
    logits, tgt = torch.randn(4, 6, 5), torch.randint(0, 5, (4, 6))
    mask = torch.rand(4, 6) < 0.5
    mask[:, 1] = True
    full, ce = masked_ce(logits, tgt, mask, "token")
    assert torch.allclose(full, (ce * mask).sum() / mask.sum())
    total = mask.sum().float()
    halves = [masked_ce(logits[i:i + 2], tgt[i:i + 2], mask[i:i + 2], "token", total_masked=total, world=2)[0]
              for i in (0, 2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, full)   # what DDP's gradient averaging sees
    img, _ = masked_ce(logits, tgt, mask, "image")
    assert torch.allclose(img, ((ce * mask).sum(1) / mask.sum(1)).mean())


# ------------------------------------------------------------------------------------ config
def test_config_precedence_yaml_then_flags(tmp_path):
    import argparse
    y = tmp_path / "c.yaml"
    y.write_text("model: var-tiny\nbatch-size: 64\nbetas: [0.8, 0.9]\nmodel_override: {depth: 2}\n")
    p = argparse.ArgumentParser()
    add_config_args(p, TrainConfig)
    args = p.parse_args(["--config", str(y), "--batch-size", "16", "--model-override", "embed_dim=32"])
    cfg = build_config(TrainConfig, args)
    assert cfg.model == "var-tiny" and cfg.batch_size == 16 and cfg.betas == (0.8, 0.9)
    assert cfg.model_override == {"embed_dim": 32}            # flags replace the YAML value
    assert cfg.epochs == TrainConfig().epochs
    y.write_text("modle: var-tiny\n")
    with pytest.raises(HMARError, match="modle"):
        build_config(TrainConfig, p.parse_args(["--config", str(y)]))


def test_shipped_yaml_configs_load():
    from hmar.training.config import CONFIG_DIR
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cls = TokenizerTrainConfig if f.stem.startswith("vqvae") else TrainConfig
        cfg = build_config(cls, config=str(f))
        if isinstance(cfg, TrainConfig):
            model_config(cfg.model, **cfg.model_override)  # a valid preset
    d16 = build_config(TrainConfig, config="hmar-d16")
    assert (d16.batch_size, d16.epochs, d16.blr, d16.final_lr_ratio, d16.loss_weight) == (768, 200, 1e-4, 0.1, "gaussian")


def test_help_documents_every_option(capsys):
    from dataclasses import fields

    from hmar.cli import main
    for cmd, cls in (("train", TrainConfig), ("train-tokenizer", TokenizerTrainConfig)):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in out, f.name


def test_train_tokenizer_help_lists_every_tokenizer_preset(capsys):
    """The help named 3 of the 6 presets; the README's example uses vqvae-64, which it did not list."""
    from hmar.cli import main
    from hmar.presets import _TOKENIZERS
    with pytest.raises(SystemExit):
        main(["train-tokenizer", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    listed = out[out.index("--preset PRESET tokenizer preset ("):].split(")")[0]
    assert sorted(listed.split("(")[1].split(", ")) == sorted(_TOKENIZERS), listed


def test_help_says_what_negative_sample_every_and_zero_eval_batches_do(capsys):
    """--sample-every: any negative value means no grids at all (the loop tests ``>= 0``); --eval-batches 0:
    no cap, the whole split (EvalBatches takes 0 as no limit)."""
    from hmar.cli import main
    from hmar.training.data import EvalBatches
    assert len(EvalBatches(10, 2, 0, 1, 0)) == 5 == len(EvalBatches(10, 2, 0, 1, None)) > len(EvalBatches(10, 2, 0, 1, 1))
    for cmd in ("train", "train-tokenizer"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "(0: the whole val split" in out.rsplit("--eval-batches EVAL_BATCHES", 1)[1].split("--")[0], cmd
        if cmd == "train":
            assert "any negative value, e.g. -1: never" in out.rsplit("--sample-every SAMPLE_EVERY", 1)[1].split("--")[0]


# ------------------------------------------------------------------------------------ tokenizer parts
def test_ema_hits_rule_and_usage():
    from hmar.training.tokenizer_trainer import code_usage, update_ema_hits
    ema = torch.zeros(2, 4)
    update_ema_hits(ema, torch.tensor([[4.0, 0, 0, 0], [1, 1, 1, 1]]), 0)
    assert torch.equal(ema, torch.tensor([[4.0, 0, 0, 0], [1, 1, 1, 1]]))      # first update copies
    update_ema_hits(ema, torch.tensor([[0.0, 4, 0, 0], [1, 1, 1, 1]]), 1)
    assert torch.allclose(ema[0], torch.tensor([3.6, 0.4, 0, 0]))             # then factor 0.9
    assert code_usage(ema) == [50.0, 100.0]


def test_dead_codes_are_reinitialised_from_batch_residuals(tmp_path):
    from hmar.training.synthetic import SMALL_TOKENIZER, make_shapes_folder
    from hmar.training.tokenizer_trainer import TokenizerTrainer, residual_pool
    make_shapes_folder(tmp_path / "d", 2, 4, 64)
    cfg = TokenizerTrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "run"), batch_size=4, max_steps=1,
                               tokenizer_override=dict(SMALL_TOKENIZER), dead_code_steps=5, progress=False,
                               tensorboard=False)
    tr = TokenizerTrainer(cfg)
    x = torch.stack([tr.data.train[(i, 0)]["img"] for i in range(4)])
    out = tr._train_step(x)
    # at step 0, every code that this batch did not hit counts as dead
    assert 0 < out["reinit"] < tr.vq.config.vocab_size
    assert (tr.last_used == 0).all()
    with torch.no_grad():
        f = tr.vq.encode_features(x)
        pool = residual_pool(tr.vq.quantize, f)
    tr.step = 3
    assert tr._reinit_dead_codes(f) == 0                      # nothing unused for 5 steps yet
    tr.step = 5
    assert tr._reinit_dead_codes(f) == tr.vq.config.vocab_size
    new = tr.vq.quantize.embedding.weight.detach()
    exact = torch.cdist(new, pool, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(exact.max()) < 1e-6   # each new code IS a residual vector
    assert len({tuple(r.tolist()) for r in new}) == tr.vq.config.vocab_size  # drawn without replacement
    assert (tr.last_used == 5).all()
    tr.log.close()


def test_gan_parts():
    from hmar.training.gan import PatchDiscriminator, adaptive_weight, hinge_d_loss
    d = PatchDiscriminator(3, 8, 3)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(1.0)
    w = nn.Parameter(torch.ones(3))
    rec, g = (w * 2).sum(), (w * 0.5).sum()
    assert float(adaptive_weight(rec, g, w)) == pytest.approx(4.0, rel=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_perceptual_loss_from_local_torchscript(tmp_path):
    from hmar.training.gan import PerceptualLoss
    net = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    net.save(str(tmp_path / "feat.pt"))
    pl = PerceptualLoss(tmp_path / "feat.pt")
    x = torch.randn(2, 3, 16, 16)
    assert float(pl(x, x)) == 0.0 and float(pl(x, -x)) > 0
    with pytest.raises(HMARError, match="does not exist"):
        PerceptualLoss(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_manager_keeps_last_n_and_restores_rng(tmp_path):
    from hmar.training.checkpointing import CheckpointManager, capture_rng, restore_rng
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    for s in (5, 10, 15):
        mgr.save(s, {"x": torch.tensor([s])})
    assert [p.name for p in mgr.paths()] == ["step_00000010.pt", "step_00000015.pt"]
    ck = mgr.load_latest()
    assert ck["step"] == 15 and int(ck["x"]) == 15 and not list((tmp_path / "ck").glob(".*tmp*"))
    st = capture_rng()
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    restore_rng(st)
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_yaml_values_are_typed_and_checked_like_flags(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    add_config_args(p, TrainConfig)
    y = tmp_path / "c.yaml"
    y.write_text("lr: 3e-4\nwarmup_epochs: 1\nout: 7\n")     # YAML 1.1 reads 3e-4 (no dot) as a string
    cfg = build_config(TrainConfig, p.parse_args(["--config", str(y)]))
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float) and cfg.warmup_epochs == 1.0 and cfg.out == "7"
    for text, needle in [("precision: fp8\n", "--precision: 'fp8' is not one of"),
                         ("batch_size: many\n", "--batch-size: expected an integer"),
                         ("lr: fast\n", "--lr: expected a number"),
                         ("hflip: 1\n", "--hflip: expected true or false"),
                         ("betas: [0.9]\n", "--betas: expected 2 values"),
                         # null for an option that needs a value crashed mid-run (after writing the run folder)
                         ("seed: null\n", "--seed: expected a value, got null"),
                         ("batch_size: null\n", "--batch-size: expected a value, got null"),
                         ("precision: ~\n", "--precision: expected a value, got null"),
                         ("betas: null\n", "--betas: expected a value, got null"),
                         ("model_override: 5\n", "--model-override expects KEY=VALUE items"),
                         ("model_override: [5]\n", "--model-override expects KEY=VALUE items")]:
        y.write_text(text)
        with pytest.raises(HMARError, match=needle):
            build_config(TrainConfig, p.parse_args(["--config", str(y)]))
    y.write_text("model_override: depth=2\nlr: null\ninit: ~\n")   # one KEY=VALUE string; null where it is allowed
    cfg = build_config(TrainConfig, p.parse_args(["--config", str(y)]))
    assert cfg.model_override == {"depth": 2} and cfg.lr is None and cfg.init is None
    y.write_bytes(b"data: \xff\xfe\n")
    with pytest.raises(HMARError, match="not UTF-8"):
        build_config(TrainConfig, p.parse_args(["--config", str(y)]))


@pytest.mark.parametrize("argv,needle", [
    (["train", "--log-every", "0"], "--log-every must be at least 1"),
    (["train", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["train", "--sample-classes", "0"], "--sample-classes must be at least 1"),
    (["train", "--workers", "-1"], "--workers must be at least 0"),
    (["train-tokenizer", "--log-every", "0"], "--log-every must be at least 1"),
    (["train", "--warmup-steps", "-3"], "--warmup-steps must be at least 0, got -3"),
    (["train", "--warmup-epochs", "-0.5"], "--warmup-epochs must be at least 0, got -0.5"),
    (["train-tokenizer", "--warmup-steps", "-1"], "--warmup-steps must be at least 0, got -1"),
    (["train", "--eval-every", "-5"], "--eval-every must be at least 0, got -5"),
    (["train-tokenizer", "--ckpt-every", "-1"], "--ckpt-every must be at least 0, got -1"),
    # numbers outside their domain used to train (a NaN lr: a NaN model) or crash mid-run (drop path 2)
    (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["train", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["train", "--blr", "0"], "--blr must be a finite number > 0"),
    (["train", "--drop-path", "2"], "--drop-path must be a number in [0, 1)"),
    (["train", "--class-dropout", "1.5"], "--class-dropout must be a number in [0, 1]"),
    (["train", "--label-smoothing", "-0.1"], "--label-smoothing must be a number in [0, 1]"),
    (["train", "--betas", "1.5", "0.9"], "--betas must be two numbers in [0, 1)"),
    (["train", "--final-lr-ratio", "-1"], "--final-lr-ratio must be a finite number >= 0"),
    (["train", "--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["train", "--grad-clip", "nan"], "--grad-clip must be a finite number >= 0"),
    (["train", "--sample-cfg", "nan"], "--sample-cfg: cfg"),
    (["train", "--time-budget", "nan"], "--time-budget must be a finite number > 0"),
    (["train-tokenizer", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["train-tokenizer", "--l1", "-1"], "--l1 must be a finite number >= 0"),
    (["train-tokenizer", "--betas", "0.5", "1"], "--betas must be two numbers in [0, 1)"),
    (["train-tokenizer", "--dead-code-steps", "-1"], "--dead-code-steps must be at least 0"),
    (["train-tokenizer", "--disc-layers", "0"], "--disc-layers must be at least 1"),
    (["train-tokenizer", "--tokenizer-override", "ch=0"],
     "--tokenizer-override ch=0: the tokenizer's ch must be an integer >= 1"),
])
def test_bad_loop_options_fail_before_training(tmp_path, capsys, argv, needle):
    """Options that used to fail only mid-run (a ZeroDivisionError at the first log line, a sample grid of no
    images after the last step) or be ignored (--max-steps 0 trained the --epochs) are refused up front."""
    from hmar.cli import main
    from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
    make_shapes_folder(tmp_path / "d", 2, 2, 64)
    extra = ["--tokenizer", str(make_random_tokenizer(tmp_path / "tok"))] if argv[0] == "train" else []
    rc = main(argv + extra + ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--no-progress",
                              "--no-tensorboard", "--batch-size", "2", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "r").exists()


def test_a_nan_loss_stops_the_run_with_one_error(tmp_path, capsys, monkeypatch):
    """A diverged run (NaN loss) used to train on to the end and save a NaN model; it stops at the first log line
    (transformer) or epoch report (tokenizer) that shows it, pointing at --resume with a lower --lr."""
    from hmar.cli import main
    import hmar.training.loop as loop
    from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
    from hmar.training.tokenizer_trainer import TokenizerTrainer
    make_shapes_folder(tmp_path / "d", 2, 4, 64)
    real_step, real_tok_step = loop.train_step, TokenizerTrainer._train_step

    def nan_step(*a, **k):
        out = real_step(*a, **k)
        return {**out, "loss": out["loss"] * float("nan")}

    def nan_tok_step(self, x):
        out = real_tok_step(self, x)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(loop, "train_step", nan_step)
    monkeypatch.setattr(TokenizerTrainer, "_train_step", nan_tok_step)
    common = ["--data", str(tmp_path / "d"), "--no-progress", "--no-tensorboard", "--batch-size", "2"]
    for argv, step in ((["train", "--tokenizer", str(make_random_tokenizer(tmp_path / "tok")), "--out",
                         str(tmp_path / "r"), "--log-every", "2", "--max-steps", "10", "--sample-every", "-1"], 2),
                       (["train-tokenizer", "--out", str(tmp_path / "t"), "--epochs", "3"], 4)):
        rc = main(argv + common)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and f"the training loss is nan at step {step}: the run diverged" in err[-1], err
        assert "--resume" in err[-1] and "lower --lr" in err[-1]
    assert not (tmp_path / "r" / "model").exists() and not (tmp_path / "t" / "tokenizer").exists()


def test_time_budget_counts_from_this_process_and_fits_after_a_few_steps(monkeypatch):
    """The first estimate comes after skip + probe of THIS process's steps: a run resumed at step 664 timed nothing
    (its timing start was step 3 of the run) and divided the clock by 664 steps."""
    import hmar.training.schedule as sch
    clock = [100.0]
    monkeypatch.setattr(sch.time, "perf_counter", lambda: clock[0])
    for first in (0, 664):
        b = sch.TimeBudget(60.0)
        total = sch.TimeBudget.UNFITTED
        for k in range(1, b.skip + b.probe + 1):
            clock[0] += 5.0 if k <= b.skip else 1.0          # slow start-up steps, then 1 s per step
            total = b.total(first + k, total)
            assert b.fitted == (k == b.skip + b.probe)
        elapsed = 5.0 * b.skip + 1.0 * b.probe
        assert total == first + b.skip + b.probe + int(60.0 - elapsed)   # the rest of the budget at 1 s per step
        clock[0] += 100.0
        assert b.total(total + 1, total) == total + 1                     # one process: stops once it is spent


def test_stage_one_config_is_the_next_scale_model_of_the_same_size():
    from hmar.model import build_model
    from hmar.presets import model_config
    for name in ("hmar-tiny", "hmar-d16", "hmar-d30-512"):
        c = model_config(name, drop_path_rate=0.05)
        s = c.stage_one()
        assert s.kind == "nsp" and c.kind == "hmar" and s.to_dict() == {**c.to_dict(), "kind": "nsp"}
    v = model_config("var-tiny")
    assert v.stage_one() is v
    with torch.device("meta"):   # HMAR's trunk + next-scale branch = the nsp model's blocks (its masked branch: stage 2)
        nsp, full = build_model(model_config("hmar-tiny").stage_one()), build_model(model_config("hmar-tiny"))
    assert type(nsp).__name__ != type(full).__name__
    assert sum(p.numel() for p in nsp.parameters()) < sum(p.numel() for p in full.parameters())
