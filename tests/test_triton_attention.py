"""Correctness of the fused Triton block-sparse attention (``hmar.attention.triton_kernel``).

Every kernel test compares the forward output and the three gradients (dq, dk, dv) of the
``"triton"`` backend with the ``"reference"`` backend (SDPA with the boolean block mask) run in
fp32 on the same half-precision inputs.

Where it runs:

* With CUDA the kernels run on the GPU as usual, and extra GPU-only tests use the real 256px and
  512px schedules, the automatic backend choice and the autotuner.
* Without CUDA the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set before
  the kernel module is imported (it is re-imported if an earlier test imported it without the
  interpreter). Sizes stay small (N <= ~100, 16x16 tiles) so the file takes well under two minutes
  on two cores. The interpreter multiplies bf16 ``tl.dot`` operands as raw bit patterns (Triton
  3.8), so under the interpreter only, bf16 dot operands are widened to fp32 inside the kernel
  (exactly representable, so the same products); P and dS are still rounded to bf16 first, as on
  the GPU. fp16 runs the GPU code path unchanged.
* Without Triton the whole module is skipped.

The host-side work-list tests need neither Triton nor a GPU.
"""
from __future__ import annotations

import importlib
import os
import random
from dataclasses import replace

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # before the kernels are decorated; it stays set, since Triton reads it again at launch
    os.environ["TRITON_INTERPRET"] = "1"

from hmar.attention import attention  # noqa: E402
import hmar.attention.triton_kernel as tk  # noqa: E402

if not ON_GPU and tk._HAS_TRITON and not tk._INTERPRETED:
    tk = importlib.reload(tk)  # imported earlier without the interpreter: decorate again

DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(not tk._HAS_TRITON, reason="triton is not installed")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
PATTERNS = ("block_diagonal", "block_causal")


@pytest.fixture(autouse=True)
def _default_tiles(monkeypatch):
    # the default tile configuration, so the GPU run does not compile and time every candidate
    # for every case; test_gpu_autotuned_configs turns the tuner back on
    monkeypatch.setenv("HMAR_TRITON_AUTOTUNE", "0")


# ---------------------------------------------------------------------------------------------
# Host-side work lists (pure Python)
# ---------------------------------------------------------------------------------------------
def _check_worklist(rows, lo, hi, n, step, kinds=None):
    """Tiles partition [0, n) on the outer axis; phases cover every visible inner position; the
    unmasked phase is visible to every outer position of its tile; masked phases are tile-aligned."""
    covered = [0] * n
    for kind, s, e, p0, p1, p2, p3, _ in rows:
        if kinds is not None:
            assert kind in kinds
        assert 0 <= s < e <= n
        assert 0 <= p0 <= p1 <= p2 <= p3 <= n
        assert (p1 - p0) % step == 0 and (p2 - p1) % step == 0
        for i in range(s, e):
            covered[i] += 1
            assert p0 <= lo[i] and hi[i] <= p3, (i, lo[i], hi[i], p0, p3)
            assert lo[i] <= p1 and p2 <= hi[i] or p1 == p2
    assert covered == [1] * n


def _schedules():
    rng = random.Random(0)
    out = [(1,), (1, 4, 9, 16), (1, 2, 3), (37,), (5, 11, 7, 19), (3, 0, 5),
           tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
           tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
           tuple(x * x for x in (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))]
    out += [tuple(rng.randint(1, 300) for _ in range(rng.randint(1, 8))) for _ in range(20)]
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_worklists_cover_the_pattern(pattern):
    for lengths in _schedules():
        n = sum(lengths)
        row_lo, row_hi, col_lo, col_hi = tk._bounds_lists(lengths, pattern)
        for bm, bn in ((16, 16), (32, 16), (128, 64), (64, 128)):
            rows = tk.build_fwd_worklist(lengths, pattern, bm, bn)
            assert all(r[2] - r[1] <= bm for r in rows)
            _check_worklist(rows, row_lo, row_hi, n, bn)
        cfg = tk.BwdConfig(32, 128, 128, 32)
        rows = tk.build_bwd_worklist(lengths, pattern, cfg)
        _check_worklist([r for r in rows if r[0] == tk._KIND_DKDV], col_lo, col_hi, n, cfg.block_m1)
        _check_worklist([r for r in rows if r[0] == tk._KIND_DQ], row_lo, row_hi, n, cfg.block_n2)


def test_worklist_packs_small_scales_and_skips_unseen_tiles():
    lengths = tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # N = 680
    rows = tk.build_fwd_worklist(lengths, "block_diagonal", 128, 64)
    # 1+4+9+16+25+36 = 91 rows share one tile; nothing of another scale is visited by a large block
    assert any(r[1] == 0 and r[2] == 91 for r in rows)
    visited = sum(r[6] - r[3] for r in rows)
    assert visited < 0.5 * len(rows) * 680
    # the largest tiles of the largest block need no mask at all
    big = [r for r in rows if r[1] >= 680 - 256]
    assert all(r[5] - r[4] == 256 for r in big)


def test_supports():
    q = torch.zeros(1, 2, 30, 64, dtype=torch.float16)
    if tk._HAS_TRITON and tk._INTERPRETED:
        assert tk.supports(q, (1, 4, 9, 16), "block_diagonal")
    assert not tk.supports(q, (1, 4, 9, 16), "dense")
    assert not tk.supports(q.float(), (1, 4, 9, 16), "block_causal")
    assert not tk.supports(torch.zeros(1, 2, 30, 32, dtype=torch.float16), (1, 4, 9, 16), "block_causal")


# ---------------------------------------------------------------------------------------------
# Kernel against the reference
# ---------------------------------------------------------------------------------------------
def _inputs(B, H, N, D, dtype, seed, strided=False, mag=1.0):
    # mag multiplies q and k (not v): the logits grow as mag**2
    g = torch.Generator().manual_seed(seed)
    if strided:  # q, k, v as views of one packed [B, N, 3, H, D] projection, as in the model
        qkv = torch.randn(B, N, 3, H, D, generator=g)
        qkv[:, :, :2] *= mag
        qkv = qkv.to(dtype).to(DEVICE).requires_grad_()
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        if strided == "mixed":  # k with another layout than q and v (each tensor has its own strides)
            k = k.contiguous()
        return [x.detach().requires_grad_() for x in (q, k, v)]
    return [(torch.randn(B, H, N, D, generator=g) * m).to(dtype).to(DEVICE).requires_grad_()
            for m in (mag, mag, 1.0)]


def _run_and_compare(lengths, pattern, B, H, D, dtype, seed=0, strided=False, scale=None, mag=1.0):
    N = sum(lengths)
    scale = D ** -0.5 * 1.5 if scale is None else scale
    q, k, v = _inputs(B, H, N, D, dtype, seed, strided, mag)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, H, N, D, generator=g).to(dtype).to(DEVICE)

    out = attention(q, k, v, lengths=lengths, pattern=pattern, scale=scale, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)

    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention(qf, kf, vf, lengths=lengths, pattern=pattern, scale=scale, backend="reference")
    rq, rk, rv = torch.autograd.grad(ref, (qf, kf, vf), do.float())

    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for name, a, b in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert a.shape == b.shape and a.dtype == dtype, name
        a = a.float()
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a - b).abs().max().item()
        mag = max(1.0, b.abs().max().item())
        assert err <= tol * mag, f"{name}: max |err| {err:.3e} > {tol} * {mag:.2f} ({lengths}, {pattern}, {dtype})"


