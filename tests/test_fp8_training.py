"""FP8 training (``hmar train --fp8``, :mod:`hmar.model.fp8_training`) on the CPU: the three products of each layer
equal the products of its rounded operands, the layers keep their parameters and state dict, the plain path stays
where fp8 does not apply, training follows bf16, and the compiled step has no graph break. On a CUDA GPU of
compute capability 8.9+: the same products through cuBLAS's fp8 GEMMs, and compiled training."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmar.errors import HMARError
from hmar.model import build_model, init_weights
from hmar.model import fp8_training
from hmar.model.blocks import AdaLNBlock
from hmar.model.fp8 import E4M3, E4M3_MAX
from hmar.model.fp8_training import (E5M2, E5M2_MAX, Float8TrainingLinear, fp8_shapes_ok, quantize_tensor,
                                     to_float8_training)
from hmar.presets import model_config
from hmar.tokenizer.quantizer import MultiScaleQuantizer
from hmar.training.distributed import DistInfo
from hmar.training.loop import TrainForward, prepare_training, train_step
from hmar.training.losses import token_loss_weights, weighted_coefficients

CPU = DistInfo(device=torch.device("cpu"))


def _layer(K=64, N=48, bias=True, device="cpu"):
    torch.manual_seed(0)
    ref = nn.Linear(K, N, bias=bias).to(device)
    layer = copy.deepcopy(ref)
    layer.__class__ = Float8TrainingLinear
    return ref, layer


def _rounded(t, dtype):
    q, s = quantize_tensor(t, dtype)
    return q.float() * s


def test_quantize_tensor_scales_the_largest_value_to_the_format_maximum():
    x = torch.tensor([[0.5, -3.0], [1.0, 2.0]])
    for dtype, top in ((E4M3, E4M3_MAX), (E5M2, E5M2_MAX)):
        q, s = quantize_tensor(x, dtype)
        assert q.dtype == dtype and s.shape == () and s.dtype == torch.float32
        assert q.float().abs().max() == top and torch.allclose(s, torch.tensor(3.0 / top))
        assert torch.allclose(q.float() * s, x, rtol=0.13)
    q, s = quantize_tensor(torch.zeros(4, 4), E4M3)   # no NaN from an all-zero tensor
    assert torch.isfinite(s) and (q.float() == 0).all()


@pytest.mark.parametrize("bias", [True, False])
def test_products_equal_those_of_the_rounded_operands(bias):
    """Forward ``x~ @ W~.T``, backward ``dx = dy~ @ W~`` and ``dW = dy~.T @ x~`` (~: e4m3 / e5m2 with one scale per
    tensor), in fp32 without autocast: the fp8 products are the fp32 products of the rounded operands."""
    ref, layer = _layer(bias=bias)
    x = torch.randn(2, 16, 64, requires_grad=True)
    dy = torch.randn(2, 16, 48)
    y = layer(x)
    y.backward(dy)
    xr, wr = _rounded(x.detach(), E4M3), _rounded(ref.weight.detach(), E4M3)
    gr = _rounded(dy, E5M2)
    want = xr @ wr.t() + (ref.bias.detach() if bias else 0)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, (gr @ wr).view_as(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, gr.reshape(-1, 48).t() @ xr.reshape(-1, 64), rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)))
    # and close to the exact products (e4m3 has 3 mantissa bits, e5m2 2)
    x2 = x.detach().clone().requires_grad_()
    ref(x2).backward(dy)
    rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())  # noqa: E731
    assert rel(y, ref(x2)) < 0.06 and rel(x.grad, x2.grad) < 0.12 and rel(layer.weight.grad, ref.weight.grad) < 0.12


def test_autocast_output_dtype_and_fp32_gradients():
    _, layer = _layer()
    x = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_the_plain_linear_where_fp8_does_not_apply():
    """No gradients (validation, sample grids) or a row count that is not a multiple of 16: exactly F.linear."""
    ref, layer = _layer()
    for x, grad in ((torch.randn(32, 64), False), (torch.randn(3, 5, 64), True)):
        with torch.set_grad_enabled(grad):
            assert torch.equal(layer(x), ref(x))
    assert fp8_shapes_ok(32, 64, 48) and not fp8_shapes_ok(15, 64, 48) and not fp8_shapes_ok(32, 72, 40)


def test_bias_override_and_frozen_weight():
    """``layer(x, bias)`` (the qkv projection's q/v biases) multiplies in fp8 too; a frozen weight gets no dW."""
    ref, layer = _layer(bias=False)
    layer.weight.requires_grad_(False)
    b = torch.randn(48)
    x = torch.randn(16, 64, requires_grad=True)
    y = layer(x, b)
    torch.testing.assert_close(y, _rounded(x.detach(), E4M3) @ _rounded(ref.weight.detach(), E4M3).t() + b)
    y.sum().backward()
    assert layer.weight.grad is None and x.grad is not None


def _model(preset="hmar-tiny", **over):
    torch.manual_seed(0)
    m = build_model(model_config(preset, drop_path_rate=0.0, cond_drop_rate=0.0, **over))
    init_weights(m, init_adaln_gamma=0.5)
    return m


def test_to_float8_training_changes_the_block_linears_only():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    blocks = [name for name, mod in m.named_modules() if isinstance(mod, AdaLNBlock)]
    assert len(blocks) == 6   # hmar-tiny: 2 shared + 2 next-scale + 2 masked-branch blocks
    assert to_float8_training(m) == 4 * len(blocks)
    changed = {name for name, mod in m.named_modules() if isinstance(mod, Float8TrainingLinear)}
    assert changed == {f"{b}.{p}" for b in blocks for p in ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2")}
    assert all(type(mod) is nn.Linear for name, mod in m.named_modules()
               if isinstance(mod, nn.Linear) and name not in changed)   # ada_lin, heads, word_embed
    sd = m.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in sd)
    assert to_float8_training(m) == 0   # already converted


def test_every_block_linear_multiplies_in_fp8(monkeypatch):
    """A training forward of a converted model goes through the fp8 product 4x per block (the qkv projection,
    called with its q/v biases, included)."""
    calls = []
    real = fp8_training._Float8MatMul.apply
    monkeypatch.setattr(fp8_training._Float8MatMul, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    outs, m = _train(_model(), steps=1, fp8=True)
    assert len(calls) == 4 * m.config.depth   # stage 1 runs the shared and next-scale blocks


def _train(model, steps=3, B=8, precision="bf16", **kw):
    cfg = model.config
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    torch.manual_seed(5)
    for p in quant.parameters():
        nn.init.normal_(p)
    st = prepare_training(model, quant, "next-scale", CPU, lr=3e-3, precision=precision, **kw)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)   # one batch, learnt over the steps
    labels = torch.randint(0, cfg.num_classes, (B,), generator=g)
    return [train_step(st, idx, labels, None, metrics=True) for _ in range(steps)], model


def test_fp8_training_follows_bf16():
    """hmar-tiny at 8 x 30 tokens (a multiple of 16), bf16 autocast, 12 steps on one batch: the losses of fp8 and
    bf16 GEMMs agree within 2 % at every step, and both fall."""
    base = _model()
    a, _ = _train(copy.deepcopy(base), steps=12)
    b, _ = _train(copy.deepcopy(base), steps=12, fp8=True)
    la, lb = [float(o["loss"]) for o in a], [float(o["loss"]) for o in b]
    assert la[-1] < 0.8 * la[0] and lb[-1] < 0.8 * lb[0], (la, lb)
    for x, y in zip(la, lb):
        assert abs(x - y) < 0.02 * x, (la, lb)
    assert la != lb   # fp8 did change the products


def test_compiled_fp8_step_has_no_graph_break_and_equals_eager():
    import torch._dynamo as dynamo
    m = _model()
    to_float8_training(m)
    m.train()
    cfg = m.config
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len), generator=g)
    labels = torch.randint(0, cfg.num_classes, (8,), generator=g)
    x = torch.randn(8, cfg.seq_len - 1, cfg.z_channels)
    coef = weighted_coefficients(token_loss_weights(cfg.patch_nums), 8)
    dynamo.reset()
    ex = dynamo.explain(TrainForward(m, "next-scale"))(labels, x, None, None, idx, coef)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    dynamo.reset()
    base = _model()
    a, ma = _train(copy.deepcopy(base), steps=2, precision="fp32", fp8=True)
    b, mb = _train(copy.deepcopy(base), steps=2, precision="fp32", fp8=True, compile=True, compile_backend="aot_eager")
    dynamo.reset()
    for x, y in zip(a, b):
        torch.testing.assert_close(y["loss"], x["loss"], rtol=1e-5, atol=1e-6)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_fp8_on_a_device_without_fp8_gemms_is_refused(monkeypatch):
    import hmar.model.fp8
    monkeypatch.setattr(hmar.model.fp8, "supported", lambda device: False)
    m = _model()
    quant = MultiScaleQuantizer(m.config.vocab_size, m.config.z_channels, m.config.patch_nums)
    with pytest.raises(HMARError, match="--fp8: .*compute capability 8.9.*leave --fp8 off"):
        prepare_training(m, quant, "next-scale", CPU, fp8=True)


