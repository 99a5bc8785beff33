"""Sampler behaviour: seeding, masked steps, schedules, guidance, filtering, backends."""
import math

import pytest
import torch

from hmar.attention import attention, block_mask
from hmar.errors import HMARError
from hmar.presets import default_schedule, resolve_schedule, schedule_coarse, schedule_none
from hmar.sampling import filter_logits, sample


def test_seeded_runs_are_identical_and_seeds_differ(tiny):
    hmar, var, nsp, tok = tiny
    for m in (hmar, var, nsp):
        a = sample(m, tok, [1, 2, 3], generator=7, top_k=0, top_p=0)
        b = sample(m, tok, [1, 2, 3], generator=torch.Generator().manual_seed(7), top_k=0, top_p=0)
        c = sample(m, tok, [1, 2, 3], generator=8, top_k=0, top_p=0)
        assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
        assert torch.equal(a.images, b.images)
        assert any(not torch.equal(x, y) for x, y in zip(a.indices, c.indices))
        assert a.images.shape == (3, 3, 64, 64) and 0 <= a.images.min() and a.images.max() <= 1


def test_masked_steps_only_overwrite_masked_positions_and_follow_the_schedule(tiny):
    hmar, _, _, tok = tiny
    sched = [[1], [1, 1, 2], [2, 3, 4], [4, 12]]
    log = []
    out = sample(hmar, tok, [0, 4], schedule=sched, generator=0, top_k=0, top_p=0, callback=log.append)
    per_scale = {}
    for s in log:
        per_scale[s.scale] = per_scale.get(s.scale, 0) + 1
        if s.kind == "masked":
            unchanged = ~s.masked
            assert torch.equal(s.after[unchanged], s.before[unchanged])
            # the masked set has exactly the scheduled size: what the later entries still have to commit
            assert s.masked.sum(1).tolist() == [sum(sched[s.scale][s.step:])] * 2
    assert per_scale == {0: 1, 1: 3, 2: 3, 3: 2}          # a scale with n entries runs exactly n passes
    assert out.passes == sum(len(x) for x in sched)
    # default schedule of the tiny 4-scale model: the official shape (1 pass at 2x2, 3 at 3x3)
    assert sample(hmar, tok, [0], generator=0).passes == 1 + 2 + 4 + 1
    # models without a masked branch ignore the schedule: one pass per scale
    assert sample(tiny[1], tok, [0], schedule=sched, generator=0).passes == 4


def test_masked_set_shrinks_and_commits_most_confident(tiny):
    hmar, _, _, tok = tiny
    log = []
    sample(hmar, tok, [5], schedule=[[1], [1, 1, 1, 1], [9], [16]], generator=3, callback=log.append)
    masks = [s.masked for s in log if s.kind == "masked" and s.scale == 1]
    assert [int(m.sum()) for m in masks] == [3, 2, 1]
    for a, b in zip(masks, masks[1:]):
        assert not (b & ~a).any()                         # never re-masks a committed token


def test_default_schedules():
    from hmar.presets import PATCH_NUMS
    d = default_schedule(PATCH_NUMS[256])
    assert d == [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]
    assert sum(len(s) for s in d) == 14
    assert sum(len(s) for s in default_schedule(PATCH_NUMS[512])) == 15
    for pn in PATCH_NUMS.values():
        for s in (default_schedule(pn), schedule_none(pn), schedule_coarse(pn)):
            resolve_schedule(s, pn)
    assert resolve_schedule("none", (1, 2)) == [[1], [4]]
    with pytest.raises(HMARError, match="sums to 3"):
        resolve_schedule([[1], [1, 2]], (1, 2))
    with pytest.raises(HMARError, match="2 entries"):
        resolve_schedule([[1], [4]], (1, 2, 3))
    with pytest.raises(HMARError, match="unknown schedule"):
        resolve_schedule("fancy", (1, 2))