# (lengths, B, H): lengths chosen to hit one block, packed small scales, ragged tails that are
# not multiples of the 16-row tiles, a scale larger than several tiles, and a zero-length scale.
CASES = [
    ((1, 4, 9, 16), 1, 1),
    ((1, 2, 3), 2, 1),
    ((1, 4, 9, 16, 25, 36), 2, 2),
    ((37,), 1, 3),
    ((5, 11, 7, 19, 40), 1, 1),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("lengths,B,H", CASES, ids=["1-4-9-16", "1-2-3", "6scales", "single", "ragged"])
def test_matches_reference(lengths, B, H, pattern, dtype):
    _run_and_compare(lengths, pattern, B, H, 64, dtype)


@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_head_dim_128(pattern):
    _run_and_compare((1, 4, 9, 16, 25), pattern, 1, 2, 128, torch.float16)


@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_strided_inputs_and_zero_length_scale(pattern):
    _run_and_compare((3, 0, 20, 9), pattern, 2, 2, 64, torch.float16, strided=True)


@needs_triton
def test_mixed_layouts_and_noncontiguous_grad():
    lengths, B, H, D = (1, 4, 9, 16), 2, 2, 64
    _run_and_compare(lengths, "block_causal", B, H, D, torch.float16, strided="mixed")
    # an expanded (stride-0) upstream gradient, as from out.sum().backward()
    q, k, v = _inputs(B, H, sum(lengths), D, torch.float16, 5)
    attention(q, k, v, lengths=lengths, pattern="block_diagonal", scale=0.2, backend="triton").sum().backward()
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    attention(qf, kf, vf, lengths=lengths, pattern="block_diagonal", scale=0.2, backend="reference").sum().backward()
    for a, b in ((q, qf), (k, kf), (v, vf)):
        assert (a.grad.float() - b.grad).abs().max().item() <= 1e-2 * max(1.0, b.grad.abs().max().item())


@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_model_layouts_reach_the_kernels_uncopied(pattern, monkeypatch):
    # as in the model: q normalised ([B, N, H, D] storage), k in a third layout, v a view of the packed
    # qkv projection, dO the transpose of the gradient of out.transpose(1, 2).reshape(B, N, H * D)
    lengths, B, H, D = (1, 4, 9, 16), 2, 3, 64
    N = sum(lengths)
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(torch.float16).to(DEVICE)
    q = torch.nn.functional.normalize(qkv[:, :, 0].float(), dim=-1).half().transpose(1, 2).requires_grad_()
    k = qkv[:, :, 1].transpose(1, 2).contiguous().requires_grad_()
    v = qkv[:, :, 2].transpose(1, 2).detach().requires_grad_()
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    w = torch.randn(B, N, H * D, generator=g).to(torch.float16).to(DEVICE)
    launched = {}
    for name in ("_launch_fwd", "_launch_bwd", "_launch_delta"):
        def spy(*args, _name=name, _fn=getattr(tk, name)):
            launched[_name] = [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]
            return _fn(*args)
        monkeypatch.setattr(tk, name, spy)

    out = attention(q, k, v, lengths=lengths, pattern=pattern, scale=0.2, backend="triton")
    y = out.transpose(1, 2).reshape(B, N, H * D)
    assert y.data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()  # a view, no copy
    (y.float() * w.float()).sum().backward()
    ptrs = [t.data_ptr() for t in (q, k, v)]
    assert launched["_launch_fwd"][:4] == ptrs + [out.data_ptr()]
    assert launched["_launch_bwd"][:3] == ptrs
    assert launched["_launch_delta"][0] == out.data_ptr()

    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention(qf, kf, vf, lengths=lengths, pattern=pattern, scale=0.2, backend="reference")
    (ref.transpose(1, 2).reshape(B, N, H * D) * w.float()).sum().backward()
    for name, a, b in (("out", out, ref), ("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad), ("dv", v.grad, vf.grad)):
        err = (a.float() - b).abs().max().item()
        assert err <= 1e-2 * max(1.0, b.abs().max().item()), f"{name}: max |err| {err:.3e}"


@needs_triton
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_compiled_calls_equal_eager(qk_norm):
    # under torch.compile the kernels run behind the custom ops hmar::block_sparse_attn_fwd/bwd, whose
    # fake implementations must give the layouts the real ones return ([B, N, H, D]-stored output); with qk_norm
    # the ops also carry the row norms and the head scale's gradient
    B, H, D, lengths = 2, 2, 64, (1, 4, 9, 16)
    N = sum(lengths)
    g = torch.Generator().manual_seed(2)
    qkv0 = torch.randn(B, N, 3 * H * D, generator=g).to(DEVICE)
    w = torch.randn(H * D, H * D, generator=g).to(DEVICE)
    s0 = torch.rand(1, H, 1, 1, generator=g).to(DEVICE) + 1

    def loss(qkv, s):
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        if not qk_norm:
            q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        o = tk.triton_attention(q.half(), k.half(), v.half(), lengths, "block_causal", scale=2.0,
                                qk_norm=s if qk_norm else None)
        return (o.transpose(1, 2).reshape(B, N, H * D).float() @ w).square().mean()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        qkv, s = qkv0.clone().requires_grad_(), s0.clone().requires_grad_()
        value = fn(qkv, s)
        value.backward()
        results.append((value.detach(), qkv.grad, s.grad if qk_norm else torch.zeros(())))
    torch._dynamo.reset()
    assert (results[0][2] != 0).all() or not qk_norm
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused_qk_norm", "ops"])
def test_a_block_compiled_with_dynamic_shapes_is_one_graph(fused):
    """What ``hmar.accel.compile_blocks`` does for sampling: an AdaLN block compiled with dynamic shapes, its pass's
    token count handed in as a Python int (``lengths``, a symbol to dynamo), traces as one graph with no break
    (fullgraph) and no recompile across batch sizes and token counts, and computes what the eager block does. (A
    ``min(lengths, default=0)`` in the kernel's checks once broke every block into 7 frames, each attention call
    running the eager autograd path between them.)"""
    from torch._dynamo.testing import CompileCounter

    from hmar.model.blocks import AdaLNBlock
    torch.manual_seed(0)
    block = AdaLNBlock(128, 2).eval().to(device=DEVICE, dtype=torch.float16)
    block.attn.fused_qk_norm = fused
    counter = CompileCounter()
    compiled = torch.compile(block, dynamic=True, fullgraph=True, backend=counter)
    try:
        with torch.no_grad():
            for B, n in ((2, 16), (4, 9), (2, 4), (4, 16)):
                x = torch.randn(B, n, 128, device=DEVICE, dtype=torch.float16)
                mod = torch.randn(B, 6, 128, device=DEVICE, dtype=torch.float16) * 0.1
                want = block(x, mod, (n,), "dense")
                got = compiled(x, mod, (n,), "dense")
                torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_other_tile_shapes(pattern):
    # non-square tiles: the forward and the two backward passes each see different tilings
    fwd = tk.FwdConfig(32, 16, 4 if ON_GPU else 1, 2 if ON_GPU else 1)
    bwd = tk.BwdConfig(16, 32, 32, 16, 4 if ON_GPU else 1, 2 if ON_GPU else 1)
    with tk.use_config(fwd, bwd):
        _run_and_compare((1, 4, 9, 16, 25, 36), pattern, 1, 2, 64, torch.float16, seed=3)


_FIB = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)  # N = 231: many key tiles per query tile, ragged everywhere
# (lengths, pattern, B, H, D, dtype, extra): schedules other than the model's, unscaled softmax, the
# packed-qkv layout, large logits (max |logit| about 240-300 in fp16, about 100 in bf16: online-softmax
# rescaling across many tiles) and the GPU's default tiles.
MORE_CASES = {
    "single-token": ((1,), "block_diagonal", 1, 1, 64, torch.bfloat16, {}),
    "1-2-B3H3-d128": ((1, 2), "block_causal", 3, 3, 128, torch.float16, {}),
    "1-2-3-5-unscaled": ((1, 2, 3, 5), "block_causal", 3, 3, 64, torch.float16, {"scale": 1.0}),
    "2-3-7-B3-d128": ((2, 3, 7), "block_diagonal", 3, 1, 128, torch.bfloat16, {}),
    "7scales-qkv": ((1, 2, 3, 4, 5, 6, 8), "block_causal", 1, 3, 64, torch.bfloat16, {"strided": True}),
    "ragged-33": ((5, 33, 18), "block_diagonal", 3, 1, 64, torch.float16, {}),
    "fib-diag": (_FIB, "block_diagonal", 1, 1, 64, torch.bfloat16, {}),
    "fib-causal": (_FIB, "block_causal", 1, 1, 64, torch.bfloat16, {}),
    "fib-causal-gpu-tiles": (_FIB, "block_causal", 1, 2, 64, torch.float16, {"tiles": "gpu"}),
    "big-logits-diag": ((2, 3, 7, 20), "block_diagonal", 3, 1, 128, torch.float16, {"strided": True, "mag": 7.0}),
    "big-logits-causal": ((2, 3, 7, 20), "block_causal", 3, 1, 128, torch.float16, {"strided": True, "mag": 7.0}),
    "big-logits-bf16": ((1, 2, 3, 5, 17), "block_causal", 1, 3, 64, torch.bfloat16, {"mag": 4.0}),
}


@needs_triton
# the interpreter evaluates exp2 of masked-out large logits before tl.where discards them (inf, never used)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("case", list(MORE_CASES))
def test_more_schedules_layouts_and_magnitudes(case):
    lengths, pattern, B, H, D, dtype, extra = MORE_CASES[case]
    extra = dict(extra)
    if extra.pop("tiles", None) == "gpu":  # the defaults for head dim 64 on the GPU (128-row tiles)
        w, st = (4, 3) if ON_GPU else (1, 1)
        with tk.use_config(tk.FwdConfig(128, 64, w, st), tk.BwdConfig(32, 128, 128, 32, w, st)):
            _run_and_compare(lengths, pattern, B, H, D, dtype, seed=11, **extra)
    else:
        _run_and_compare(lengths, pattern, B, H, D, dtype, seed=11, **extra)


# ---------------------------------------------------------------------------------------------
# The L2-normalised attention (qk_norm) inside the kernels
# ---------------------------------------------------------------------------------------------
def _qk_norm_case(lengths, pattern, B, H, D, dtype, seed=0, strided=False, zero_rows=False):
    """Fused qk_norm attention against the fp32 reference of F.normalize(q) * s, F.normalize(k): out and the
    gradients of q, k, v and the head scale s."""
    N = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(B, H, N, D, dtype, seed, strided)
    with torch.no_grad():   # rows of very different norms (the kernels must not assume normalised input)
        q.mul_((torch.rand(B, H, N, 1, generator=g) * 4 + 0.1).to(dtype).to(DEVICE))
        k.mul_((torch.rand(B, H, N, 1, generator=g) * 4 + 0.1).to(dtype).to(DEVICE))
        if zero_rows:       # below F.normalize's eps: divided by eps, no projection in the gradient
            q[0, -1, 1] = 0
            k[-1, 0, N - 2] = 0
    s = (torch.rand(1, H, 1, 1, generator=g) * 8 + 1).to(DEVICE).requires_grad_()
    do = torch.randn(B, H, N, D, generator=g).to(dtype).to(DEVICE)
    out = tk.triton_attention(q, k, v, lengths, pattern, scale=0.5, qk_norm=s)
    grads = torch.autograd.grad(out, (q, k, v, s), do)

    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    sf = s.detach().clone().requires_grad_()
    ref = attention(*tk_free_l2(qf, kf, sf), vf, lengths=lengths, pattern=pattern, scale=0.5, backend="reference")
    refs = torch.autograd.grad(ref, (qf, kf, vf, sf), do.float())
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for name, a, b in zip(("out", "dq", "dk", "dv", "ds"), (out, *grads), (ref, *refs)):
        assert a.shape == b.shape, name
        a = a.float()
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a - b).abs().max().item()
        mag = max(1.0, b.abs().max().item())
        assert err <= tol * mag, f"{name}: max |err| {err:.3e} > {tol} * {mag:.2f} ({lengths}, {pattern}, {dtype})"


def tk_free_l2(q, k, s):
    from hmar.attention import l2_normalize_qk
    return l2_normalize_qk(q, k, s)


QK_NORM_CASES = {
    "6scales-fp16": ((1, 4, 9, 16, 25, 36), "block_diagonal", 2, 2, 64, torch.float16, {}),
    "6scales-bf16-causal": ((1, 4, 9, 16, 25, 36), "block_causal", 2, 2, 64, torch.bfloat16, {}),
    "ragged-qkv-causal": ((5, 11, 7, 19, 40), "block_causal", 1, 3, 64, torch.float16, {"strided": True}),
    "d128-diag": ((1, 2, 3, 5, 17), "block_diagonal", 1, 2, 128, torch.bfloat16, {}),
    "zero-rows": ((3, 7, 12), "block_causal", 2, 2, 64, torch.bfloat16, {"zero_rows": True}),
}


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", list(QK_NORM_CASES))
def test_qk_norm_inside_the_kernels_matches_the_reference(case):
    lengths, pattern, B, H, D, dtype, extra = QK_NORM_CASES[case]
    _qk_norm_case(lengths, pattern, B, H, D, dtype, seed=4, **extra)


# ---------------------------------------------------------------------------------------------
# The packed form: one [B, N, 3, H, D] projection in, its gradient in that layout out
# ---------------------------------------------------------------------------------------------
PACKED_CASES = {
    "6scales-fp16-diag-norm": ((1, 4, 9, 16, 25, 36), "block_diagonal", 2, 2, 64, torch.float16, True),
    "ragged-bf16-causal-norm": ((5, 11, 0, 7, 19), "block_causal", 1, 3, 64, torch.bfloat16, True),
    "d128-bf16-diag-plain": ((1, 2, 3, 5, 17), "block_diagonal", 2, 1, 128, torch.bfloat16, False),
    "fp16-causal-plain": ((1, 4, 9, 16), "block_causal", 2, 2, 64, torch.float16, False),
}


def _packed_inputs(lengths, B, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    qkv = (torch.randn(B, N, 3, H, D, generator=g) * (torch.rand(B, N, 3, H, 1, generator=g) * 4 + 0.1))
    s = torch.rand(1, H, 1, 1, generator=g) * 8 + 1
    do = torch.randn(B, H, N, D, generator=g)
    return qkv.to(dtype).to(DEVICE), s.to(DEVICE), do.to(dtype).to(DEVICE)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_attention_equals_the_unpacked_kernels(case, monkeypatch):
    # the same kernels on the same values: out, d(qkv) and d(s) bit for bit what triton_attention gives for the q, k,
    # v views (whose gradients autograd stacks into the projection's layout), and the backward kernel writes
    # straight into the returned gradient (no buffer of its own, no copy)
    lengths, pattern, B, H, D, dtype, norm = PACKED_CASES[case]
    qkv0, s0, do = _packed_inputs(lengths, B, H, D, dtype, 3)
    written = []
    launch = tk._launch_bwd
    monkeypatch.setattr(tk, "_launch_bwd", lambda *a, **kw: (written.append(a[4]), launch(*a, **kw))[1])
    runs = []
    for packed in (False, True):
        qkv, s = qkv0.clone().requires_grad_(), s0.clone().requires_grad_()
        if packed:
            out = tk.packed_triton_attention(qkv, lengths, pattern, scale=0.5, qk_norm=s if norm else None)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            out = tk.triton_attention(q, k, v, lengths, pattern, scale=0.5, qk_norm=s if norm else None)
        grads = torch.autograd.grad(out, (qkv, s) if norm else (qkv,), do)
        runs.append((out, *grads))
    for name, a, b in zip(("out", "dqkv", "ds"), *runs):
        assert torch.equal(a, b), name
    dqkv = runs[1][1]
    assert dqkv.shape == qkv0.shape and dqkv.is_contiguous()
    g = written[-1]   # the packed run's [3, B, H, N, D] view: dq, dk, dv inside d(qkv)
    assert g.data_ptr() == dqkv.data_ptr() and torch.equal(g, dqkv.permute(2, 0, 3, 1, 4))
    assert written[0].is_contiguous() and written[0].data_ptr() != dqkv.data_ptr()   # (the unpacked run's buffer)
    if norm:   # against the fp32 reference too (the bitwise check alone would pass two equal wrong answers)
        qf, sf = qkv0.float().requires_grad_(), s0.clone().requires_grad_()
        q, k, v = qf.permute(2, 0, 3, 1, 4)
        ref = attention(*tk_free_l2(q, k, sf), v, lengths=lengths, pattern=pattern, scale=0.5, backend="reference")
        for name, a, b in zip(("out", "dqkv", "ds"), runs[1], (ref, *torch.autograd.grad(ref, (qf, sf), do.float()))):
            err, mag = (a.float() - b).abs().max().item(), max(1.0, b.abs().max().item())
            assert err <= 3e-2 * mag, f"{name}: max |err| {err:.3e} ({case})"


# ---------------------------------------------------------------------------------------------
# dQ by atomics (DQ_ATOMIC): the dK/dV tiles add their share of dq, no dQ tiles
# ---------------------------------------------------------------------------------------------
class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's grid, then launches it."""
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _atomic_bwd():
    return tk.BwdConfig(16, 32, 32, 16, 4, 2, dq_atomic=True) if ON_GPU else replace(tk._INTERP_BWD, dq_atomic=True)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dq_atomic_worklist_has_only_dkdv_tiles(pattern):
    for lengths in _schedules():
        cfg = tk.BwdConfig(32, 128, 128, 32, dq_atomic=True)
        rows = tk.build_bwd_worklist(lengths, pattern, cfg)
        _, _, col_lo, col_hi = tk._bounds_lists(lengths, pattern)
        _check_worklist(rows, col_lo, col_hi, sum(lengths), cfg.block_m1, kinds={tk._KIND_DKDV})


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", ["6scales-fp16-diag-norm", "ragged-bf16-causal-norm", "d128-bf16-diag-plain",
                                  "fp16-causal-plain"])
