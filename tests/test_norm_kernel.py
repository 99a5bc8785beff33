"""The fused residual add + LayerNorm + modulation of the sampling passes (``hmar.model.norm_kernel``): the kernel
against the torch ops it replaces (strided and shared modulations, widths of no power of two, fp32 and bf16), its
custom ops through torch.compile's tracing, every pass of the models with ``fused_norm`` against the ops, training
untouched, and the switch's errors.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set before the module is
imported, as in ``test_draw_kernel.py``; the interpreter truncates to bf16 instead of rounding, so bf16 results are
compared to one bf16 step); with CUDA on the GPU, plus the graphed sampler at the goal configs' widths."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import hmar.model.norm_kernel as nk  # noqa: E402

if not ON_GPU and not nk._INTERPRETED:
    nk = importlib.reload(nk)  # imported earlier without the interpreter: decorate again

from hmar import VQVAE, build_model, model_config, tokenizer_config  # noqa: E402
import hmar.model.blocks as blocks  # noqa: E402
from hmar.model.blocks import AdaLNBlock, AdaLNHead, enable_fused_norm, modulated_norm  # noqa: E402
from hmar.sampling import sample  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _reference(x, h, gate, scale, shift, eps=1e-6):
    """The ops in fp64: the stream ``x + h * gate`` rounded to ``x``'s dtype, its LayerNorm and modulation."""
    xs = x if h is None else (x.double() + h.double() * gate.double()).to(x.dtype)
    return xs, _modulated(xs, scale, shift, eps)


def _modulated(xs, scale, shift, eps=1e-6):
    """LN(xs) * (1 + scale) + shift in fp64 (of the stream as the kernel stored it: a step of x' moves the output
    by more than a step of its own where the shift cancels it)."""
    return F.layer_norm(xs.double(), xs.shape[-1:], eps=eps) * (1 + scale.double()) + shift.double()


def _close_to_one_step(got, want, dtype):
    """fp32: to 1e-5; bf16: within one bf16 step (2^-7 relative; the interpreter truncates, the GPU rounds)."""
    got, want = got.double(), want.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert ((got - want).abs() <= want.abs() * 2 ** -7 + 2 ** -14).all(), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,C,shared", [(2, 5, 48, False), (3, 7, 96, True), (1, 1, 40, False), (4, 3, 64, False)])
def test_kernel_equals_the_ops(dtype, B, L, C, shared):
    """x' and the output against fp64 ops: widths of no power of two, one row per sample, a modulation shared by
    the batch ([1, C]), gate / scale / shift as strided rows of a packed [B, K, C] modulation, a strided x."""
    g = torch.Generator().manual_seed(B * 100 + C)
    wide = torch.randn(B, L, C + 8, generator=g).to(dtype)
    x = wide[..., :C]                                   # a row stride wider than the row
    h = torch.randn(B, L, C, generator=g).to(dtype)
    packed = torch.randn(1 if shared else B, 9, C, generator=g).to(dtype)   # a model's packed modulations
    mod = packed[:, 2:8]                                # one block's six, strided
    gate, scale, shift = mod[:, None, 0], mod[:, None, 2], mod[:, None, 4]
    x, h, gate, scale, shift = (t.to(DEVICE) for t in (x, h, gate, scale, shift))
    xo, y = nk.adaln_norm_kernel(x, scale, shift, 1e-6, h, gate)
    want_x = _reference(x.cpu(), h.cpu(), gate.cpu(), scale.cpu(), shift.cpu())[0]
    assert xo.dtype == y.dtype == dtype and xo.shape == y.shape == (B, L, C) and y.is_contiguous()
    _close_to_one_step(xo.cpu(), want_x, dtype)
    _close_to_one_step(y.cpu(), _modulated(xo.cpu(), scale.cpu(), shift.cpu()), dtype)
    # without a branch: the normalisation of x itself, through the registered op
    y0 = torch.ops.hmar.adaln_norm(x, scale, shift, 1e-6)
    _close_to_one_step(y0.cpu(), _reference(x.cpu(), None, None, scale.cpu(), shift.cpu())[1], dtype)
    # and through modulated_norm, fused and not
    ln = torch.nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
    for fused in (False, True):
        x2, y2 = modulated_norm(ln, x.float(), scale.float(), shift.float(), h.float(), gate.float(), fused=fused)
        want = _reference(x.float().cpu(), h.float().cpu(), gate.float().cpu(), scale.float().cpu(),
                          shift.float().cpu())
        _close_to_one_step(x2.cpu(), want[0], torch.float32)
        _close_to_one_step(y2.cpu(), want[1], torch.float32)


