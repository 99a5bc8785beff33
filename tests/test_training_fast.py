"""The fast training path, on the CPU: the chunked head + cross-entropy (same loss and gradients as the plain path),
torch.compile without graph breaks (and the same losses as eager), the attention-backend option and its
automatic rule, and a smoke run of every variant of ``benchmarks/bench_train.py``."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hmar.errors import HMARError
from hmar.model import HMAR, build_model, init_weights
from hmar.presets import ModelConfig, model_config
from hmar.tokenizer.quantizer import MultiScaleQuantizer
from hmar.training.distributed import DistInfo
from hmar.training.fused_ce import default_chunk, linear_cross_entropy
from hmar.training.loop import TrainForward, prepare_training, train_step
from hmar.training.losses import (draw_masks, masked_ce, masked_coefficients, token_loss_weights, weighted_ce,
                                  weighted_coefficients)

ROOT = Path(__file__).resolve().parents[1]
PN = (1, 2, 3, 4)
NO_DROP = dict(drop_path_rate=0.0, cond_drop_rate=0.0)


def _plain_and_chunked(h, W, b, t, plain_loss, coef, eps, chunk):
    logits = F.linear(h, W, b).float()
    loss, ce = plain_loss(logits)
    g = torch.autograd.grad(loss, (h, W, b))
    loss2, ce2, pred2 = linear_cross_entropy(h, W, b, t, coef, eps, chunk)
    g2 = torch.autograd.grad(loss2, (h, W, b))
    return (loss, ce, g, logits.argmax(-1)), (loss2, ce2, g2, pred2)


# ------------------------------------------------------------------------------------ chunked head + CE
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("kind", ["stage1", "masked-token", "masked-image"])
def test_chunked_ce_equals_plain_fp32(kind, eps):
    torch.manual_seed(0)
    B, C, V = 3, 24, 50
    L = sum(p * p for p in PN)
    h = torch.randn(B, L, C, requires_grad=True)
    W = (torch.randn(V, C) * 0.3).requires_grad_()
    b = torch.randn(V, requires_grad=True)
    t = torch.randint(0, V, (B, L))
    mask = draw_masks([(0, 0, i) for i in range(B)], PN)
    if kind == "stage1":
        w = token_loss_weights(PN, "gaussian")
        plain = lambda z: weighted_ce(z, t, w, eps)  # noqa: E731
        coef = weighted_coefficients(w, B)
    else:
        norm = kind.split("-")[1]
        plain = lambda z: masked_ce(z, t, mask, norm, eps)  # noqa: E731
        coef = masked_coefficients(mask, norm)
    for chunk in (7, 64, 1000):   # ragged last chunk, several chunks, one chunk
        (l1, ce1, g1, p1), (l2, ce2, g2, p2) = _plain_and_chunked(h, W, b, t, plain, coef, eps, chunk)
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce2, ce1, rtol=1e-5, atol=1e-5)
        for a, c in zip(g2, g1):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        assert torch.equal(p2, p1)


def test_masked_coefficients_with_a_global_token_count():
    # DDP: the loss of each of `world` ranks is scaled so that the averaged gradient is the global token mean
    torch.manual_seed(1)
    logits, t = torch.randn(2, 30, 11), torch.randint(0, 11, (2, 30))
    mask = torch.rand(2, 30) < 0.4
    total = torch.tensor(float(mask.sum() * 3))
    loss, ce = masked_ce(logits, t, mask, "token", 0.0, total, 2)
    torch.testing.assert_close((ce * masked_coefficients(mask, "token", total, 2)).sum(), loss)


def test_chunked_ce_bf16_autocast_follows_the_plain_path():
    # under bf16 autocast both paths run the head matmul in bf16 and the softmax in fp32
    torch.manual_seed(2)
    B, L, C, V = 2, 30, 32, 64
    h = torch.randn(B, L, C, requires_grad=True)
    lin = torch.nn.Linear(C, V)
    t = torch.randint(0, V, (B, L))
    w = token_loss_weights(PN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = weighted_ce(lin(h).float(), t, w)
        loss2, _, _ = linear_cross_entropy(h, lin.weight, lin.bias, t, weighted_coefficients(w, B), chunk=16)
    g = torch.autograd.grad(loss, (h, lin.weight, lin.bias))
    g2 = torch.autograd.grad(loss2, (h, lin.weight, lin.bias))
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)     # same bf16 logits, same fp32 softmax
    for a, c in zip(g2, g):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-4)          # dW/db summed in fp32 over chunks
    assert default_chunk(4096) == 8192 and default_chunk(10 ** 9) == 256


def _model(stage: str, preset: str = "hmar-tiny", **over) -> torch.nn.Module:
    torch.manual_seed(0)
    d = model_config(preset, **{**NO_DROP, **over}).to_dict()
    d["kind"] = "var" if preset.startswith("var") else "nsp"
    m = build_model(ModelConfig.from_dict(d))
    init_weights(m, init_adaln_gamma=0.5)   # large residual branches, so attention matters in the losses
    return HMAR.from_next_scale(m, 2) if stage == "masked" else m


def _batch(cfg, B=4, stage="next-scale", seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)
    labels = torch.randint(0, cfg.num_classes, (B,), generator=g)
    mask = draw_masks([(seed, 0, i) for i in range(B)], cfg.patch_nums) if stage == "masked" else None
    return idx, labels, mask


def _train(model, stage, steps=3, **kw):
    cfg = model.config
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    torch.manual_seed(5)
    for p in quant.parameters():
        torch.nn.init.normal_(p)
    st = prepare_training(model, quant, stage, DistInfo(device=torch.device("cpu")), lr=3e-3, **kw)
    outs = []
    for s in range(steps):
        outs.append(train_step(st, *_batch(cfg, stage=stage, seed=s), metrics=True))
    return outs, model


@pytest.mark.parametrize("stage,mask_loss", [("next-scale", "token"), ("masked", "token"), ("masked", "image")])
def test_train_step_chunked_equals_plain(stage, mask_loss):
    base = _model(stage)
    a, ma = _train(copy.deepcopy(base), stage, chunked_ce=False, mask_loss=mask_loss)
    b, mb = _train(copy.deepcopy(base), stage, chunked_ce=True, mask_loss=mask_loss)
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "ce", "acc", "ce_tail"):
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6, msg=k)
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "logits"])
def test_train_forward_has_no_graph_breaks(chunked):
    import torch._dynamo as dynamo
    for stage, preset in (("next-scale", "hmar-tiny"), ("next-scale", "var-tiny"), ("masked", "hmar-tiny")):
        if not chunked and preset == "var-tiny":
            continue
        m = _model(stage, preset).train()
        cfg = m.config
        idx, labels, mask = _batch(cfg, 2, stage)
        x = torch.randn(2, cfg.seq_len - 1, cfg.z_channels)
        args = [labels, x, x if stage == "masked" else None, mask]
        if chunked:
            coef = masked_coefficients(mask) if stage == "masked" else weighted_coefficients(token_loss_weights(PN), 2)
            args += [idx, coef]
        dynamo.reset()
        ex = dynamo.explain(TrainForward(m, stage))(*args)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, (stage, preset, ex.break_reasons)
    dynamo.reset()


def test_compiled_train_step_equals_eager():
    # aot_eager: dynamo + AOT autograd (the graphs inductor would get) without the C++ compile time
    base = _model("next-scale")
    a, ma = _train(copy.deepcopy(base), "next-scale", steps=3)
    b, mb = _train(copy.deepcopy(base), "next-scale", steps=3, compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    for x, y in zip(a, b):
        torch.testing.assert_close(y["loss"], x["loss"], rtol=1e-5, atol=1e-6)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_hmar_train_compile_cli_matches_eager(tmp_path):
    from hmar.cli import main
    from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
    from hmar.training.tokenize import tokenize_folder
    make_shapes_folder(tmp_path / "d", 3, 6, 64)
    tok = make_random_tokenizer(tmp_path / "tok")
    cache = tokenize_folder(tmp_path / "d", tok, tmp_path / "c.safetensors", progress=False, say=lambda m: None)
    common = ["train", "--model", "hmar-tiny", "--tokenizer", str(tok), "--data", str(cache), "--max-steps", "4",
              "--batch-size", "6", "--lr", "2e-3", "--no-progress", "--sample-every", "-1", "--log-every", "1",
              "--class-dropout", "0", "--drop-path", "0", "--seed", "3", "--init-adaln-gamma", "0.5"]
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--out", str(tmp_path / "comp"), "--compile", "--compile-backend", "aot_eager",
                 "--attention-backend", "per_scale"]) == 0
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    # each block compiled on its own; the final sample grid runs them eagerly (no compile for inference shapes)
    blocks = [a if a != "-1" else "0" for a in common]   # --sample-every 0: a grid at the end
    assert main([*blocks, "--out", str(tmp_path / "blocks"), "--compile", "--compile-backend", "aot_eager",
                 "--compile-scope", "blocks"]) == 0
    assert (tmp_path / "blocks" / "samples").is_dir() and counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()

    def losses(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]
    la, lb, lc = losses(tmp_path / "eager"), losses(tmp_path / "comp"), losses(tmp_path / "blocks")
    assert len(la) == 4 and lb == pytest.approx(la, rel=1e-5, abs=1e-6) and lc == pytest.approx(la, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("stage,preset", [("next-scale", "hmar-tiny"), ("next-scale", "var-tiny"),
                                          ("masked", "hmar-tiny")])
def test_compiled_blocks_train_step_equals_eager(stage, preset):
    """``compile_scope="blocks"``: each block compiled on its own (aot_eager: the graphs inductor would get), the same
    losses, gradient norms and weights as eager; nothing else is compiled and the state dict keys are unchanged."""
    base = _model(stage, preset)
    a, ma = _train(copy.deepcopy(base), stage, steps=3)
    b, mb = _train(copy.deepcopy(base), stage, steps=3, compile=True, compile_backend="aot_eager",
                   compile_scope="blocks")
    torch._dynamo.reset()
    assert all(getattr(blk, "_compiled_call_impl", None) is not None for blk in mb.modules()
               if type(blk).__name__ in ("AdaLNBlock", "AdaLNHead"))
    assert list(mb.state_dict()) == list(base.state_dict())
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm"):
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6, msg=k)
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_blocks_share_one_graph_whatever_the_depth():
    """With drop-path on (a different rate in every block) the blocks of a model of depth 3 and of depth 8 compile to
    the same few graphs (the first block, which has no branch to add and rate 0; every other block; the head): the
    rate is read from a buffer, not baked into the graph, so the compile time does not grow with depth."""
    from torch._dynamo.utils import counters
    graphs = []
    for depth in (3, 8):
        torch._dynamo.reset()
        counters.clear()
        m = _model("next-scale", depth=depth, drop_path_rate=0.2)
        _train(m, "next-scale", steps=2, compile=True, compile_backend="eager", compile_scope="blocks")
        graphs.append(counters["stats"]["unique_graphs"])
        rates = [blk.drop_path.p for blk in m.blocks]
        assert len(set(rates)) == depth and "drop_path.keep_prob" not in "".join(m.state_dict())
    torch._dynamo.reset()
    assert graphs[0] == graphs[1] == 3, graphs


def test_drop_path_keeps_its_rate():
    from hmar.model.blocks import DropPath
    d = DropPath(0.25).train()
    torch.manual_seed(0)
    y = d(torch.ones(20000, 2, 3))
    kept = y[:, 0, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.015
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))   # rescaled so the mean is kept
    x = torch.randn(4, 3)
    assert d.eval()(x) is x and DropPath(0.0).train()(x) is x
    with torch.device("meta"):   # how hmar.checkpoint builds models: the unsaved rate comes back with the load
        m = DropPath(0.25)
    m.load_state_dict({}, assign=True)
    assert not m.keep_prob.is_meta and m.keep_prob.item() == 0.75


def test_compile_scope_errors():
    m = _model("next-scale")
    quant = MultiScaleQuantizer(m.config.vocab_size, m.config.z_channels, m.config.patch_nums)
    cpu = DistInfo(device=torch.device("cpu"))
    with pytest.raises(HMARError, match="--compile-scope: 'layers' is not one of model, blocks"):
        prepare_training(m, quant, "next-scale", cpu, compile=True, compile_scope="layers")
    with pytest.raises(HMARError, match="--compile-mode: 'fast' is not one of default, reduce-overhead"):
        prepare_training(m, quant, "next-scale", cpu, compile=True, compile_mode="fast")
    for mode, graphs in (("reduce-overhead", True), ("default", False), (None, False)):
        st = prepare_training(copy.deepcopy(m), quant, "next-scale", cpu, compile=True, compile_mode=mode,
                              compile_backend="eager")
        assert st.cuda_graphs is graphs
    assert not prepare_training(m, quant, "next-scale", cpu, compile_mode="reduce-overhead").cuda_graphs


# ------------------------------------------------------------------------------------ attention backend
def test_attention_backend_option_and_size_rule():
    from hmar.attention import check_backend, prefers_masked_sdpa
    m = _model("next-scale")
    quant = MultiScaleQuantizer(m.config.vocab_size, m.config.z_channels, m.config.patch_nums)
    cpu = DistInfo(device=torch.device("cpu"))
    assert prepare_training(m, quant, "next-scale", cpu, attention_backend="per_scale").module.backend == "per_scale"
    assert prepare_training(m, quant, "next-scale", cpu, attention_backend="auto").module.backend is None
    with pytest.raises(HMARError, match="attention-backend"):
        prepare_training(m, quant, "next-scale", cpu, attention_backend="flash")
    tk = sys.modules.get("hmar.attention.triton_kernel")
    if tk is not None and tk._HAS_TRITON and not tk._interpret():
        with pytest.raises(ValueError, match="CUDA"):
            check_backend("triton", "cpu")
    # the measured H200 crossover (see SMALL_DENSE_SCORES): masked SDPA below, the fused kernel above
    assert prefers_masked_sdpa((4, 16, 680, 64), "block_diagonal")
    assert prefers_masked_sdpa((4, 30, 680, 64), "block_diagonal")
    assert not prefers_masked_sdpa((16, 16, 680, 64), "block_diagonal")
    assert prefers_masked_sdpa((16, 16, 680, 64), "block_causal")
    assert not prefers_masked_sdpa((16, 30, 680, 64), "block_causal")
    for pattern in ("block_diagonal", "block_causal"):
        assert not prefers_masked_sdpa((32, 16, 680, 64), pattern)     # a d16 training step
        assert not prefers_masked_sdpa((4, 16, 2240, 64), pattern)
    assert not prefers_masked_sdpa((1, 1, 5, 64), "dense")


def test_qk_norm_option():
    """prepare_training(qk_norm=): auto is ops on the CPU (tests/test_triton_attention.py runs kernels, through the
    interpreter); a wrong value or an impossible request is a clear error."""
    from hmar.model.blocks import SelfAttention
    m = _model("next-scale")
    cfg = m.config
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    cpu = DistInfo(device=torch.device("cpu"))
    layers = [x for x in m.modules() if isinstance(x, SelfAttention)]
    prepare_training(m, quant, "next-scale", cpu)
    assert len(layers) == cfg.depth and all(x.fused_qk_norm is False for x in layers)
    with pytest.raises(HMARError, match="--qk-norm: 'fast' is not one of auto, ops, kernels"):
        prepare_training(m, quant, "next-scale", cpu, qk_norm="fast")
    with pytest.raises(HMARError, match="--qk-norm kernels: .*--attention-backend auto or triton"):
        prepare_training(m, quant, "next-scale", cpu, qk_norm="kernels", attention_backend="per_scale")


def test_autocast_reaches_attention_in_one_dtype():
    # under bf16 autocast the l2-normalised q is fp32: attention() casts q, k, v to the autocast dtype, as
    # SDPA's autocast would, so the fused kernel is not declined for it
    import hmar.attention as A
    seen = {}
    fn = A._BACKENDS["reference"]
    A.register_backend("spy", lambda q, k, v, *a: seen.setdefault("d", (q.dtype, k.dtype, v.dtype)) and fn(q, k, v, *a))
    try:
        m = _model("next-scale")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(torch.tensor([1]), torch.randn(1, m.config.seq_len - 1, m.config.z_channels), backend="spy")
    finally:
        A._BACKENDS.pop("spy")
    assert seen["d"] == (torch.bfloat16,) * 3


# ------------------------------------------------------------------------------------ the benchmark script
def _bench(*args, env=None, timeout=600):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu", "--preset", "hmar-tiny",
           "--batch", "2", "--steps", "1", "--warmup", "1", "--compile-backend", "aot_eager", "--matrix",
           "--model-override", "drop_path_rate=0", "cond_drop_rate=0", *args]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_bench_train_matrix_smoke(tmp_path):
    out = tmp_path / "r.json"
    text = _bench("--attention-backend", "auto", "per_scale", "--json", str(out))
    res = json.loads(out.read_text())
    assert len(res) == 8 and text.count("vs eager") == 8
    assert {(r["compile"], r["chunked_ce"], r["attention_backend"]) for r in res} == {
        (c, ce, b) for c in (False, True) for ce in (False, True) for b in ("auto", "per_scale")}
    assert all(r["attention_resolved"] == "reference" for r in res if r["attention_backend"] == "auto")
    # every variant trains the same model on the same data: the same loss up to rounding
    assert max(r["loss"] for r in res) - min(r["loss"] for r in res) < 1e-4


def test_bench_train_inductor_settings_run_side_by_side(tmp_path):
    """``--inductor "" KEY=VALUE``: one variant per setting, each later one compared with the first, the setting
    kept in the JSON; a setting inductor does not have is refused before anything compiles."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu", "--preset", "hmar-tiny",
           "--batch", "2", "--steps", "1", "--warmup", "1", "--compile", "--compile-backend", "aot_eager",
           "--model-override", "drop_path_rate=0", "cond_drop_rate=0", "--json", str(out),
           "--inductor", "", "coordinate_descent_tuning=True"]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["inductor"] for r in res] == ["", "coordinate_descent_tuning=True"]
    lines = [ln for ln in p.stdout.splitlines() if "img/s" in ln]
    assert "vs inductor defaults" not in lines[0] and "+[coordinate_descent_tuning=True]" in lines[1]
    assert "vs inductor defaults" in lines[1] and abs(res[0]["loss"] - res[1]["loss"]) < 1e-4
    bad = subprocess.run(cmd[:-2] + ["nosuch_setting=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "has no setting 'nosuch_setting'" in bad.stderr


def test_bench_train_compare_compile_runs_eager_then_compiled(tmp_path):
    out = tmp_path / "r.json"
    text = _bench("--compare-compile", "--profile", "--json", str(out))
    res = json.loads(out.read_text())
    assert [r["compile"] for r in res] == [False, True]
    lines = [ln for ln in text.splitlines() if "img/s" in ln]
    assert len(lines) == 2 and "x1.00 vs eager" in lines[0] and "compiled+" in lines[1]
    assert abs(res[0]["loss"] - res[1]["loss"]) < 1e-4
    # --profile: the kernels of 3 steps per configuration, in the output and the JSON (the optimiser step among them)
    for r in res:
        assert "Self CPU" in r["profile"] and "AdamW" in r["profile"] and "aten::" in r["profile"]
    assert text.count("Self CPU %") == 2


def test_bench_train_compile_scope_both(tmp_path):
    """``--compile-scope both``: the whole-model compile, then the per-block one compared with it; eager variants
    run once (the scope only applies to compiled ones)."""
    out = tmp_path / "r.json"
    text = _bench("--compare-compile", "--compile-scope", "both", "--json", str(out))
    res = json.loads(out.read_text())
    assert [(r["compile"], r["compile_scope"]) for r in res] == [(False, None), (True, "model"), (True, "blocks")]
    lines = [ln for ln in text.splitlines() if "img/s" in ln]
    assert "compiled-blocks+" in lines[2] and "vs whole-model compile" in lines[2]
    assert max(r["loss"] for r in res) - min(r["loss"] for r in res) < 1e-4


def test_bench_train_side_by_side_options_combine(tmp_path):
    """Two side-by-side options: every combination, each compared with the one that has the options it changes at
    their first values (blocks + reduce-overhead against whole-model + default); the modes are kept in the JSON."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu", "--preset", "hmar-tiny",
           "--batch", "2", "--steps", "1", "--warmup", "1", "--compile", "--compile-backend", "aot_eager",
           "--compile-scope", "both", "--compile-mode", "default", "reduce-overhead", "--json", str(out)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text, res = p.stdout, json.loads(out.read_text())
    assert [(r["compile_scope"], r["compile_mode"]) for r in res] == [
        ("model", "default"), ("model", "reduce-overhead"), ("blocks", "default"), ("blocks", "reduce-overhead")]
    lines = [ln for ln in text.splitlines() if "img/s" in ln]
    assert " vs " not in lines[0].split("loss")[1].split("(")[0]
    assert "compiled-reduce-overhead+" in lines[1] and "vs mode default" in lines[1]
    assert "compiled-blocks+" in lines[2] and "vs whole-model compile" in lines[2]
    assert "compiled-blocks-reduce-overhead+" in lines[3] and "vs whole-model compile + mode default" in lines[3]


def test_bench_train_clip_in_kernel_both_runs_the_same_step_two_ways(tmp_path):
    """--clip-in-kernel both: clip_grad_norm_'s multiply pass, then the clipping inside the fused AdamW, the second
    compared with the first; the same losses (the fused CPU AdamW takes the kernel path too)."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu", "--preset", "hmar-tiny",
           "--batch", "4", "--steps", "2", "--warmup", "1", "--fused", "on", "--clip-in-kernel", "both",
           "--json", str(out)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["clip_in_kernel"] for r in res] == [False, True] and all(r["fused_adamw"] for r in res)
    assert res[0]["loss"] == pytest.approx(res[1]["loss"], abs=1e-4)
    lines = [ln for ln in p.stdout.splitlines() if "img/s" in ln]
    assert "+clip-separate" in lines[0] and "+clip-separate" not in lines[1] and "vs clipping separate" in lines[1]


def _interpreter_works() -> bool:
    """Triton's CPU interpreter before 3.8 fails under numpy >= 2.5 ("only 0-dimensional arrays can be converted
    to Python scalars"; seen with the GPU machine's triton 3.6 + numpy 2.5.2). CI pins triton 3.8."""
    import numpy
    import triton
    ver = lambda s: tuple(int(x) for x in s.split(".")[:2])  # noqa: E731
    return not (ver(triton.__version__) < (3, 8) and ver(numpy.__version__) >= (2, 5))


def test_bench_train_triton_variants_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    if not _interpreter_works():
        pytest.skip("this Triton's interpreter does not run under this numpy (needs triton >= 3.8)")
    out = tmp_path / "r.json"
    # head dim 64 (one head of 64) and bf16: what the fused kernel takes
    _bench("--attention-backend", "triton", "--precision", "bf16", "--model-override", "num_heads=1",
           "--json", str(out), env={"TRITON_INTERPRET": "1"})
    res = json.loads(out.read_text())
    assert len(res) == 4 and all(r["attention_resolved"] == "triton" for r in res)
    assert max(r["loss"] for r in res) - min(r["loss"] for r in res) < 1e-3



def test_bench_train_dq_atomic_both_under_the_interpreter(tmp_path):
    """--dq-atomic both: the Triton backward with its dQ tiles, then with dq summed by atomics, the q / k
    normalisation in the kernels and the packed projection (the training default on CUDA); the same losses, the
    mode in the JSON and the switch restored between them."""
    pytest.importorskip("triton")
    if not _interpreter_works():
        pytest.skip("this Triton's interpreter does not run under this numpy (needs triton >= 3.8)")
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu", "--preset", "hmar-tiny",
           "--batch", "2", "--steps", "2", "--warmup", "1", "--attention-backend", "triton", "--precision", "bf16",
           "--qk-norm", "fused", "--dq-atomic", "both", "--model-override", "num_heads=1", "drop_path_rate=0",
           "cond_drop_rate=0", "--json", str(out)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["dq_atomic"], r["fused_qk_norm"], r["attention_resolved"]) for r in res] == [
        ("off", True, "triton"), ("on", True, "triton")]
    assert res[0]["loss"] == pytest.approx(res[1]["loss"], abs=1e-3)
    lines = [ln for ln in p.stdout.splitlines() if "img/s" in ln]
    assert "+dq-atomic" not in lines[0] and "+dq-atomic" in lines[1] and "vs dq tiles" in lines[1]

