"""FP8 inference (hmar.model.fp8): the scaling convention against a float reference of the same roundings, the
conversion of exactly the blocks' four linears, every pass through them, the Triton quantisation kernel against
the torch ops, and the errors on bad use. CPU (fp8 layers compute the product of their rounded operands in fp32
there); the graphed-sampling test needs a CUDA GPU of compute capability 8.9+."""
import argparse

import pytest
import torch
import torch.nn as nn

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.model.fp8 import E4M3, E4M3_MAX, LAYERS, Float8Linear, linear, quantize_rows, to_float8
from hmar.sampling import sample

fp8_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                             reason="needs a CUDA GPU with fp8 GEMMs (compute capability 8.9+)")


def _round_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(E4M3).float()


def _simulated(layer: nn.Linear, x: torch.Tensor, bias) -> torch.Tensor:
    """What the fp8 layer computes, in fp32 from first principles: the weight rounded to e4m3 on its row's scale
    (row max / 448), each input row the same way, the product of the rounded values plus the bias."""
    w = layer.weight.detach().float()
    ws = w.abs().amax(1, keepdim=True) / E4M3_MAX
    xf = x.reshape(-1, x.shape[-1]).float()
    xs = xf.abs().amax(1, keepdim=True) / E4M3_MAX
    out = (_round_e4m3(xf / xs) * xs) @ (_round_e4m3(w / ws) * ws).t()
    return (out if bias is None else out + bias.float()).view(*x.shape[:-1], -1)


def test_quantize_rows_keeps_each_row_within_e4m3_precision():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]      # rows six decades apart
    x[3] = 0.0                                                         # an all-zero row stays zero
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    assert torch.equal(back[3], torch.zeros(256))
    # each row's largest entry maps to 448 exactly; every entry within half an e4m3 step (3 mantissa bits: 1/16
    # relative) of its value, or within the subnormal step 2^-9 of the row's scale
    rows = [i for i in range(64) if i != 3]
    assert torch.equal(q.float()[rows].abs().amax(1), torch.full((63,), E4M3_MAX))
    err = (back - x).abs()
    assert (err <= x.abs() / 16 + scale * 2 ** -9 + 1e-30).all()