def test_dq_atomic_equals_the_dq_tiles(case, monkeypatch):
    # the packed form (the training path) with dq summed by atomics: out, dk, dv bit for bit the dQ tiles' (the
    # same products in the same order), dq and d(s) within rounding of theirs (other summation orders), the
    # finishing kernel launched by the atomic run alone, and both as close to fp32 (up to 2e-3)
    lengths, pattern, B, H, D, dtype, norm = PACKED_CASES[case]
    qkv0, s0, do = _packed_inputs(lengths, B, H, D, dtype, 5)
    finish = _LaunchSpy(tk._dq_finish_kernel)
    monkeypatch.setattr(tk, "_dq_finish_kernel", finish)
    runs = []
    for bwd in (tk._INTERP_BWD if not ON_GPU else tk.BwdConfig(16, 32, 32, 16, 4, 2), _atomic_bwd()):
        qkv, s = qkv0.clone().requires_grad_(), s0.clone().requires_grad_()
        with tk.use_config(None, bwd):
            out = tk.packed_triton_attention(qkv, lengths, pattern, scale=0.5, qk_norm=s if norm else None)
            grads = torch.autograd.grad(out, (qkv, s) if norm else (qkv,), do)
        runs.append((out, *grads))
    assert len(finish.grids) == 1   # the atomic run alone
    (out0, dqkv0, *ds0), (out1, dqkv1, *ds1) = runs
    assert torch.equal(out0, out1) and torch.equal(dqkv0[:, :, 1:], dqkv1[:, :, 1:])   # out, dk, dv
    rel = lambda a, b: (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())  # noqa: E731
    assert rel(dqkv1[:, :, 0], dqkv0[:, :, 0]) <= (2e-3 if dtype == torch.float16 else 1e-2)
    if norm:
        assert rel(ds1[0], ds0[0]) <= 1e-4
    qf, sf = qkv0.float().requires_grad_(), s0.clone().requires_grad_()
    q, k, v = qf.permute(2, 0, 3, 1, 4)
    if norm:
        ref = attention(*tk_free_l2(q, k, sf), v, lengths=lengths, pattern=pattern, scale=0.5, backend="reference")
    else:
        ref = attention(q, k, v, lengths=lengths, pattern=pattern, scale=0.5, backend="reference")
    want = (ref, *torch.autograd.grad(ref, (qf, sf) if norm else (qf,), do.float()))
    for name, a, t, b in zip(("out", "dqkv", "ds"), runs[1], runs[0], want):   # no farther than the tiles' + 2e-3
        assert rel(a, b) <= max(3e-2, rel(t, b) + 2e-3), f"{name} ({case}): {rel(a, b):.2e}, tiles {rel(t, b):.2e}"


