"""The fused token draw (``hmar.draw_kernel.fused_draw``): the torch draw's tokens and probabilities, the documented
filters on tied logits, the non-finite check, and the sampler with it (``model.fused_draw``) against the torch ops.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set before the module is
imported, as in ``test_triton_attention.py``); with CUDA on the GPU, plus a test at the official vocabulary."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import hmar.draw_kernel as dk  # noqa: E402

if not ON_GPU and dk._HAS_TRITON and not dk._INTERPRETED:
    dk = importlib.reload(dk)  # imported earlier without the interpreter: decorate again

from hmar import VQVAE, build_model, model_config, tokenizer_config  # noqa: E402
from hmar.sampling import sample, sample_from_logits  # noqa: E402

pytestmark = pytest.mark.skipif(not dk._HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if ON_GPU else "cpu"


def _exp_draws(rows, V, seed):
    """The Exp(1) draws the torch draw makes from a generator of ``seed``, and a fresh generator of that seed."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.empty(rows, V, device=DEVICE).exponential_(1, generator=g)
    return q, torch.Generator(DEVICE).manual_seed(seed)


def _reference(logits, q, weight, top_k, top_p, temperature):
    """The documented draw in float64: ties at the k-th logit all kept; a token goes when the strictly more likely
    kept tokens hold ``top_p`` of the mass; argmax of p / q."""
    x = logits.double()
    if weight is not None:
        B = x.shape[0] // 2
        x = torch.lerp(x[B:], x[:B], weight)
    x = (x / temperature).reshape(q.shape)
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < x.shape[-1]:
        keep = x >= x.topk(top_k, -1).values[:, -1:]
    p = torch.where(keep, (x - x.amax(-1, keepdim=True)).exp(), 0)
    p = p / p.sum(-1, keepdim=True)
    if 0 < top_p < 1:
        a, order = x.sort(-1)                                   # the mass strictly more likely than each token:
        c = p.gather(-1, order).cumsum(-1)                      # all of it less that of the values <= its own
        at_most = torch.searchsorted(a, x, right=True)
        greater = c[:, -1:] - torch.where(at_most > 0, c.gather(-1, (at_most - 1).clamp(min=0)), 0)
        keep &= greater < top_p
        p = torch.where(keep, p, 0)
        p = p / p.sum(-1, keepdim=True)
    tok = torch.where(keep, p / q.double(), -1.0).argmax(-1)
    return tok, p.gather(1, tok[:, None])[:, 0]


SETTINGS = [(0, 0.0, 1.0), (20, 0.0, 1.3), (0, 0.9, 0.7), (20, 0.9, 1.0), (99, 0.5, 1.0)]


if dk._HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _thresholds(x_ptr, out_ptr, V, k, BLOCK: tl.constexpr):
        """The two selects' k-th largest keys of one row (the draw kernel's key mapping and padding)."""
        cols = tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.where(valid, tl.load(x_ptr + cols, mask=valid, other=0.0), -float("inf"))
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(valid, bits ^ ((bits >> 31) & 0x7FFFFFFF), ~tl.full((), 0x7FFFFFFF, tl.int32))
        tl.store(out_ptr, dk._largest_key_with(key, x, k, False))
        tl.store(out_ptr + 1, dk._kth_key_by_histograms(key, k))


@pytest.mark.parametrize("V", [100, 256])
@pytest.mark.parametrize("kind", ["continuous", "ties", "negative", "with -inf"])
def test_histogram_select_finds_the_bit_steps_threshold(V, kind):
    """``_kth_key_by_histograms`` returns ``_largest_key_with``'s key (the k-th largest logit's) for every k from 1
    to V - 1: rows of continuous values, of a few tied values, all negative, and with -inf entries; and the number
    of logits at least that large is k but for ties."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(V, generator=g) * 3
    if kind == "ties":
        x = torch.randint(-3, 4, (V,), generator=g).float() * 0.5
    elif kind == "negative":
        x = -x.abs() - 1
    elif kind == "with -inf":
        x[::7] = float("-inf")
    x = x.to(DEVICE)
    out = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for k in sorted({1, 2, 3, V // 3, V // 2, V - 2, V - 1}):
        _thresholds[(1,)](x, out, V, k, BLOCK=triton.next_power_of_2(V), num_warps=1 if not ON_GPU else 4)
        bit, hist = out.tolist()
        assert bit == hist, (kind, k, bit, hist)
        kth = x.sort(descending=True).values[k - 1]
        assert (x >= kth).sum() >= k and ((x > kth).sum() < k)


def test_fused_draw_with_histograms_draws_the_same(monkeypatch):
    """``HISTOGRAM_TOP_K``: the whole draw with the histogram select, on tied bf16 logits with and without guidance,
    gives the bit-step kernel's tokens and probabilities (the thresholds are equal: the test above)."""
    torch.manual_seed(1)
    B, n, V = 2, 3, 128
    logits = (torch.randint(-6, 7, (2 * B, n, V), device=DEVICE) * 0.5).to(torch.bfloat16)
    for weight in (None, 2.0):
        x = logits if weight is not None else logits[:B]
        for top_k, top_p, temp in [(20, 0.0, 1.3), (99, 0.5, 1.0)]:
            q, _ = _exp_draws(B * n, V, 2)
            runs = []
            for hist in (False, True):
                monkeypatch.setattr(dk, "HISTOGRAM_TOP_K", hist)
                runs.append(dk.fused_draw(x, q, weight, top_k, top_p, temp))
            assert all(torch.equal(a, b) for a, b in zip(*runs)), (weight, top_k, top_p)