def test_train_cli_has_fp8():
    from hmar.training.config import TrainConfig
    assert TrainConfig().fp8 is False
    from hmar.cli import build_parser
    assert build_parser().parse_args(["train", "--fp8"]).fp8 is True


# ------------------------------------------------------------------------------------ GPU
def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU of compute capability 8.9+ (fp8 GEMMs)")
def test_gpu_products_equal_those_of_the_rounded_operands():
    ref, layer = _layer(K=1024, N=4096, device="cuda")
    x = torch.randn(2048, 1024, device="cuda", requires_grad=True)
    dy = torch.randn(2048, 4096, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    xr, wr = _rounded(x.detach(), E4M3), _rounded(ref.weight.detach(), E4M3)
    gr = _rounded(dy.bfloat16(), E5M2)
    want_y, want_dx, want_dw = xr @ wr.t() + ref.bias.detach(), gr @ wr, gr.t() @ xr   # fp32 (TF32 is off)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    # y and dx come out in bf16 (2^-9 per element); dW in fp32, from an accumulation over 2048 rows that Hopper's fp8
    # tensor cores keep in fewer bits than fp32's 24 (measured 1.05e-4 on an H100)
    assert rel(y, want_y) < 0.01 and rel(x.grad, want_dx) < 0.01 and rel(layer.weight.grad, want_dw) < 1e-3


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU of compute capability 8.9+ (fp8 GEMMs)")
def test_gpu_compiled_fp8_training_follows_bf16():
    """hmar-d16's width (1024, 16 heads) at depth 2, compiled with inductor, 8 steps: fp8 within 2 % of bf16."""
    dev = DistInfo(device=torch.device("cuda"))
    losses = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        m = build_model(model_config("hmar-d16", depth=2, branch_depth=1, drop_path_rate=0.0, cond_drop_rate=0.0))
        cfg = m.config
        quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
        st = prepare_training(m, quant, "next-scale", dev, lr=3e-4, compile=True, fp8=fp8)
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, cfg.vocab_size, (16, cfg.seq_len), generator=g).cuda()
        labels = torch.randint(0, cfg.num_classes, (16,), generator=g).cuda()
        losses.append([float(train_step(st, idx, labels, None)["loss"]) for _ in range(8)])
        torch._dynamo.reset()
    for x, y in zip(*losses):
        assert abs(x - y) < 0.02 * x, losses


