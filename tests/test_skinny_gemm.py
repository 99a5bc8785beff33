"""The small-pass GEMM (``hmar.model.skinny_gemm``, an experiment behind ``SKINNY_GEMM_MAX_ROWS``): the kernel against
fp64 products (bias, GELU, odd sizes, strided inputs), the blocks' routing through ``dense`` with the switch on
against off, and its op under torch.compile's tracing. CPU under Triton's interpreter (which truncates to bf16: bf16
is compared to a step); on CUDA also at hmar-d16's and hmar-d30's shapes against ``F.linear``."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import hmar.model.skinny_gemm as sg  # noqa: E402

if not ON_GPU and not sg._INTERPRETED:
    sg = importlib.reload(sg)

import hmar.model.blocks as blocks  # noqa: E402
from hmar import build_model, model_config  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _want(x, w, b, gelu):
    y = x.double() @ w.double().t() + (0 if b is None else b.double())
    return F.gelu(y, approximate="tanh") if gelu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(1, 40, 24), (5, 96, 50), (33, 64, 80)])
@pytest.mark.parametrize("bias,gelu", [(True, False), (False, False), (True, True)])
def test_kernel_equals_the_product(dtype, M, K, N, bias, gelu):
    g = torch.Generator().manual_seed(M * K + N)
    wide = torch.randn(M, K + 8, generator=g)
    x = wide[:, :K].to(dtype).to(DEVICE)                  # a row stride wider than the row
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    y = sg.skinny_linear_kernel(x.reshape(1, M, K), w, b, gelu)
    assert y.shape == (1, M, N) and y.dtype == dtype
    want = _want(x, w, b, gelu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(y[0].double(), want, **tol)


def test_fp32_products_are_tf32_only_where_torch_allows_it():
    """fp32 operands get exact products (the kernel test's 1e-5 above, which TF32 misses by 100x on the GPU) unless
    ``torch.backends.cuda.matmul.allow_tf32`` is on; bf16 keeps Triton's default."""
    matmul = torch.backends.cuda.matmul    # (its flags are properties of torch's C side: set and put back by hand)
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert sg._precision(torch.float32) == "ieee" and sg._precision(torch.bfloat16) == "tf32"
        matmul.allow_tf32 = True
        assert sg._precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = before


def test_kernel_rejects_a_mismatched_weight():
    with pytest.raises(ValueError, match="features"):
        sg.skinny_linear_kernel(torch.randn(2, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE))


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_blocks_through_the_kernel_equal_the_linears(name, monkeypatch):
    """Every inference pass with ``SKINNY_GEMM_MAX_ROWS`` above its rows (qkv, proj, fc1 with the fused GELU, fc2
    through the kernel) against the same model with it off, bf16 (within its rounding); passes of more rows, and fp32
    models (whose tl.dot would be TF32 on the GPU), keep the linears."""
    monkeypatch.setattr(blocks, "_SKINNY_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(0)
    model = build_model(model_config(name)).to(DEVICE).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.02)
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, blocks.FFN):
            m.fused_gelu = ON_GPU   # (the fused GELU epilogue is CUDA's; on the CPU the exact GELU path)
    labels = torch.tensor([1, 2], device=DEVICE)
    cond = model.precompute_condition(model.class_cond(labels))
    x = torch.randn(2, 9, model.config.embed_dim, device=DEVICE, dtype=torch.bfloat16)
    methods = ["next_scale_logits"] + (["masked_logits"] if hasattr(model, "masked_logits") else [])
    calls = []
    real = sg.skinny_linear_kernel

    def spy(*a):   # (the interpreter runs a bf16 call as an fp32 one of its own: only the bf16 calls count)
        if a[0].dtype != torch.float32:
            calls.append(a[0].shape)
        return real(*a)
    monkeypatch.setattr(sg, "skinny_linear_kernel", spy)
    with torch.no_grad():
        want = [getattr(model, m)(x, cond) for m in methods]
        assert not calls
        monkeypatch.setattr(blocks, "SKINNY_GEMM_MAX_ROWS", 18)
        got = [getattr(model, m)(x, cond) for m in methods]
        assert len(calls) == 4 * model.config.depth * len(methods)   # qkv, proj, fc1 and fc2 of every block
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
        calls.clear()
        model.float()
        [getattr(model, m)(x.float(), cond.float()) for m in methods]   # fp32: the linears
        assert not calls
        model.to(torch.bfloat16)
        calls.clear()
        monkeypatch.setattr(blocks, "SKINNY_GEMM_WIDE_ONLY", True)   # qkv and fc1 only
        [getattr(model, m)(x, cond) for m in methods]
        assert len(calls) == 2 * model.config.depth * len(methods)
        monkeypatch.setattr(blocks, "SKINNY_GEMM_WIDE_ONLY", False)
        calls.clear()
        monkeypatch.setattr(blocks, "SKINNY_GEMM_MAX_ROWS", 17)   # 2 x 9 = 18 rows: above it
        [getattr(model, m)(x, cond) for m in methods]
        assert not calls


def test_op_traces_under_torch_compile():
    """The op through torch.compile's tracing (aot_eager), and torch.library.opcheck of it."""
    x, w, b = torch.randn(3, 4, 32, device=DEVICE), torch.randn(16, 32, device=DEVICE), torch.randn(16, device=DEVICE)
    torch.library.opcheck(torch.ops.hmar.skinny_linear.default, (x, w, b, True))
    fn = torch.compile(lambda x: torch.ops.hmar.skinny_linear(x, w, b, True) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), torch.ops.hmar.skinny_linear(x, w, b, True) * 2)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("C", [1024, 1920])
def test_kernel_at_the_goal_shapes_on_the_gpu(C):
    """bf16 at the four linears' shapes of a small pass: within bf16 rounding of F.linear (and the GELU epilogue of
    torch._addmm_activation)."""
    torch.manual_seed(0)
    for M in (32, 288, 1152):
        x = torch.randn(M, C, device="cuda").bfloat16()
        for K, N in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):
            xx = x if K == C else torch.randn(M, K, device="cuda").bfloat16()
            w = (torch.randn(N, K, device="cuda") / K ** 0.5).bfloat16()
            b = torch.randn(N, device="cuda").bfloat16()
            torch.testing.assert_close(sg.skinny_linear_kernel(xx, w, b), F.linear(xx, w, b), rtol=0.02, atol=0.02)
        got = sg.skinny_linear_kernel(x, w[:, :C] if w.shape[1] != C else w, b, True)
        want = torch._addmm_activation(b, x, (w[:, :C] if w.shape[1] != C else w).t(), use_gelu=True)
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