def test_guidance_in_masked_steps_is_a_switch(tiny):
    hmar, _, _, tok = tiny
    kw = dict(generator=0, top_k=0, top_p=0, cfg=3.0, schedule=[[1], [1, 3], [1, 1, 2, 5], [1, 15]])
    a = sample(hmar, tok, [2, 3], guide_masked=False, **kw)
    b = sample(hmar, tok, [2, 3], guide_masked=True, **kw)
    assert torch.equal(a.indices[0], b.indices[0])          # scale 0 has no masked pass
    assert any(not torch.equal(x, y) for x, y in zip(a.indices[1:], b.indices[1:]))
    # cfg = 0 equals purely conditional sampling whatever the switch says
    c = sample(hmar, tok, [2, 3], **{**kw, "cfg": 0.0, "guide_masked": True})
    d = sample(hmar, tok, [2, 3], **{**kw, "cfg": 0.0})
    assert all(torch.equal(x, y) for x, y in zip(c.indices, d.indices))


def test_constraints_keep_known_tokens(tiny):
    for m in tiny[:2]:
        tok = tiny[3]
        known = [torch.randint(0, 64, (1, pn * pn)) for pn in (1, 2, 3, 4)]
        keep = [torch.rand(1, pn * pn) < 0.5 for pn in (1, 2, 3, 4)]
        out = sample(m, tok, [1], generator=0, constraints=list(zip(known, keep)))
        for o, k, kp in zip(out.indices, known, keep):
            assert torch.equal(o[kp], k[kp])


def test_filter_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    f = filter_logits(logits, top_k=2)
    assert torch.isinf(f[0, :3]).all() and torch.isfinite(f[0, 3:]).all()
    # softmax of 0..4 = [.012, .032, .086, .234, .636]: top_p 0.8 keeps {4, 3}, 0.5 keeps {4}
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[False, False, False, False, True]]
    assert torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("lengths", [(1, 4, 9, 16), (1, 4, 9, 16, 25, 36, 64, 100, 169, 256), (7,)])