@needs_triton
def test_dq_atomic_switch(monkeypatch):
    # HMAR_TRITON_DQ_ATOMIC picks the plan (a plan of its own per mode); deterministic algorithms always get the
    # dQ tiles; an unknown value is a clear error
    lengths, B, H, D = (1, 4, 9), 1, 2, 64
    q = torch.empty(B, H, sum(lengths), D, dtype=torch.float16, device=DEVICE)

    def plan_cfg():
        return tk._bwd_plan(q, q, q, q, None, None, lengths, "block_diagonal", 0.125)[0]
    monkeypatch.setattr(tk, "DQ_ATOMIC", "on")
    assert plan_cfg().dq_atomic and tk._bwd_key(q, lengths, "block_diagonal")[-1] == "on"
    _run_and_compare(lengths, "block_causal", B, H, D, torch.float16, seed=2)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not plan_cfg().dq_atomic
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    monkeypatch.setattr(tk, "DQ_ATOMIC", "off")
    assert not plan_cfg().dq_atomic
    monkeypatch.setattr(tk, "DQ_ATOMIC", "always")
    with pytest.raises(ValueError, match="HMAR_TRITON_DQ_ATOMIC.*'always'.*off, on, tune"):
        plan_cfg()


@needs_triton
def test_packed_attention_compiled_equals_eager():
    # under torch.compile the packed form runs behind hmar::packed_attn_fwd / _bwd, whose fake implementations give
    # the real layouts; without a gradient it takes the inference routes of the unpacked form
    lengths, B, H, D = (1, 4, 9, 16), 2, 2, 64
    N = sum(lengths)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(B, N, H * D, generator=g).to(DEVICE)
    w = (torch.randn(3 * H * D, H * D, generator=g) * 0.1).to(DEVICE)
    s0 = torch.rand(1, H, 1, 1, generator=g).to(DEVICE) + 1

    def loss(x, s):
        qkv = (x @ w.t()).half().view(B, N, 3, H, D)
        o = tk.packed_triton_attention(qkv, lengths, "block_causal", scale=2.0, qk_norm=s)
        return o.transpose(1, 2).reshape(B, N, H * D).float().square().mean()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        value = fn(x, s)
        value.backward()
        with torch.no_grad():
            results.append((value.detach(), x.grad, s.grad, fn(x0, s0)))
    torch._dynamo.reset()
    assert (results[0][2] != 0).all()
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(results[0][3], results[0][0], rtol=1e-3, atol=1e-5)   # no-grad route, same value