# ------------------------------------------------------------------------------------ GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_checkpoint_states_are_on_the_cpu():
    """On one GPU (no process group) the state dicts are not offloaded and fused AdamW keeps its ``step`` counters
    on the GPU: the checkpoint must still hold CPU tensors only, as a file written by several processes does
    (found by the NCCL world-size tests on 2 H200s, 2026-11-29)."""
    from hmar.training.checkpointing import get_states
    cfg = model_config("hmar-tiny", **NO_DROP)
    d = cfg.to_dict()
    d["kind"] = "nsp"
    m = build_model(ModelConfig.from_dict(d))
    quant = MultiScaleQuantizer(m.config.vocab_size, m.config.z_channels, m.config.patch_nums)
    st = prepare_training(m, quant, "next-scale", DistInfo(device=torch.device("cuda")), lr=1e-3)
    assert st.optimizer.defaults.get("fused")
    idx, labels, _ = _batch(m.config, 4)
    train_step(st, idx.cuda(), labels.cuda(), None)
    states = get_states(st.wrapped, [st.optimizer], DistInfo(device=torch.device("cuda")))
    tensors, todo = [], [states]
    while todo:                                        # every tensor in the nested dicts / lists
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert any(t.dim() == 0 for t in tensors)          # the optimiser's step counters are among them


