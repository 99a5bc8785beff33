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
from hmar.presets import ModelConfig, model_config
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


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_gemm_flops_and_parameters_equal_torchs_count_of_a_step(name):
    """One fp32 training step's matmul FLOPs (forward, backward; the quantizer's own resizes taken out) equal the
    script's GEMM list with the head run four times, as the chunked CE runs it; its parameters are the trained ones."""
    d = model_config(name).to_dict()
    if d["kind"] == "hmar":
        d["kind"] = "nsp"
    cfg = ModelConfig.from_dict(d)
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
    assert step - resizes == ft.gemm_flops(name, batch, head_products=4)
    assert ft.gemm_flops(name, batch) < ft.gemm_flops(name, batch, head_products=4)
    assert ft._params(name) == sum(p.numel() for p in st.params)


def test_attention_pairs_follow_the_patterns():
    """Block-diagonal HMAR: each scale's n^2; block-causal VAR: each scale's n times the tokens up to its end."""
    sizes = [p * p for p in model_config("hmar-tiny").patch_nums]     # 1, 4, 9, 16
    assert ft.attended_pairs("hmar-tiny") == sum(n * n for n in sizes) == 354
    assert ft.attended_pairs("var-tiny") == 1 * 1 + 4 * 5 + 9 * 14 + 16 * 30 == 627
    # the ceiling is the kernel's measured rate at the 512 px schedule: 14 x 1,522,100 x 1024 x 16 FLOPs in 1.41 ms
    assert ft.ATTN_TRAIN_TFS == pytest.approx(14 * 1_522_100 * 1024 * 16 / 1.41e-3 / 1e12)


def test_floors_are_below_the_measured_steps():
    """Every goal config's floor is below its measured step; the measured GEMMs of hmar-d16 are at the ceiling
    (within 2 % of their floor) and the other kinds above theirs; the goals lie between floor and measurement; per-row work scales with the batch."""
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