@pytest.mark.parametrize("V", [100, 256])
@pytest.mark.parametrize("guided", [False, True])
def test_fused_draw_matches_the_torch_draw(V, guided):
    """Continuous fp32 logits (no ties): the tokens of ``sample_from_logits`` after ``torch.lerp``, and its
    probabilities to fp32 rounding, for the same Exp(1) draws; every filter setting, with and without guidance."""
    torch.manual_seed(V)
    B, n, w = 3, 5, 1.75
    for top_k, top_p, temp in SETTINGS:
        logits = torch.randn(2 * B if guided else B, n, V, device=DEVICE) * 3
        q, _ = _exp_draws(B * n, V, 1)
        tok, conf, bad = dk.fused_draw(logits, q, w if guided else None, top_k, top_p, temp)
        x = torch.lerp(logits[B:], logits[:B], w) if guided else logits
        want, want_conf = sample_from_logits(x, _exp_draws(B * n, V, 1)[1], top_k, top_p, temp)
        assert torch.equal(tok, want), (top_k, top_p, temp)
        torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-6)
        assert not bad.any()


def test_fused_draw_on_tied_bf16_logits_keeps_the_documented_sets():
    """bf16 logits of few distinct values (many ties at the k-th value and inside the top-p cut): the tokens and
    probabilities of the float64 reference of the documented filters (ties kept together)."""
    torch.manual_seed(0)
    B, n, V = 2, 8, 128
    logits = (torch.randint(-6, 7, (2 * B, n, V), device=DEVICE) * 0.5).to(torch.bfloat16)
    for weight in (None, 2.0):
        x = logits if weight is not None else logits[:B]
        for top_k, top_p, temp in SETTINGS[1:]:
            q, _ = _exp_draws(B * n, V, 2)
            tok, conf, _ = dk.fused_draw(x, q, weight, top_k, top_p, temp)
            want, want_conf = _reference(x, q, weight, top_k, top_p, temp)
            assert torch.equal(tok.flatten(), want), (weight, top_k, top_p)
            torch.testing.assert_close(conf.flatten().double(), want_conf, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy on the NaN rows
def test_fused_draw_flags_non_finite_positions_and_stays_in_range():
    B, n, V = 2, 4, 64
    logits = torch.randn(2 * B, n, V, device=DEVICE)
    logits[0, 1, 5] = float("nan")          # a cond row
    logits[B + 1, 2, 7] = float("inf")      # an uncond row: the same position of its cond row is flagged
    logits[1, 3, :] = float("-inf")         # a whole row
    q, _ = _exp_draws(B * n, V, 0)
    tok, conf, bad = dk.fused_draw(logits, q, 1.5, 10, 0.9)
    want = torch.zeros(B, n, dtype=torch.bool, device=DEVICE)
    want[0, 1] = want[1, 2] = want[1, 3] = True
    assert torch.equal(bad, want)
    assert tok.min() >= 0 and tok.max() < V
    assert not dk.fused_draw(logits[:B], q, None)[2][1, 2]   # unguided: the uncond rows are not read


def test_fused_draw_refuses_bad_arguments(monkeypatch):
    logits = torch.randn(3, 2, 16, device=DEVICE)
    q, _ = _exp_draws(6, 16, 0)
    with monkeypatch.context() as m:
        m.setattr(dk, "_INTERPRETED", False)
        with pytest.raises(ValueError, match="fused_draw = False"):
            dk.fused_draw(logits.cpu(), q.cpu())
    with pytest.raises(ValueError, match="even batch"):
        dk.fused_draw(logits, q, 1.5)
    with pytest.raises(ValueError, match="q must be fp32"):
        dk.fused_draw(logits, q[:, :8])
    with pytest.raises(ValueError, match="temperature"):
        dk.fused_draw(logits, q, temperature=0)


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_sampling_with_the_fused_draw_equals_the_torch_ops(name):
    """``model.fused_draw``: the sampler's passes return the head's own logits and one kernel draws each pass; an
    fp32 model (no tied logits) samples exactly the tokens of the torch ops for each seed (the default filters, and
    top-k / top-p with guidance inside HMAR's masked steps), and the generator advances the same."""
    torch.manual_seed(0)
    model = build_model(model_config(name)).to(DEVICE).eval()
    tok = VQVAE(tokenizer_config("vqvae-tiny")).to(DEVICE).eval()
    settings = [dict(cfg=2.0, generator=0), dict(cfg=1.5, guide_masked=True, top_k=20, top_p=0.9, generator=1)]
    for kw in settings if name.startswith("hmar") else settings[:1]:     # (VAR has no masked steps to guide)
        runs = []
        for fused in (False, True):
            model.fused_draw = fused
            g = torch.Generator(DEVICE).manual_seed(kw["generator"])
            out = sample(model, tok, [1, 2, 3], decode=False, **{**kw, "generator": g})
            runs.append((out, g.get_state()))
        (a, ga), (b, gb) = runs
        assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)), kw
        assert torch.equal(ga, gb) and a.passes == b.passes
    model.to(torch.bfloat16)       # the passes return the head's own dtype with the fused draw, fp32 without
    x = torch.randn(2, 4, model.config.embed_dim, device=DEVICE, dtype=torch.bfloat16)
    cond = model.class_emb(torch.tensor([0, 1], device=DEVICE))
    for fused, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        model.fused_draw = fused
        assert model.next_scale_logits(x, cond).dtype == dtype


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sampling_with_the_fused_draw_raises_on_non_finite_logits():
    from hmar.errors import HMARError
    model = build_model(model_config("hmar-tiny")).to(DEVICE).eval()
    tok = VQVAE(tokenizer_config("vqvae-tiny")).to(DEVICE).eval()
    model.fused_draw = True
    with torch.no_grad():
        model.mask_head.bias[3] = float("nan")
    with pytest.raises(HMARError, match="non-finite"):
        sample(model, tok, [1], decode=False)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_fused_draw_at_the_official_vocabulary_on_the_gpu():
    """V = 4096, top-k 900, top-p 0.96, bf16 guided logits as the last 256 px scale draws them (16 x 256 positions):
    the float64 reference's tokens, and the torch draw's wherever torch.topk's exactly-k cut does not split a tie."""
    torch.manual_seed(0)
    B, n, V = 16, 256, 4096
    logits = (torch.randn(2 * B, n, V, device="cuda") * 2).to(torch.bfloat16)
    q, g = _exp_draws(B * n, V, 3)
    tok, conf, bad = dk.fused_draw(logits, q, 2.5, 900, 0.96)
    want, want_conf = _reference(logits.float(), q, 2.5, 900, 0.96, 1.0)
    assert (tok.flatten() == want).float().mean() > 0.999 and not bad.any()
    torch.testing.assert_close(conf.flatten().double(), want_conf, rtol=1e-4, atol=1e-7)
    x = torch.lerp(logits[B:].float(), logits[:B].float(), 2.5)
    torch_tok, _ = sample_from_logits(x, g, 900, 0.96)
    assert (torch_tok == tok).float().mean() > 0.99


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy: (lc - max) / 1e-38 is -inf
@pytest.mark.parametrize("top_k", [0, 20])
def test_fused_draw_at_a_tiny_temperature_is_greedy_like_the_torch_draw(top_k):
    """``lc / 1e-37`` overflows fp32 (inf - inf: a NaN row): the kernel subtracts the row's max first (as ``sample_from_logits`` does below
    1e-4), so it draws the argmax with probability 1, not token 0 of a NaN row."""
    torch.manual_seed(3)
    B, n, V = 2, 7, 100
    logits = torch.randn(B, n, V, device=DEVICE) * 3 + 50
    for temp in (1e-37, 1e-45, 1e-6):
        q, g = _exp_draws(B * n, V, 5)
        tok, conf, bad = dk.fused_draw(logits, q, None, top_k, 0.0, temp)
        assert torch.equal(tok, logits.argmax(-1)), temp
        assert torch.equal(conf, torch.ones_like(conf)) and not bad.any()
        want, _ = sample_from_logits(logits, g, top_k, 0.0, temp)
        assert torch.equal(tok, want)