@pytest.mark.parametrize("bias", [True, False])
def test_float8_linear_is_the_product_of_the_rounded_operands(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 48, bias=bias)
    x = torch.randn(2, 7, 96)
    f8 = Float8Linear(lin)
    want = _simulated(lin, x, lin.bias)
    got = f8(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # close to the exact layer, but not equal to it: the roundings are real
    rel = (got - lin(x)).norm() / lin(x).norm()
    assert 1e-3 < rel < 0.06
    # the dequantized weight is the rounded one
    torch.testing.assert_close(f8.dequantized_weight(), _simulated(lin, torch.eye(96), None).t().contiguous(),
                               rtol=0, atol=0)


def test_bias_override_and_dtype_conversion():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    f8 = Float8Linear(lin)
    x, b = torch.randn(5, 64), torch.randn(32)
    torch.testing.assert_close(linear(f8, x, b), _simulated(lin, x, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(lin, x, b), lin(x) + b)          # an nn.Linear takes the bias the same way
    f8.to(torch.bfloat16)                                              # the fp8 bytes are not a float tensor
    assert f8.weight_fp8.dtype == torch.uint8
    out = f8(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _simulated(lin, x.bfloat16(), None), rtol=0.02, atol=0.02)


_KERNEL_CHECK = """
import sys, torch
import hmar.model.fp8 as fp8
gelu = sys.argv[1] == "1"
dev = "cuda" if torch.cuda.is_available() else "cpu"
from hmar.model import fp8_kernel
assert fp8_kernel.available(torch.device(dev)) and fp8.kernel_available(torch.device(dev)) == (dev == "cuda")
torch.manual_seed(0)
wide = (torch.randn(37, 320) * torch.logspace(-3, 3, 37)[:, None]).bfloat16().to(dev)
x = wide[:, :300]                                   # rows of no power-of-two length, a row stride wider than them
q, s = fp8_kernel.quantize_with_kernel(x, gelu)
q0, s0 = fp8.quantize_ops(x, gelu)
assert q.dtype == fp8.E4M3 and s.shape == (37, 1)
torch.testing.assert_close(s, s0, rtol=1e-5, atol=0)
a, b = q.float(), q0.float()
assert (a == b).float().mean() > 0.99               # the GELU's formula may move a value across a rounding
assert ((a - b).abs() <= b.abs() / 8 + 2 ** -9).all()   # boundary: one e4m3 step at most
print("ok", (a == b).float().mean().item())
"""


@pytest.mark.parametrize("gelu", [False, True])
def test_quantize_kernel_equals_the_torch_ops(gelu):
    """The Triton row kernel (GELU + absolute maximum + e4m3 rounding) against the torch ops, on rows six decades
    apart. On the GPU as it runs there; on the CPU in a process of its own under Triton's interpreter (which must be
    on before Triton is first imported)."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ) if torch.cuda.is_available() else {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _KERNEL_CHECK, "1" if gelu else "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


def test_importing_hmar_does_not_import_triton():
    """The kernel modules (and Triton) load with the first fp8 layer or fused normalisation, not with hmar."""
    import subprocess
    import sys
    code = ("import sys, hmar, hmar.accel, hmar.model.fp8, hmar.sampling; "
            "print('triton' in sys.modules, 'hmar.model.fp8_kernel' in sys.modules, "
            "'hmar.model.norm_kernel' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["False", "False", "False"], run.stdout + run.stderr


def test_float8_linear_refuses_autograd():
    f8 = Float8Linear(nn.Linear(32, 16))
    with pytest.raises(RuntimeError, match="inference"):
        f8(torch.randn(3, 32, requires_grad=True))
    with torch.no_grad():
        f8(torch.randn(3, 32, requires_grad=True))


class _Simulated(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x, bias=..., gelu=False):
        x = nn.functional.gelu(x.float(), approximate="tanh") if gelu else x
        return _simulated(self.lin, x, self.lin.bias if bias is ... else bias)


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_to_float8_converts_the_four_block_linears_and_every_pass_uses_them(name):
    torch.manual_seed(0)
    ref = build_model(model_config(name)).eval()
    model = build_model(model_config(name)).eval()
    model.load_state_dict(ref.state_dict())
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "AdaLNBlock"]
    cfg = model.config
    assert len(blocks) == cfg.depth + (cfg.branch_depth if cfg.kind == "hmar" else 0)   # HMAR: two branches
    assert to_float8(model) == 4 * len(blocks)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {f"{b}.{layer}" for b in blocks for layer in LAYERS}
    # the reference model with each of those layers computed from first principles (rounded operands in fp32)
    for n in converted:
        parent, _, leaf = n.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, _Simulated(ref.get_submodule(n)))
    L = model.config.seq_len
    labels, x_in = torch.tensor([1, 2]), torch.randn(2, L - 1, model.config.z_channels)
    with torch.no_grad():
        torch.testing.assert_close(model(labels, x_in), ref(labels, x_in), rtol=1e-4, atol=1e-4)
        # the inference passes, with the packed condition as the sampler calls them
        cond = model.precompute_condition(model.class_cond(labels))
        x = torch.randn(2, 4, model.config.embed_dim)
        methods = ["next_scale_logits"] + (["masked_logits"] if hasattr(model, "masked_logits") else [])
        for method in methods:
            torch.testing.assert_close(getattr(model, method)(x, cond), getattr(ref, method)(x, cond),
                                       rtol=1e-4, atol=1e-4)
    # sampling runs through them and stays a valid token sequence
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    out = sample(model, tok, [1, 2], generator=0, decode=False)
    assert all(((t >= 0) & (t < model.config.vocab_size)).all() for t in out.indices)


def test_to_float8_leaves_layers_that_scaled_mm_cannot_take():
    from hmar.model.blocks import AdaLNBlock
    block = AdaLNBlock(40, 2)                  # 40 is not a multiple of 16; fc1 (40 -> 160) neither, by its input
    assert to_float8(block) == 0
    assert all(isinstance(getattr(getattr(block, p.split(".")[0]), p.split(".")[1]), nn.Linear) for p in LAYERS)


def test_cli_fp8_needs_a_gpu_with_fp8(capsys):
    from hmar.cli.common import add_model_args, load_pipeline
    from hmar.errors import HMARError
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--fp8", "--device", "cpu"])
    with pytest.raises(HMARError, match="--fp8"):
        load_pipeline(args)


@fp8_gpu
@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_graphed_fp8_sampling_matches_eager_fp8(name):
    """On the GPU: the graphed fp8 loop samples the eager fp8 model's tokens, and one fp8 layer equals its
    first-principles reference to bf16's rounding."""
    from hmar.accel import GraphedModel
    torch.manual_seed(0)
    lin = nn.Linear(256, 512).cuda()
    x = torch.randn(300, 256, device="cuda")
    got = Float8Linear(lin)(x.bfloat16()).float()
    torch.testing.assert_close(got, _simulated(lin, x.bfloat16(), lin.bias), rtol=0.016, atol=0.02)
    model = build_model(model_config(name)).cuda().eval().to(torch.bfloat16)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    fast = GraphedModel(model, fp8=True)
    blocks = sum(type(m).__name__ == "AdaLNBlock" for m in model.modules())
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 4 * blocks
    for seed in (0, 1):
        want = sample(model, tok, [1, 2, 3], generator=seed, decode=False)
        got = sample(fast, tok, [1, 2, 3], generator=seed, decode=False)
        assert all(torch.equal(a, b) for a, b in zip(want.indices, got.indices))


def test_bench_fp8_smoke_run_reports_fp8_error_above_bf16(tmp_path):
    """benchmarks/bench_fp8.py on the CPU (random hmar-tiny): its error table, fp8's error above bf16's own."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fp8.py"
    out = tmp_path / "f8.json"
    subprocess.run([sys.executable, str(script), "--part", "error", "--device", "cpu", "--configs", "hmar-tiny",
                    "--error-batch", "2", "--json", str(out)], check=True, capture_output=True, timeout=300)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["error"]}
    assert set(rows) == {"bf16", "bf16+fp8"}
    assert 0 < rows["bf16"]["rel_rms"] < rows["bf16+fp8"]["rel_rms"] < 0.1
    assert all(0.5 < r["argmax_agree"] <= 1 and r["kl_mean"] >= 0 for r in rows.values())