@needs_triton
def test_packed_attention_routes(monkeypatch):
    # hmar.attention.packed_attention: the packed backend only with the normalisation in the kernels and PACKED_QKV
    # on; else exactly attention() of the unpacked views; a wrong shape is a clear error
    import hmar.attention as A
    lengths, B, H, D = (1, 4, 9), 2, 2, 64
    qkv, s, _ = _packed_inputs(lengths, B, H, D, torch.float16, 8)
    s = s.half()
    calls = {"packed": 0, "fused": 0}
    for key, table in (("packed", A._PACKED_BACKENDS), ("fused", A._QK_NORM_BACKENDS)):
        fn = table["triton"]
        monkeypatch.setitem(table, "triton", lambda *a, _fn=fn, _key=key: (calls.__setitem__(_key, calls[_key] + 1),
                                                                            _fn(*a))[1])
    kw = dict(lengths=lengths, pattern="block_causal", scale=0.5, backend="triton", qk_norm=s)
    unfused = A.attention(*A.unpack_qkv(qkv), **kw, fuse_qk_norm=False)
    assert torch.equal(A.packed_attention(qkv, **kw, fuse_qk_norm=False), unfused) and calls == dict(packed=0, fused=0)
    fused = A.packed_attention(qkv, **kw, fuse_qk_norm=True)
    assert calls == dict(packed=1, fused=0) and (fused.float() - unfused.float()).abs().max().item() < 1e-2
    monkeypatch.setattr(A, "PACKED_QKV", False)
    assert torch.equal(A.packed_attention(qkv, **kw, fuse_qk_norm=True), fused) and calls == dict(packed=1, fused=1)
    monkeypatch.setattr(A, "PACKED_QKV", True)
    monkeypatch.setattr(A, "FUSED_QK_NORM", True)   # the switch, for calls that do not say
    A.packed_attention(qkv, **kw)
    assert calls == dict(packed=2, fused=1)
    ref = A.packed_attention(qkv, **dict(kw, backend="reference"))   # no packed form there: unpacked, ops
    assert calls == dict(packed=2, fused=1) and (ref.float() - unfused.float()).abs().max().item() < 1e-2
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, D\]"):
        A.packed_attention(qkv[:, :, :2], **kw)
    with pytest.raises(ValueError, match="sum to"):
        A.packed_attention(qkv, **dict(kw, lengths=(1, 4)))


@needs_triton
def test_training_with_the_normalisation_in_the_kernels(monkeypatch):
    # hmar train --qk-norm kernels (the default on CUDA): every attention layer hands its packed projection to the
    # kernels, once a step, and the step's loss is the ops step's
    import copy
    import hmar.attention as A
    from hmar import build_model, model_config
    from hmar.model.blocks import SelfAttention
    from hmar.presets import ModelConfig
    from hmar.tokenizer.quantizer import MultiScaleQuantizer
    from hmar.training.distributed import DistInfo
    from hmar.training.loop import prepare_training, train_step
    torch.manual_seed(0)
    d = model_config("hmar-tiny", num_heads=1, drop_path_rate=0.0, cond_drop_rate=0.0).to_dict()   # head dim 64
    d["kind"] = "nsp"
    m = build_model(ModelConfig.from_dict(d))
    cfg = m.config
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    calls = []
    packed = A._PACKED_BACKENDS["triton"]
    monkeypatch.setitem(A._PACKED_BACKENDS, "triton", lambda *a: (calls.append(1), packed(*a))[1])
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g).to(DEVICE)
    labels = torch.randint(0, cfg.num_classes, (2,), generator=g).to(DEVICE)
    losses = []
    for mode in ("ops", "kernels"):
        mm = copy.deepcopy(m)
        st = prepare_training(mm, quant, "next-scale", DistInfo(device=torch.device(DEVICE)), qk_norm=mode,
                              attention_backend="triton", precision="bf16")
        assert all(x.fused_qk_norm is (mode == "kernels") for x in mm.modules() if isinstance(x, SelfAttention))
        losses.append(float(train_step(st, idx, labels, None)["loss"]))
    assert len(calls) == cfg.depth and losses[1] == pytest.approx(losses[0], rel=1e-2)