@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("B,L,C,shared", [(2, 9, 48, False), (3, 5, 40, True)])
def test_training_op_gradients_equal_autograd_of_the_ops(branch, B, L, C, shared):
    """``hmar::adaln_norm_train``'s backward kernel against autograd through the fp64 ops: the gradients of x, h,
    gate, scale and shift for losses on both outputs, over rows of no multiple of the backward's chunk (several
    chunks per sample), a width of no power of two, and a modulation shared by the batch (its gradient summed)."""
    g = torch.Generator().manual_seed(B * 10 + C)
    x, h = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    mod = torch.randn(1 if shared else B, 6, C, generator=g)
    wy, wx = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, h, mod)]

    def run(fused, dtype):
        x, h, mod = (t.to(dtype) for t in leaves)
        gate, scale, shift = mod[:, None, 0], mod[:, None, 2], mod[:, None, 4]
        ln = torch.nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        xo, y = modulated_norm(ln, x, scale, shift, *((h, gate) if branch else ()), fused=fused)
        loss = (y * wy.to(y)).sum() + ((xo * wx.to(xo)).sum() if branch else 0)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [xo, y], grads
    (xo, y), got = run(True, torch.float32)
    (xo0, y0), want = run(False, torch.float64)
    torch.testing.assert_close(y.double(), y0, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(got, want, ("x", "h", "mod")):
        if not branch and name == "h":
            assert a is None and b is None
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy on opcheck's random inputs
def test_ops_pass_opcheck():
    """torch.library.opcheck (schema, fake implementation, autograd registration, AOT dispatch with dynamic shapes)
    of the training op with and without a branch, and of both inference ops."""
    x, h = torch.randn(2, 6, 32, device=DEVICE), torch.randn(2, 6, 32, device=DEVICE)
    mod = torch.randn(2, 6, 32, device=DEVICE)
    args = [x, h, mod[:, None, 0], mod[:, None, 2], mod[:, None, 4]]
    for branch in (True, False):
        a = [t.clone().requires_grad_() for t in args]
        if not branch:
            a[1] = a[2] = None
        torch.library.opcheck(torch.ops.hmar.adaln_norm_train.default, (*a, 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.hmar.adaln_residual_norm.default, (*args, 1e-6))
    torch.library.opcheck(torch.ops.hmar.adaln_norm.default, (x, args[3], args[4], 1e-6))


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_training_with_the_kernel_equals_the_ops(name, monkeypatch):
    """``FUSED_NORM_TRAINING``: a training forward (drop-path on: the kernel takes it on the gate, with the same draws)
    and its gradients against the ops, fp32; teacher-forced features defer each block's last branch to the next."""
    cfg = model_config(name, drop_path_rate=0.2)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE).train()
    for p in model.parameters():   # non-zero modulations (the AdaLN layers start at zero)
        p.data.add_(torch.randn_like(p), alpha=0.05)
    labels = torch.tensor([1, 2, 3], device=DEVICE)
    x_in = torch.randn(3, cfg.seq_len - 1, cfg.z_channels, device=DEVICE)
    outs = []
    for fused in (False, True):
        monkeypatch.setattr(blocks, "FUSED_NORM_TRAINING", fused)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(labels, x_in)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (o0, g0), (o1, g1) = outs
    torch.testing.assert_close(o1, o0, rtol=1e-4, atol=1e-4)
    assert len(g0) == len(g1)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_training_with_the_kernel_has_no_graph_break(monkeypatch):
    """torch.compile of a training forward + backward with the kernel (aot_eager: the traced graph with the ops'
    fake implementations and autograd formula, no code generation), under bf16 autocast as the trainer runs it:
    no graph break, the eager run's output and gradients."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(blocks, "FUSED_NORM_TRAINING", True)
    torch.manual_seed(0)
    model = build_model(model_config("hmar-tiny", drop_path_rate=0.0)).to(DEVICE).train()
    labels = torch.tensor([1, 2], device=DEVICE)
    x_in = torch.randn(2, model.config.seq_len - 1, model.config.z_channels, device=DEVICE)

    def step(fn):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = fn(labels, x_in)
        out.float().square().mean().backward()
        return out.detach().float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    want = step(model)
    torch._dynamo.reset()
    counters.clear()
    got = step(torch.compile(model, backend="aot_eager"))
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got[0], want[0], rtol=0.02, atol=0.02)
    assert len(got[1]) == len(want[1])


def test_launch_configs_are_the_measured_ones_and_bound_the_registers(monkeypatch):
    """The (rows per program, warps) of call 37's sweep at widths 1024 and 1920 (BENCHMARKS.md 3o), and for any
    width up to 8192 at most 32 elements of a tile per thread."""
    monkeypatch.setattr(nk, "_INTERPRETED", False)
    rows = (32, 512, 2048, 8192, 32768)
    assert [nk.launch_config(r, 1024) for r in rows] == [(1, 8), (1, 4), (1, 2), (1, 4), (2, 4)]
    assert [nk.launch_config(r, 1920) for r in rows] == [(1, 8), (1, 4), (1, 2), (1, 2), (1, 2)]
    for width in (64, 768, 1536, 2304, 3072, 4096, 8192):
        for r in rows:
            per, warps = nk.launch_config(r, width)
            assert per * triton.next_power_of_2(width) <= 32 * 32 * warps, (width, r, per, warps)


def test_kernel_rejects_bad_shapes():
    x = torch.randn(2, 3, 16, device=DEVICE)
    s = torch.randn(2, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \[B, L, C\]"):
        nk.adaln_norm_kernel(x[0], s, s, 1e-6)
    with pytest.raises(ValueError, match="scale has shape"):
        nk.adaln_norm_kernel(x, torch.randn(3, 16, device=DEVICE), s, 1e-6)
    with pytest.raises(ValueError, match="must match x"):
        nk.adaln_norm_kernel(x, s, s, 1e-6, torch.randn(2, 4, 16, device=DEVICE), s)


def test_custom_ops_trace_under_torch_compile():
    """The ops' fake implementations: torch.compile (aot_eager: the graph of fake tensors, no code generation)
    traces a block-like function through both and gets the kernel's results."""
    x, h = torch.randn(2, 4, 32, device=DEVICE), torch.randn(2, 4, 32, device=DEVICE)
    mod = torch.randn(2, 6, 32, device=DEVICE)
    gate, scale, shift = mod[:, None, 0], mod[:, None, 2], mod[:, None, 4]

    def fn(x, h):
        x, y = torch.ops.hmar.adaln_residual_norm(x, h, gate, scale, shift, 1e-6)
        return x, torch.ops.hmar.adaln_norm(y * 2, scale, shift, 1e-6)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, h)
    want = fn(x, h)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _model(name):
    torch.manual_seed(0)
    return build_model(model_config(name)).to(DEVICE).eval()


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_fused_norm_passes_equal_the_ops_and_training_is_untouched(name):
    """Every inference pass with ``fused_norm`` (blocks and head) against the same model without it, in fp32; with
    autograd on, the blocks keep the ops (the kernel has no backward): outputs and gradients bit for bit."""
    model = _model(name)
    mods = enable_fused_norm(model)
    cfg = model.config
    assert mods == sum(isinstance(m, (AdaLNBlock, AdaLNHead)) for m in model.modules()) > cfg.depth
    ref = _model(name)
    labels = torch.tensor([1, 2], device=DEVICE)
    x_in = torch.randn(2, cfg.seq_len - 1, cfg.z_channels, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(labels, x_in), ref(labels, x_in), rtol=1e-4, atol=1e-4)
        cond = model.precompute_condition(model.class_cond(labels))
        x = torch.randn(2, 4, cfg.embed_dim, device=DEVICE)
        methods = ["next_scale_logits"] + (["masked_logits"] if hasattr(model, "masked_logits") else [])
        for method in methods:
            torch.testing.assert_close(getattr(model, method)(x, cond), getattr(ref, method)(x, cond),
                                       rtol=1e-4, atol=1e-4)
    model.train()
    ref.train()
    torch.manual_seed(1)   # the same dropout / drop-path draws in both
    out = model(labels, x_in)
    torch.manual_seed(1)
    want = ref(labels, x_in)
    assert torch.equal(out, want)
    out.square().mean().backward()
    want.square().mean().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), ref.parameters())
               if a.grad is not None)
    # sampling through the kernel draws the same tokens as through the ops (fp32: differences far below a draw's)
    model.eval()
    ref.eval()
    tok = VQVAE(tokenizer_config("vqvae-tiny")).to(DEVICE).eval()
    a = sample(model, tok, [1, 2], generator=0, decode=False)
    b = sample(ref, tok, [1, 2], generator=0, decode=False)
    assert all(torch.equal(p, q) for p, q in zip(a.indices, b.indices))
    assert enable_fused_norm(model, False) == mods and not any(getattr(m, "fused_norm", False)
                                                               for m in model.modules())