# ------------------------------------------------------------------------------------ GPU (next session)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", ["next-scale", "masked"])
def test_gpu_fast_path_follows_the_eager_plain_path(stage):
    """bf16 on CUDA: (eager, plain CE, per-scale SDPA) vs (eager, chunked CE, Triton) vs (inductor, chunked CE,
    Triton: the whole model, each block on its own, the whole model as CUDA graphs) over a few steps of a model with
    head dim 64: the same losses up to bf16 rounding."""
    pytest.importorskip("triton")
    runs = {}
    for name, kw in {"eager-plain-per_scale": dict(chunked_ce=False, attention_backend="per_scale"),
                     "eager-chunked-triton": dict(chunked_ce=True, attention_backend="triton"),
                     "compiled-chunked-triton": dict(chunked_ce=True, attention_backend="triton",
                                                     compile=True),
                     "compiled-blocks": dict(attention_backend="triton", compile=True, compile_scope="blocks"),
                     "compiled-cuda-graphs": dict(attention_backend="triton", compile=True,
                                                  compile_mode="reduce-overhead"),
                     "compiled-qk-norm-ops": dict(attention_backend="triton", compile=True, qk_norm="ops")}.items():
        torch.manual_seed(0)
        d = model_config("hmar-small", num_heads=4, embed_dim=256, **NO_DROP).to_dict()   # head dim 64
        d["kind"] = "nsp"
        m = build_model(ModelConfig.from_dict(d))
        init_weights(m, init_adaln_gamma=0.5)
        if stage == "masked":
            m = HMAR.from_next_scale(m, 2)
        cfg = m.config
        quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
        st = prepare_training(m, quant, stage, DistInfo(device=torch.device("cuda")), lr=1e-3, **kw)
        losses = []
        for s in range(4):
            idx, labels, mask = _batch(cfg, 16, stage, seed=s)
            out = train_step(st, idx.cuda(), labels.cuda(), None if mask is None else mask.cuda(), metrics=True)
            losses.append(float(out["loss"]))
        runs[name] = losses
        torch._dynamo.reset()
    ref = runs.pop("eager-plain-per_scale")
    for name, losses in runs.items():
        assert losses == pytest.approx(ref, rel=2e-2), (name, ref, losses)
    assert runs["compiled-chunked-triton"] != runs["compiled-qk-norm-ops"]   # (two paths: kernels, then ops)


def test_bench_train_reports_against_the_official_figures(monkeypatch):
    """A goal preset at its goal batch is compared with the official VAR step's img/s (reference figures) and its
    goal, met or not (figures of BENCHMARKS.md sections 2c / 2d); other batches and the masked stage are not."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_train
    r = dict(preset="hmar-d30", stage="next-scale", batch=16, img_per_s=71.3)
    assert bench_train.against_official(r) == "  vs official VAR 1.57x (goal 2.0x: NOT met)"
    assert bench_train.against_official({**r, "preset": "hmar-d16-512", "batch": 8, "img_per_s": 130.0}) == \
        "  vs official VAR 2.52x (goal 2.5x: met)"
    assert bench_train.against_official({**r, "preset": "var-d16", "batch": 32, "img_per_s": 198.1}) == \
        "  vs official VAR 0.99x"
    assert bench_train.against_official({**r, "batch": 8}) == ""
    assert bench_train.against_official({**r, "preset": "hmar-d16", "batch": 32, "stage": "masked"}) == ""