def test_attention_backends_agree(pattern, lengths):
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 3, sum(lengths), 16
    qkv = [torch.randn(B, H, N, D, generator=g, requires_grad=True) for _ in range(3)]
    outs, grads = {}, {}
    for name in ("reference", "per_scale"):
        o = attention(*qkv, lengths=lengths, pattern=pattern, scale=0.3, backend=name)
        (o * torch.arange(o.numel()).view_as(o).float().sin()).sum().backward()
        outs[name], grads[name] = o.detach(), [t.grad.clone() for t in qkv]
        for t in qkv:
            t.grad = None
    torch.testing.assert_close(outs["reference"], outs["per_scale"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["reference"], grads["per_scale"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and both equal explicit masked softmax attention
    q, k, v = (t.detach() for t in qkv)
    s = (q @ k.transpose(-1, -2)) * 0.3
    s = s.masked_fill(~block_mask(lengths, pattern), -math.inf)
    torch.testing.assert_close(outs["reference"], s.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def test_model_forward_identical_across_backends(tiny, monkeypatch):
    hmar, var, _, tok = tiny
    x = tok.next_scale_inputs([torch.randint(0, 64, (2, pn * pn)) for pn in tok.patch_nums])
    y = torch.tensor([1, 2])
    with torch.no_grad():
        for m in (hmar, var):
            ref = m(y, x, backend="reference")
            torch.testing.assert_close(m(y, x, backend="per_scale"), ref, atol=1e-5, rtol=1e-5)
    # and sampling under a forced backend gives the same tokens
    monkeypatch.setenv("HMAR_ATTN_BACKEND", "per_scale")
    a = sample(hmar, tok, [1], generator=0)
    monkeypatch.setenv("HMAR_ATTN_BACKEND", "reference")
    b = sample(hmar, tok, [1], generator=0)
    assert all(torch.equal(p, q) for p, q in zip(a.indices, b.indices))


def test_unknown_backend_is_a_clear_error():
    q = torch.zeros(1, 1, 5, 4)
    with pytest.raises(ValueError, match="not available"):
        attention(q, q, q, lengths=(1, 4), backend="nope")
    with pytest.raises(ValueError, match="sum to 4"):
        attention(q, q, q, lengths=(1, 3))


def _filter_logits_two_pass(logits, top_k=0, top_p=0.0):
    """The filter as it was until 2026-12-01 (topk, then a sort of the masked logits): the reference."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (900, 0.0), (0, 0.96), (900, 0.96), (1, 0.5), (4095, 0.999),
                                         (50, 0.3), (4096, 0.9), (10, 1.0)])
def test_one_sort_filter_equals_topk_then_sort(top_k, top_p):
    """One sort for both filters keeps exactly the tokens that topk + a second sort kept (continuous logits,
    as networks give, at several temperatures; exact ties at the top-p boundary are the only possible difference)."""
    g = torch.Generator().manual_seed(top_k + int(top_p * 1000))
    for scale in (0.1, 1.0, 8.0):
        logits = torch.randn(6, 50, 4096, generator=g) * scale
        got, want = filter_logits(logits, top_k, top_p), _filter_logits_two_pass(logits, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.equal(got, want)


def test_shipped_model_samples_the_stored_tokens_for_its_seed():
    """Reference values: the shipped default model, seed 0, classes 0, 4, 8, default options, gives the stored
    tokens (tests/data/default_model_seed0.json). A change that silently alters what a seed generates (the
    sampler, the filters, the precomputed conditioning, the masked schedule) fails here."""
    import json
    from pathlib import Path

    from hmar.pipeline import HMARPipeline
    ref = json.loads((Path(__file__).parent / "data" / "default_model_seed0.json").read_text())
    pipe = HMARPipeline.from_pretrained(None)
    out = pipe.generate(ref["labels"], generator=ref["seed"])
    assert out.passes == ref["passes"]
    for si, (got, want) in enumerate(zip(out.indices, ref["indices"])):
        assert got.tolist() == want, f"scale {si} differs"
    assert float(out.images.mean()) == pytest.approx(ref["image_mean"], abs=1e-4)


def test_non_finite_logits_are_a_clear_error(tiny):
    """The sampler never waits for the GPU inside its loop (so it can be captured as one CUDA graph); it collects
    whether any pass gave NaN / inf logits and says so once at the end, for the next-scale and the masked branch."""
    import copy
    hmar, var, _, tok = tiny
    for m, where in ((hmar, "ns_head"), (hmar, "mask_head"), (var, "head")):
        broken = copy.deepcopy(m)
        for p in getattr(broken, where).parameters():
            p.data.fill_(float("nan"))
        with pytest.raises(HMARError, match="non-finite logits"):
            sample(broken, tok, [1, 2], generator=0, decode=False)


@pytest.mark.parametrize("top_k,top_p,temperature", [(900, 0.96, 1.0), (900, 0.0, 1.0), (50, 0.3, 0.7),
                                                     (1, 0.5, 1.0), (4095, 0.999, 1.3), (0, 0.96, 1.0)])
def test_topk_draw_equals_the_full_vocabulary_draw(top_k, top_p, temperature):
    """The draw over the top_k candidates gives the tokens and probabilities of the draw over all V tokens of
    softmax(filter_logits(...)) with the same generator state (the sampler before 2026-12-02), so seeds carry
    over; continuous logits, where ties at the k-th value cannot happen."""
    from hmar.sampling import sample_from_logits
    g = torch.Generator().manual_seed(top_k)
    for scale in (0.5, 3.0):
        logits = torch.randn(5, 40, 4096, generator=g) * scale
        tok, conf = sample_from_logits(logits, torch.Generator().manual_seed(7), top_k, top_p, temperature)
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1).reshape(-1, 4096)
        q = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(7))
        want = (probs / q).argmax(-1)
        assert torch.equal(tok.reshape(-1), want)
        # the probabilities: equal to float rounding, except where the top-p cut-off lands on a token whose
        # cumulative sum is the threshold to rounding (the two cumsums add in other orders: one row in 400 here on
        # some CPUs). Then one path keeps that token in the normaliser and the other does not, which changes the
        # probability by at most that token's share: the least kept probability of the row.
        ref = probs.gather(1, want[:, None])[:, 0]
        least = probs.masked_fill(probs == 0, 1.0).amin(-1)
        rel = (conf.reshape(-1) - ref).abs() / ref
        assert (rel <= 1e-5 + 1.01 * least).all() and (rel > 1e-5).float().mean() < 0.01, rel.max()
        assert (probs.gather(1, tok.reshape(-1, 1)) > 0).all()     # never a filtered token


def test_tiny_temperature_is_greedy_not_token_zero(tiny):
    """``logits / temperature`` overflowed to inf below ~1e-38 (softmax NaN): every token came out as 0, silently.
    A temperature towards 0 is the greedy limit: the argmax, for both draw paths and in the whole sampler."""
    from hmar.sampling import sample_from_logits
    logits = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(0)) * 10
    for t in (1e-30, 1e-45, 1e-60):
        for top_k in (0, 5):
            tok, conf = sample_from_logits(logits, torch.Generator().manual_seed(1), top_k, 0.9, t)
            assert torch.equal(tok, logits.argmax(-1)) and torch.equal(conf, torch.ones_like(conf))
    hmar, var, _, tok = tiny
    for m in (hmar, var):
        cold = sample(m, tok, [1, 2], generator=0, temperature=1e-45, decode=False)
        greedy = sample(m, tok, [1, 2], generator=0, top_k=1, decode=False)
        assert all(torch.equal(a, b) for a, b in zip(cold.indices, greedy.indices))


def test_float_and_bool_labels_are_refused_not_truncated(tiny):
    """``sample(..., [1.5])`` drew class 1 and ``[True]`` class 1 (a cast to long): a float or a bool is no class id."""
    from hmar.sampling import check_labels
    hmar, _, _, tok = tiny
    for bad in ([1.5], torch.tensor([0.7]), [True], torch.tensor([True, False])):
        with pytest.raises(HMARError, match="integer ids"):
            sample(hmar, tok, bad, generator=0, decode=False)
    assert check_labels(torch.tensor([3, -1]), 10, torch.device("cpu")).tolist() == [3, 10]
    with pytest.raises(HMARError, match="no class labels"):
        check_labels([], 10, torch.device("cpu"))


def test_a_string_guide_masked_and_a_generator_on_another_device_are_refused(tiny):
    """``guide_masked="no"`` was taken as True (a non-empty string); a CUDA generator for a CPU model raised deep in
    torch (here: a CPU generator for a CUDA model). Each is one line saying what to pass instead."""
    hmar, _, _, tok = tiny
    for bad in ("no", 1, None):
        with pytest.raises(HMARError, match="guide_masked must be True or False"):
            sample(hmar, tok, [1], generator=0, decode=False, guide_masked=bad)
    from hmar.sampling import make_generator
    with pytest.raises(HMARError, match="the generator is on cpu but the model runs on cuda"):
        make_generator(torch.Generator(), torch.device("cuda"))     # no GPU needed to build the refusal
    same = sample(hmar, tok, [1], generator=torch.Generator().manual_seed(3), decode=False).indices
    assert all(torch.equal(a, b) for a, b in zip(same, sample(hmar, tok, [1], generator=3, decode=False).indices))


def test_every_model_checks_the_schedule_and_the_tokenizer_follows_the_model_scales():
    """A VAR (no masked branch) uses no schedule but refuses one that cannot be right, as HMAR does; sampling with a
    model of other scales switches the tokenizer through its own setter, so its config says the scales it now has."""
    from hmar import VQVAE, build_model, model_config, tokenizer_config
    from hmar.errors import HMARError
    torch.manual_seed(0)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    for kind in ("var", "hmar"):
        m = build_model(model_config(f"{kind}-tiny")).eval()
        with pytest.raises(HMARError, match="schedule"):
            sample(m, tok, [1], schedule="no-such-schedule", decode=False)
    pn = (1, 2, 4)
    m = build_model(model_config("var-tiny", patch_nums=pn)).eval()
    out = sample(m, tok, [1], decode=False)
    assert tuple(tok.quantize.patch_nums) == tuple(tok.config.patch_nums) == pn
    assert [t.shape[-1] for t in out.indices] == [p * p for p in pn]