@needs_triton
def test_qk_norm_switch_of_attention(monkeypatch):
    import hmar.attention as A
    B, H, N, D, lengths = 2, 2, 14, 64, (1, 4, 9)
    q, k, v = _inputs(B, H, N, D, torch.float16, 9)
    s = torch.full((1, H, 1, 1), 3.0, dtype=torch.float16, device=DEVICE)   # as in a half model
    # off (the default): exactly the normalisation ops, then the backend
    monkeypatch.setattr(A, "FUSED_QK_NORM", False)
    for backend in ("reference", "triton"):
        want = attention(*A.l2_normalize_qk(q, k, s), v, lengths=lengths, pattern="block_causal", backend=backend)
        got = attention(q, k, v, lengths=lengths, pattern="block_causal", backend=backend, qk_norm=s)
        assert torch.equal(got, want)
    # on: the kernels normalise (the dense pattern too, as one block-diagonal block), other backends unchanged
    monkeypatch.setattr(A, "FUSED_QK_NORM", True)
    calls = []
    fused = A._QK_NORM_BACKENDS["triton"]
    monkeypatch.setitem(A._QK_NORM_BACKENDS, "triton", lambda *a: (calls.append(a[3:5]), fused(*a))[1])
    for pattern, n_lengths in (("block_causal", lengths), ("dense", (N,))):
        got = attention(q, k, v, lengths=lengths if pattern != "dense" else (N,), pattern=pattern, backend="triton",
                        qk_norm=s)
        ref = attention(*A.l2_normalize_qk(q.float(), k.float(), s.float()), v.float(), lengths=n_lengths,
                        pattern=pattern, backend="reference")
        assert calls[-1] == (n_lengths, "block_causal" if pattern != "dense" else "block_diagonal")
        assert (got.float() - ref).abs().max().item() < 1e-2
    n = len(calls)
    want = attention(*A.l2_normalize_qk(q, k, s), v, lengths=lengths, pattern="block_causal", backend="reference")
    assert torch.equal(attention(q, k, v, lengths=lengths, pattern="block_causal", backend="reference", qk_norm=s),
                       want) and len(calls) == n
    # a call's fuse_qk_norm overrides the switch either way (SelfAttention.fused_qk_norm passes it)
    unfused = attention(*A.l2_normalize_qk(q, k, s), v, lengths=lengths, pattern="block_causal", backend="triton")
    assert torch.equal(attention(q, k, v, lengths=lengths, pattern="block_causal", backend="triton", qk_norm=s,
                                 fuse_qk_norm=False), unfused) and len(calls) == n
    monkeypatch.setattr(A, "FUSED_QK_NORM", False)
    got = attention(q, k, v, lengths=lengths, pattern="block_causal", backend="triton", qk_norm=s, fuse_qk_norm=True)
    assert len(calls) == n + 1 and (got.float() - unfused.float()).abs().max().item() < 1e-2
    packed = A._PACKED_BACKENDS["triton"]   # (the layer hands the kernels its packed projection)
    monkeypatch.setitem(A._PACKED_BACKENDS, "triton", lambda *a: (calls.append(a[1:3]), packed(*a))[1])
    from hmar.model.blocks import SelfAttention
    layer = SelfAttention(H * D, H).to(DEVICE).half()
    x = torch.randn(B, N, H * D, device=DEVICE).half()
    want = layer(x, lengths, "block_causal", backend="triton")
    layer.fused_qk_norm = True
    got = layer(x, lengths, "block_causal", backend="triton")
    assert len(calls) == n + 2 and (got.float() - want.float()).abs().max().item() < 1e-2


@needs_triton
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_qk_norm_in_the_model_equals_the_unfused_model(packed, monkeypatch):
    # a block stack with head dim 64 through the Triton backend in half precision, with and without FUSED_QK_NORM,
    # each against the same model in fp32 through the reference backend: the fused loss and gradients (head-scale
    # parameters included) are as close to the fp32 ones as the unfused are (on the H200 both differ from each other
    # by half-precision rounding that adds up through the stack, e.g. 7% of the start token's small gradient)
    import copy
    import hmar.attention as A
    from hmar import build_model, model_config
    torch.manual_seed(0)
    model = build_model(model_config("hmar-tiny", embed_dim=128, num_heads=2)).to(DEVICE)
    exact = copy.deepcopy(model)
    model.half()
    cfg = model.config
    labels = torch.tensor([1, 2], device=DEVICE)
    x = torch.randn(2, cfg.seq_len - 1, cfg.z_channels, device=DEVICE)

    def run(m, backend):
        m.zero_grad()
        loss = m(labels, x.to(next(m.parameters()).dtype), backend=backend).float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref = run(exact, "reference")
    runs, calls = [], []
    monkeypatch.setattr(A, "PACKED_QKV", packed)   # (packed: the layers' projection itself, A.packed_attention)
    table = A._PACKED_BACKENDS if packed else A._QK_NORM_BACKENDS
    fused_fn = table["triton"]
    monkeypatch.setitem(table, "triton", lambda *a: (calls.append(1), fused_fn(*a))[1])
    for fused in (False, True):
        monkeypatch.setattr(A, "FUSED_QK_NORM", fused)
        runs.append(run(model, "triton"))
    assert len(calls) == cfg.depth   # every block's attention went through the kernels' normalisation, once
    (la, ga), (lb, gb) = runs
    # the losses: each within half-precision rounding of fp32's, the fused no farther than twice the unfused (on an
    # H100 the fused loss was 2.9e-3 from fp32's, the same packed and unpacked)
    unfused, fused = (abs(x.item() - ref_loss.item()) for x in (la, lb))
    assert unfused <= 5e-3 * abs(ref_loss.item()) and fused <= max(2 * unfused, 2e-3 * abs(ref_loss.item())), \
        (la.item(), lb.item(), ref_loss.item())
    assert ga.keys() == gb.keys() == ref.keys() and any("scale_mul" in n for n in ga)
    for n in ga:
        scale = max(ref[n].abs().max().item(), 1e-3)
        unfused, fused = ((g[n] - ref[n]).abs().max().item() for g in (ga, gb))
        assert fused <= max(2 * unfused, 1e-2 * scale), (n, fused, unfused, scale)


@needs_triton
def test_bench_attention_columns_with_qk_norm(monkeypatch):
    # benchmarks/bench_attention.py --qk-norm --dq-atomic: the fused columns (dq by atomics and by tiles) and the
    # others time the same function (each its normalisation included), the switches are restored, and the row
    # prints every column and the speed-ups
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    ba = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ba)
    import hmar.attention as A
    seen = []
    monkeypatch.setattr(ba, "_bench", lambda fn: (seen.append(((A.FUSED_QK_NORM, tk.DQ_ATOMIC), fn())), 2.0)[1])
    lengths, B, H, D = (1, 4, 9), 1, 2, 64
    q, k, v = _inputs(B, H, sum(lengths), D, torch.float16, 3, strided=True)
    do = torch.ones(B, H, sum(lengths), D, dtype=torch.float16, device=DEVICE)
    s = torch.full((1, H, 1, 1), 4.0, dtype=torch.float16, device=DEVICE, requires_grad=True)
    names = ("triton+qknorm+dqa", "triton+qknorm") + ba.BACKENDS
    row = dict(pattern="block_diagonal", dtype="fp16", N=sum(lengths), B=B, H=H, D=D)
    for i, name in enumerate(names):
        row[name] = ba._time_backend(name, q, k, v, do, lengths, "block_diagonal", 0.125, s)
        assert row[name] == (2.0, 2.0, 2.0) and A.FUSED_QK_NORM is False and tk.DQ_ATOMIC == "off"
        want = (name.startswith("triton+qknorm"), "on" if name.endswith("+dqa") else "off")
        assert [f for f, _ in seen[3 * i:3 * i + 3]] == [want] * 3
    outs = [seen[3 * i][1] for i in range(len(names))]   # each backend's forward output
    for o in outs[1:]:
        assert (o.float() - outs[0].float()).abs().max().item() < 1e-2
    row["triton+qknorm+dqa"], row["per_scale"] = (1.0, 1.0, 1.0), (3.0, 3.0, 3.0)
    row["err"] = ba._check_error(q, k, v, do, lengths, "block_diagonal", 0.125, s, atomic=True)
    assert max(row["err"].values()) < 1e-2 and tk.DQ_ATOMIC == "off"
    line = ba._fmt(row, names)
    assert line.split("|")[-2].split() == ["2.00", "2.00", "3.00", "2.00", "-"]   # x tri+qkn, tri, psc, ref, off