def test_enable_fused_norm_refuses_a_device_the_kernel_does_not_run_on(monkeypatch):
    model = build_model(model_config("hmar-tiny"))   # on the CPU
    monkeypatch.setattr(nk, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="does not run on cpu"):
        enable_fused_norm(model)
    enable_fused_norm(model, False)   # turning it off always works


gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@gpu
@pytest.mark.parametrize("C", [1024, 1920])
def test_kernel_at_the_goal_widths_on_the_gpu(C):
    """bf16 at hmar-d16's and hmar-d30's widths and a 512 px pass's rows: within a bf16 step of fp64 ops (the GPU
    rounds to nearest), and at least as close to them as the bf16 ops."""
    torch.manual_seed(0)
    x, h = torch.randn(32, 576, C, device="cuda").bfloat16(), torch.randn(32, 576, C, device="cuda").bfloat16()
    mod = (torch.randn(32, 6, C, device="cuda") * 0.5).bfloat16()
    gate, scale, shift = mod[:, None, 0], mod[:, None, 2], mod[:, None, 4]
    xo, y = nk.adaln_norm_kernel(x, scale, shift, 1e-6, h, gate)
    want_x, want_y = _reference(x, h, gate, scale, shift)
    assert torch.equal(xo, want_x)   # one rounding of an fp32 sum: exact where fp64's rounds the same
    _close_to_one_step(y, _modulated(xo, scale, shift), torch.bfloat16)
    ln = torch.nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
    ops_y = modulated_norm(ln, x, scale, shift, h, gate)[1]
    assert (y.double() - want_y).abs().mean() <= (ops_y.double() - want_y).abs().mean()


