"""benchmarks/floors_train.py: its GEMM FLOPs and parameter count are torch's own count of a real training step,
its attention FLOPs follow the attention patterns, and its floors sit below the measured steps."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hmar.model import build_model, init_weights
from hmar.presets import model_config
from hmar.tokenizer.quantizer import MultiScaleQuantizer
from hmar.training.distributed import DistInfo
from hmar.training.loop import prepare_training, train_step
from hmar.training.losses import split_scales

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
_spec = importlib.util.spec_from_file_location("floors_train", _BENCH / "floors_train.py")
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)


def _matmul_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "mm" in str(op) and "bmm" not in str(op))


WIDE = dict(vocab_size=96, mlp_ratio=3.0, z_channels=12)   # every width unlike the embedding's 64


@pytest.mark.parametrize("name, override", [("hmar-tiny", {}), ("hmar-tiny", WIDE), ("var-tiny", WIDE)])
def test_gemm_flops_and_parameters_equal_torchs_count_of_a_step(name, override):
    """One fp32 training step's matmul FLOPs (forward, backward; the quantizer's own resizes taken out) equal the
    script's GEMM list with the head run four times, as the chunked CE runs it; its parameters are the trained ones.
    The wide case tells the vocabulary, the MLP width and the latent width apart from the embedding width."""
    cfg = model_config(name, **override).stage_one()
    torch.manual_seed(0)
    model = build_model(cfg)
    init_weights(model)
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    st = prepare_training(model, quant, "next-scale", DistInfo(device=torch.device("cpu")), precision="fp32",
                          fused="off", lr=1e-4, chunked_ce=True)
    batch = 3
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    labels = torch.randint(0, cfg.num_classes, (batch,))
    step = _matmul_flops(lambda: train_step(st, idx, labels))
    with torch.no_grad():
        resizes = _matmul_flops(lambda: quant.next_scale_inputs(split_scales(idx, cfg.patch_nums)))
    assert step - resizes == ft.gemm_flops(cfg, batch, head_products=4)
    assert ft.gemm_flops(cfg, batch) < ft.gemm_flops(cfg, batch, head_products=4)
    assert ft._params(cfg) == sum(p.numel() for p in st.params)


def test_attention_pairs_and_rate():
    """Block-diagonal HMAR: each scale's n^2; block-causal VAR: each scale's n times the tokens up to its end. At the
    shape section 1 timed (one layer of the 512 px schedule, B = 16, 16 heads of 64), the attention floor is that
    measured 1.410 ms: hmar-d16-512's 16 layers at batch 16 take 16 of them."""
    assert ft.attended_pairs("hmar-tiny") == 1 * 1 + 4 * 4 + 9 * 9 + 16 * 16 == 354
    assert ft.attended_pairs("var-tiny") == 1 * 1 + 4 * 5 + 9 * 14 + 16 * 30 == 627
    assert ft.floors("hmar-d16-512", 16)["attention"] == pytest.approx(16 * 1.410)
    assert ft.floors("hmar-d16-512", 16)["attn_tflop"] == pytest.approx(16 * 16 * 14 * 1_522_100 * 1024 / 1e12)


def test_elementwise_and_optimizer_bytes():
    """The byte floors from a tensor-by-tensor count (bf16 elements a row): per block, forward 2 norms x (x, branch,
    x', out) and GELU (u, g); backward GELU (u, dg, du) and 2 norms x (x', d out, d residual, branch, dx, d branch);
    the head's norm (x, out; x, d out, dx) and the CE (logits, read, gradient); AdamW 28 bytes a parameter and the
    clipping 4."""
    cfg = model_config("hmar-tiny", **WIDE)
    C, D, V, H = cfg.embed_dim, cfg.depth, cfg.vocab_size, round(cfg.embed_dim * cfg.mlp_ratio)
    per_block = 2 * 4 * C + 2 * H + 3 * H + 2 * 6 * C
    assert H == 3 * C                       # not the default 4 C: the MLP width counts apart
    rows = 5 * cfg.seq_len
    f = ft.floors(cfg, 5)
    want = rows * (2 * D * per_block + 2 * (5 * C + 3 * V))
    assert f["elementwise_gb"] * 1e9 == pytest.approx(want)
    assert f["optimizer"] == pytest.approx(32 * ft._params(cfg) / ft.HBM_TBS / 1e9)


def test_floors_are_below_the_measured_steps():
    """Every goal config's floor is below its measured step and the goal lies between the two; hmar-d16's measured
    GEMMs are at the 713 TF/s rate (within 2 %: cuBLAS ran slightly faster) and its other kinds above their floors;
    the per-row work scales with the batch."""
    for name, (batch, goal) in ft.GOALS.items():
        f = ft.floors(name, batch)
        m = ft.MEASURED[name]
        assert f["total"] < batch / goal * 1e3 < m["step_ms"], name
        for kind, got in m.get("kinds", {}).items():
            assert got >= f[kind] * 0.98, (name, kind)
    kinds = ft.MEASURED["hmar-d16"]["kinds"]
    assert kinds["gemm"] == pytest.approx(ft.floors("hmar-d16", 32)["gemm"], rel=0.02)
    f32, f64 = ft.floors("hmar-d16", 32), ft.floors("hmar-d16", 64)   # the per-row work doubles, AdamW's does not
    for kind in ("gemm", "attention", "elementwise"):
        assert f64[kind] == pytest.approx(2 * f32[kind], rel=1e-2), kind   # (AdaLN GEMMs: weight-bound)
    assert f64["optimizer"] == f32["optimizer"]