# ---------------------------------------------------------------------------------------------
# Invalid input: a clear error, never a silent result
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("lengths", [(5, -2, 7), (12, -2)])
def test_negative_lengths_are_rejected(lengths):
    # they sum to N, so only an explicit check stops them; before it, attention(..., backend="triton")
    # built a work list that reads past the rows of a head: silently wrong output (5,-2,7) or NaN (12,-2)
    q = torch.zeros(1, 2, 10, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="non-negative"):
        attention(q, q, q, lengths=lengths, pattern="block_diagonal", backend="triton")
    with pytest.raises(ValueError, match="non-negative"):
        tk._backend(q, q, q, lengths, "block_causal", 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        tk.triton_attention(q, q, q, lengths)


@needs_triton
def test_unsupported_inputs_are_clear_errors(monkeypatch):
    q = torch.zeros(1, 2, 10, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        attention(q[..., :48], q[..., :48], q[..., :48], lengths=(3, 7), backend="triton")
    with pytest.raises(TypeError, match="fp16/bf16"):
        attention(q.float(), q.float(), q.float(), lengths=(3, 7), backend="triton")
    # CPU tensors outside the interpreter: an explicit error before any launch (Triton's own would be
    # "0 active drivers" or "cpu tensor?")
    monkeypatch.setattr(tk, "_INTERPRETED", False)
    c = q.cpu()
    with pytest.raises(ValueError, match="CUDA tensors required"):
        attention(c, c, c, lengths=(3, 7), backend="triton")


@needs_triton
def test_double_backward_raises():
    # the backward kernels have no derivative: a second-order term must raise, not vanish silently
    q, k, v = _inputs(1, 2, 10, 64, torch.float16, 0)
    out = attention(q, k, v, lengths=(3, 7), pattern="block_causal", scale=0.125, backend="triton")
    (dq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (dq.square().sum() + q.sum()).backward()


# ---------------------------------------------------------------------------------------------
# The inference kernel: one dense block, no gradient (every sampling pass)
# ---------------------------------------------------------------------------------------------
def _dense_case(N, B, H, D, dtype, qk_norm, seed=0, mag=3.0):
    """q, k, v as views of one packed projection (the model's layout), the head scales, and the reference: the
    model's ops (q, k normalised in fp32, times the scale, rounded to ``dtype``) then SDPA in fp32."""
    from hmar.attention import l2_normalize_qk
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3, H, D, generator=g) * mag).to(dtype).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    s = (torch.rand(1, H, 1, 1, generator=g) * 4 + 1).to(DEVICE)
    if qk_norm:
        qn, kn = (t.to(dtype).float() for t in l2_normalize_qk(q.float(), k.float(), s))
        ref = torch.nn.functional.scaled_dot_product_attention(qn, kn, v.float(), scale=1.0)
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.1)
    return q, k, v, (s if qk_norm else None), ref


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "plain"])
@pytest.mark.parametrize("N,B,H,D", [(1, 2, 3, 64), (9, 2, 2, 64), (16, 1, 2, 64), (23, 2, 1, 64), (48, 1, 2, 64),
                                     (37, 1, 2, 128)])
def test_inference_kernel_matches_reference(N, B, H, D, dtype, qk_norm, monkeypatch):
    # sizes below, at and past one 16-row tile, several whole key tiles, a ragged tail; the output stored as
    # [B, N, H, D] like the training forward's; and it is the inference kernel that ran
    q, k, v, s, ref = _dense_case(N, B, H, D, dtype, qk_norm)
    launched = []
    monkeypatch.setattr(tk, "_launch_dense", lambda *a, _f=tk._launch_dense: (launched.append(a[-1]), _f(*a))[1])
    monkeypatch.setattr(tk, "_launch_fwd", lambda *a: pytest.fail("the training forward ran"))
    with torch.no_grad():
        out = tk.triton_attention(q, k, v, (N,), scale=1.0 if qk_norm else 0.1, qk_norm=s)
    assert len(launched) == 1 and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    err = (out.float() - ref).abs().max().item()
    tol = (1e-2 if dtype == torch.float16 else 3e-2) * max(1.0, ref.abs().max().item())
    assert err <= tol, f"max |err| {err:.3e} > {tol:.3e}"
    if N == 1:   # one key: the output is v itself
        assert torch.equal(out, v)


@needs_triton
def test_inference_kernel_runs_only_where_no_gradient_is_needed(monkeypatch):
    # no grad mode, or inputs that need none: the inference kernel; inputs needing gradients, several blocks, or
    # the switch off: the training forward (its log-sum-exp kept for the backward)
    N, B, H, D = 20, 1, 2, 64
    q, k, v, s, ref = _dense_case(N, B, H, D, torch.float16, True)
    ran = []
    for name in ("_launch_dense", "_launch_fwd"):
        monkeypatch.setattr(tk, name, lambda *a, _n=name, _f=getattr(tk, name): (ran.append(_n), _f(*a))[1])

    def call(lengths=(N,), grad=False):
        ran.clear()
        qq, kk, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
        out = tk.triton_attention(qq, kk, vv, lengths, qk_norm=s)
        return ran[:], out

    assert call()[0] == ["_launch_dense"]
    kinds, out = call(grad=True)
    assert kinds == ["_launch_fwd"] and out.requires_grad
    with torch.no_grad():
        assert call(grad=True)[0] == ["_launch_dense"]
        assert call(lengths=(4, 16))[0] == ["_launch_fwd"]
        monkeypatch.setattr(tk, "DENSE_INFERENCE", False)
        kinds, slow = call()
        monkeypatch.setattr(tk, "DENSE_INFERENCE", True)
        assert kinds == ["_launch_fwd"]
        assert (call()[1].float() - slow.float()).abs().max().item() < 1e-2


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_sampling_pass_reads_the_biases_and_temperature_in_the_kernel(dtype, monkeypatch):
    # SelfAttention's fused pass without gradients: the projection without its bias, then the inference kernel with
    # the q / v biases and the log-temperature (clamped at ln 100: head 0 is above it); no cat of the biases and no
    # clamp / exp of the temperature among the ops, and the same layer output as the normalisation as ops
    from torch.utils._python_dispatch import TorchDispatchMode

    from hmar.model.blocks import SelfAttention

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = SelfAttention(128, 2).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        layer.q_bias.normal_()
        layer.v_bias.normal_()
        layer.scale_mul_1H11[0, 0] = 6.0
    x = torch.randn(2, 23, 128, device=DEVICE).to(dtype)
    launched = []
    monkeypatch.setattr(tk, "_launch_dense", lambda *a, _f=tk._launch_dense: (launched.append(a[7:]), _f(*a))[1])
    with torch.no_grad():
        layer.fused_qk_norm = False
        want = layer(x, (23,), "dense")
        layer.fused_qk_norm = True
        seen = set()
        with Ops():
            got = layer(x, (23,), "dense")
    assert len(launched) == 1 and all(t is not None for t in launched[0][:2]) and launched[0][2] == layer.max_scale_mul
    assert not seen & {"cat", "exp", "clamp", "clamp_max", "add"}, seen
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    seen = set()
    with Ops():                      # with gradients: the training path, biases concatenated as before
        layer(x, (23,), "dense")
    assert "cat" in seen and len(launched) == 1
    with pytest.raises(ValueError, match="q_bias must be a contiguous"):
        q = torch.zeros(1, 2, 4, 64, device=DEVICE, dtype=dtype)
        tk.dense_inference_attention(q, q, q, 1.0, layer.scale_mul_1H11, 4.6, layer.q_bias[:64])


