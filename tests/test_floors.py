"""benchmarks/floors.py: its passes are the sampler's, its GEMM FLOPs torch's own count of a real pass."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.sampling import sample

_spec = importlib.util.spec_from_file_location("floors", Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "floors.py")
floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors)


def test_passes_are_the_samplers():
    """Every (tokens, kind) pass floors.passes lists is a pass the sampler runs, in order (hmar-tiny's default
    schedule: masked passes at its second and third scales)."""
    model = build_model(model_config("hmar-tiny")).eval()
    seen = []
    for kind, method in (("next-scale", "next_scale_logits"), ("masked", "masked_logits")):
        real = getattr(model, method)

        def spy(x, cond, *a, _real=real, _kind=kind, **k):
            seen.append((x.shape[1], _kind))
            return _real(x, cond, *a, **k)
        setattr(model, method, spy)
    sample(model, VQVAE(tokenizer_config("vqvae-tiny")).eval(), [1, 2], generator=0, decode=False)
    assert seen == list(floors.passes("hmar-tiny"))
    assert sum(k == "masked" for _, k in seen) == 4


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_gemm_flops_equal_torchs_count_of_a_pass(name):
    """The GEMM FLOPs of one pass (the blocks' four linears and the head, 2 R K N each) equal FlopCounterMode's
    count of the pass's matmuls (attention counted apart)."""
    model = build_model(model_config(name)).eval()
    cfg = model.config
    labels = torch.tensor([1, 2, 3])
    cond = model.precompute_condition(model.class_cond(labels))
    x = torch.randn(3, 9, cfg.embed_dim)
    counter = FlopCounterMode(display=False)
    with counter:   # (with autograd on: the counter's module tracker needs grad_fns)
        model.next_scale_logits(x, cond)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if "mm" in str(op) and "bmm" not in str(op))
    assert matmuls == floors.pass_gemm_flops(name, rows=3 * 9)


def test_floors_are_below_the_measured_kernel_times():
    """A floor at the measured ceilings is below what the profiles measured, for every kind the kernels are
    bandwidth- or FLOP-bound (the 512 px norm kernels run at 1.2-1.3x theirs)."""
    for name, measured in floors.MEASURED.items():
        f = floors.floors(name)
        for kind in floors.KINDS:
            assert f[kind] <= measured[kind] * 1.0001 + 1e-9, (name, kind, f[kind], measured[kind])
        assert f["total"] < measured["wall"][0]