@pytest.mark.slow
@torch.no_grad()
def test_compiled_blocks_call_the_kernel_with_one_code_for_all_blocks():
    """``compile_blocks`` (inductor, dynamic shapes) with ``fused_norm``: the fused eager model's logits at every
    scale size, in as many graphs as without it (the ops trace with symbolic sizes)."""
    from conftest import check_compiled_blocks_graphs
    m = build_model(model_config("hmar-tiny", depth=3, branch_depth=1)).to(DEVICE).eval()
    for p in m.parameters():   # non-zero modulations (the AdaLN layers start at zero)
        p.data.normal_(0, 0.05, generator=torch.Generator(DEVICE).manual_seed(p.numel()))
    enable_fused_norm(m)
    check_compiled_blocks_graphs(m)


@gpu
@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_graphed_sampling_with_the_kernel_matches_eager(name):
    """The graphed sampler runs the kernel (on by default) and samples the eager model's tokens. Compiled blocks
    with the kernel against inductor's kernels (``fused_norm`` off), both in bf16: the logits of every pass kind
    as close to fp32 eager ones (within 1.25x the error of inductor's)."""
    from hmar.accel import GraphedModel, compile_blocks
    model = _model(name).to(torch.bfloat16)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    fast = GraphedModel(model)
    assert fast.fused_norm and all(m.fused_norm for m in model.modules() if isinstance(m, (AdaLNBlock, AdaLNHead)))
    for seed in (0, 1):
        want = sample(model, tok, [1, 2, 3], generator=seed, decode=False)
        got = sample(fast, tok, [1, 2, 3], generator=seed, decode=False)
        assert all(torch.equal(a, b) for a, b in zip(want.indices, got.indices))
    assert not GraphedModel(_model(name).to(torch.bfloat16), fp8=True).fused_norm   # fp8 keeps inductor's
    ref = _model(name)
    for p in ref.parameters():   # non-zero modulations (the AdaLN layers start at zero)
        p.data.add_(torch.randn_like(p), alpha=0.02)
    m = _model(name).to(torch.bfloat16)
    m.load_state_dict(ref.state_dict())
    compile_blocks(m)
    labels = torch.arange(8, device="cuda") % ref.config.num_classes
    x = torch.randn(8, 16, ref.config.embed_dim, device="cuda")
    methods = ["next_scale_logits"] + (["masked_logits"] if hasattr(ref, "masked_logits") else [])
    with torch.no_grad():
        for method in methods:
            want = getattr(ref, method)(x, ref.precompute_condition(ref.class_cond(labels))).float()
            err = {}
            for on in (True, False):
                enable_fused_norm(m, on)
                got = getattr(m, method)(x.bfloat16(), m.precompute_condition(m.class_cond(labels))).float()
                err[on] = ((got - want).norm() / want.norm()).item()
            assert err[True] <= 1.25 * err[False] + 1e-3, (method, err)


def test_bench_norm_smoke_run(tmp_path):
    """benchmarks/bench_norm.py on the CPU (hmar-tiny's pass sizes, the interpreter): its rows and errors."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_norm.py"
    out = tmp_path / "norm.json"
    subprocess.run([sys.executable, str(script), "--device", DEVICE, "--configs", "hmar-tiny", "--batch", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "TRITON_INTERPRET": "0" if ON_GPU else "1"})
    rows = json.loads(out.read_text())
    assert [r["tokens"] for r in rows] == [1, 4, 9, 16] and [r["passes"] for r in rows] == [1, 2, 4, 1]
    assert all(r["err_kernel"] < 0.1 and r["err_ops"] < 0.1 for r in rows)   # bf16 outputs of O(1) values