# ------------------------------------------------------------------------------------ hmar train --fp8
def test_hmar_train_fp8_cli(tmp_path, capsys):
    """``hmar train --fp8`` on the CPU (whose ``_scaled_mm`` multiplies fp8 too): VAR from an image folder learns,
    and saves the same keys as a model trained without it; a batch whose rows are not a multiple of 16 is said to
    run in bf16."""
    from safetensors.torch import load_file
    from hmar.cli import main
    from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
    data = make_shapes_folder(tmp_path / "shapes", 2, 16, 64, val_per_class=2)
    tok = make_random_tokenizer(tmp_path / "tok")
    common = ["train", "--model", "var-tiny", "--tokenizer", str(tok), "--data", str(data), "--lr", "3e-3",
              "--no-progress", "--sample-every", "-1", "--fp8"]
    run = tmp_path / "run"
    assert main(common + ["--out", str(run), "--epochs", "3", "--batch-size", "8"]) == 0
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in val if r["kind"] == "val"]
    assert len(val) == 3 and val[-1] < val[0], val
    plain = tmp_path / "plain"
    assert main(common[:-1] + ["--out", str(plain), "--max-steps", "1", "--batch-size", "8"]) == 0
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (run, plain))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    log = (run / "log.txt").read_text()
    assert "loss weighting uniform, fp8 block GEMMs" in log and "--fp8 needs" not in log
    odd = tmp_path / "odd"
    assert main(common + ["--out", str(odd), "--max-steps", "1", "--batch-size", "3"]) == 0
    assert "--fp8 needs batch x tokens per process to be a multiple of 16 (90 is not)" in (odd / "log.txt").read_text()


def test_hmar_train_fp8_refused_before_the_run_dir(tmp_path, monkeypatch, capsys):
    import hmar.model.fp8
    from hmar.cli import main
    monkeypatch.setattr(hmar.model.fp8, "supported", lambda device: False)
    run = tmp_path / "run"
    assert main(["train", "--model", "var-tiny", "--data", str(tmp_path), "--out", str(run), "--fp8",
                 "--device", "cpu"]) != 0   # (auto would name cuda on a GPU machine)
    assert "--fp8: cpu has no fp8 GEMMs" in capsys.readouterr().err and not run.exists()