@needs_triton
@needs_triton
def test_inference_kernel_splits_a_batch_over_the_grid_limit(monkeypatch):
    """More (batch, head) pairs than CUDA's grid axis takes: one launch per slice of the batch, the same output."""
    torch.manual_seed(0)
    B, H, N, D = 5, 2, 9, 64
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=torch.float16) for _ in range(3))
    ls = torch.full((H,), 1.5, device=DEVICE)
    whole = tk.dense_inference_attention(q, k, v, 1.0, ls, 4.6)
    spy = _LaunchSpy(tk._dense_kernel)
    monkeypatch.setattr(tk, "GRID_Y_MAX", 4)     # 2 images (4 pairs) per launch: slices of 2, 2 and 1
    monkeypatch.setattr(tk, "_dense_kernel", spy)
    split = tk.dense_inference_attention(q, k, v, 1.0, ls, 4.6)
    assert [g[1] for g in spy.grids] == [4, 4, 2]
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [None, "reference", "per_scale", "triton"])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("fuse", [False, True], ids=["ops", "fused"])
def test_half_inputs_with_an_fp32_qk_norm(backend, D, fuse):
    """fp16 q, k, v with an fp32 per-head scale and no autocast: every backend gives the fp16 result of the fp32
    reference, whether the normalisation runs as ops or in the kernels, and where the kernels decline (head dim 32)
    the call falls back instead of mixing dtypes; a scalar scale (broadcast, not one per head) runs as ops."""
    if backend == "triton" and (D != 64 or not tk._HAS_TRITON):
        pytest.skip("the Triton kernels take head dims 64 and 128")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 14, D, device=DEVICE, dtype=torch.float16) for _ in range(3))
    lengths, pattern = (1, 4, 9), "block_causal"
    for s in (torch.tensor([[[[3.0]], [[5.0]]]], device=DEVICE), torch.tensor(4.0, device=DEVICE)):
        ref = attention(q.float(), k.float(), v.float(), lengths=lengths, pattern=pattern, qk_norm=s,
                        backend="reference", fuse_qk_norm=False)
        out = attention(q, k, v, lengths=lengths, pattern=pattern, qk_norm=s, backend=backend, fuse_qk_norm=fuse)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_dense_candidates_fit_the_pass():
    one = tk.dense_candidates(1)
    assert one == [tk.FwdConfig(16, 16, 1, 3), tk.FwdConfig(16, 16, 1, 2)]
    assert tk.dense_candidates(36)[0] == tk.FwdConfig(64, 64, 4, 3)
    assert tk.dense_candidates(25)[0] == tk.FwdConfig(32, 32, 2, 3)
    big = tk.dense_candidates(256)
    assert big[0] == tk._DEFAULT_FWD[64] and len(big) == len(tk._DENSE_SHAPES)
    assert all(c.block_n <= 64 for c in tk.dense_candidates(1024, 128))


# ---------------------------------------------------------------------------------------------
# GPU only: real schedules, automatic choice, autotuned configurations
# ---------------------------------------------------------------------------------------------
@gpu_only
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("lengths", [
    tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
], ids=["256px", "512px"])
def test_gpu_real_schedules(lengths, pattern, dtype):
    _run_and_compare(lengths, pattern, 2, 4, 64, dtype)


@gpu_only
@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_head_dim_128_real_schedule(pattern):
    _run_and_compare(tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)), pattern, 2, 2, 128,
                     torch.bfloat16)


@gpu_only
@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_autotuned_configs(pattern, monkeypatch):
    monkeypatch.setenv("HMAR_TRITON_AUTOTUNE", "1")
    _run_and_compare(tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)), pattern, 2, 3, 64,
                     torch.bfloat16, seed=7)
    q = torch.empty(2, 3, 2240, 64, dtype=torch.bfloat16, device="cuda")
    lengths = tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    assert tk._tune_key(q, lengths, pattern) in tk._FWD_PLANS and tk._bwd_key(q, lengths, pattern) in tk._BWD_PLANS


@gpu_only
@needs_triton
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_autotuned_dq_atomic(pattern, monkeypatch):
    # HMAR_TRITON_DQ_ATOMIC=tune: the tuner times both forms of every candidate; whichever it keeps is right
    monkeypatch.setenv("HMAR_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(tk, "DQ_ATOMIC", "tune")
    lengths = tuple(x * x for x in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    _run_and_compare(lengths, pattern, 2, 3, 64, torch.bfloat16, seed=8)
    assert tk._bwd_key(torch.empty(2, 3, 2240, 64, dtype=torch.bfloat16, device="cuda"), lengths,
                       pattern) in tk._BWD_PLANS


@gpu_only
@needs_triton
@pytest.mark.parametrize("N", [1, 9, 100, 169, 256, 576, 1024])
def test_gpu_inference_kernel_at_the_sampling_passes(N, monkeypatch):
    # batch 16 with guidance, hmar-d30's 30 heads, every tile candidate timed (as the sampler's warm-up does)
    monkeypatch.setenv("HMAR_TRITON_AUTOTUNE", "1")
    q, k, v, s, ref = _dense_case(N, 32, 30, 64, torch.bfloat16, True, seed=N)
    with torch.no_grad():
        out = tk.triton_attention(q, k, v, (N,), qk_norm=s)
    assert (N, 64, torch.bfloat16, 32 * 30, True, q.device) in tk._DENSE_PLANS
    assert (out.float() - ref).abs().max().item() <= 3e-2 * max(1.0, ref.abs().max().item())


@gpu_only
@needs_triton
def test_gpu_auto_backend_is_triton():
    from hmar.attention import choose_backend
    lengths = tuple(x * x for x in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    q = torch.zeros(32, 16, 680, 64, dtype=torch.bfloat16, device="cuda")   # a d16 training call
    for pattern in PATTERNS:
        assert choose_backend(q, lengths, pattern) == "triton"
    # small calls are launch-bound: one masked SDPA launch wins there
    assert choose_backend(q[:1, :2, :30], (1, 4, 9, 16), "block_diagonal") == "reference"
    assert choose_backend(q[:4], lengths, "block_diagonal") == "reference"
