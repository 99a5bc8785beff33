"""Full-sequence (training) forwards equal the scale-by-scale inference passes.

HMAR: the block-diagonal forward over all L tokens equals running each scale on its own
(no KV cache), for both branches. VAR: inference with the KV cache equals the block-causal forward.
"""
import pytest
import torch

from hmar import build_model, model_config
from hmar.sampling import check_labels


def _teacher_inputs(tok, B, gen):
    idx = [torch.randint(0, tok.quantize.vocab_size, (B, pn * pn), generator=gen) for pn in tok.patch_nums]
    return idx, tok.next_scale_inputs(idx), tok.masked_inputs(idx)


@torch.no_grad()
def test_hmar_training_forward_equals_scale_by_scale(tiny):
    hmar, _, _, tok = tiny
    g = torch.Generator().manual_seed(1)
    idx, x_ns, x_cur = _teacher_inputs(tok, 3, g)
    labels = torch.tensor([0, 5, 9])
    full = hmar(labels, x_ns)                                   # [B, L, V], block-diagonal
    cond = hmar.class_emb(labels)
    parts = [hmar.next_scale_logits(hmar.embed_first(cond), cond)]
    for si in range(1, len(hmar.patch_nums)):
        s, e = hmar.starts[si] - 1, hmar.starts[si + 1] - 1
        parts.append(hmar.next_scale_logits(hmar.embed_scale(si, x_ns[:, s:e]), cond))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)

    # masked branch: random masks, same equivalence
    mask = torch.rand(3, hmar.config.seq_len, generator=g) < 0.5
    full_m = hmar.forward_masked(labels, x_ns, x_cur, mask)
    for si in range(1, len(hmar.patch_nums)):
        s, e = hmar.starts[si], hmar.starts[si + 1]
        xm = hmar.embed_masked(si, x_ns[:, s - 1:e - 1], x_cur[:, s - 1:e - 1], mask[:, s:e])
        torch.testing.assert_close(hmar.masked_logits(xm, cond), full_m[:, s:e], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_markov_property_scale_depends_only_on_its_input(tiny):
    """Changing the inputs of scale 2 changes no other scale's logits (block-diagonal)."""
    hmar, _, nsp, tok = tiny
    g = torch.Generator().manual_seed(2)
    _, x, _ = _teacher_inputs(tok, 2, g)
    labels = torch.tensor([1, 2])
    for m in (hmar, nsp):
        a = m(labels, x)
        x2 = x.clone()
        s, e = m.starts[2] - 1, m.starts[3] - 1
        x2[:, s:e] += 1.0
        b = m(labels, x2)
        same = torch.ones(m.config.seq_len, dtype=torch.bool)
        same[m.starts[2]:m.starts[3]] = False
        torch.testing.assert_close(a[:, same], b[:, same], atol=1e-6, rtol=0)
        assert (a[:, ~same] - b[:, ~same]).abs().max() > 1e-3


@torch.no_grad()
def test_var_kv_cache_equals_block_causal_forward(tiny):
    _, var, _, tok = tiny
    g = torch.Generator().manual_seed(3)
    _, x, _ = _teacher_inputs(tok, 2, g)
    labels = torch.tensor([3, 7])
    full = var(labels, x)
    cond = var.class_emb(labels)
    caches = var.new_caches()
    parts = [var.next_scale_logits(var.embed_first(cond), cond, caches)]
    for si in range(1, len(var.patch_nums)):
        s, e = var.starts[si] - 1, var.starts[si + 1] - 1
        parts.append(var.next_scale_logits(var.embed_scale(si, x[:, s:e]), cond, caches))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # and block-causal really differs from block-diagonal on the same weights
    var.pattern = "block_diagonal"
    try:
        assert (var(labels, x) - full)[:, 1:].abs().max() > 1e-4
    finally:
        var.pattern = "block_causal"


def test_label_checks(tiny):
    import pytest
    from hmar.errors import HMARError
    assert check_labels([0, -1, 9], 10, torch.device("cpu")).tolist() == [0, 10, 9]
    with pytest.raises(HMARError):
        check_labels([10], 10, torch.device("cpu"))
    with pytest.raises(HMARError, match="out of range"):
        check_labels([10 + 1], 10, torch.device("cpu"))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["hmar", "var"])
def test_deferred_residual_branches_give_the_same_passes(kind, monkeypatch):
    """The inference passes hand each block's last residual branch to the next block (``DEFER_RESIDUAL``), so that a
    compiled block adds it inside its first LayerNorm's kernel. The same ops run in the same order: the logits are
    bit for bit those of blocks that add their own branch, at every scale, for both branches of HMAR and for VAR
    with its KV cache, with precomputed and per-pass modulations."""
    import hmar.model.transformer as T
    torch.manual_seed(0)
    m = build_model(model_config(f"{kind}-tiny", patch_nums=(1, 2, 3, 4))).eval()
    for p in m.parameters():   # AdaLN gammas away from their small init, so that every branch counts
        p.add_(torch.randn_like(p) * 0.05)
    cond = m.class_emb(torch.tensor([0, 3]))
    xs = [torch.randn(2, pn * pn, m.config.embed_dim) for pn in m.config.patch_nums]

    def passes():
        out = []
        for c in (cond, m.precompute_condition(cond)):
            caches = m.new_caches()
            for x in xs:
                out.append(m.next_scale_logits(x, c, caches))
                if kind == "hmar":
                    out.append(m.masked_logits(x, c))
        return out

    deferred = passes()
    monkeypatch.setattr(T, "DEFER_RESIDUAL", False)
    plain = passes()
    assert len(deferred) == len(plain) > 0
    for a, b in zip(deferred, plain):
        assert torch.equal(a, b)
    # and each block's own result: x + h * gamma2 from its deferred form
    blk = m.blocks[1] if kind == "var" else m.base_blocks[0]
    x, mod = xs[2], torch.randn(2, 6, m.config.embed_dim)
    y, branch = blk(x, mod, (9,), "dense", defer=True)
    assert torch.equal(blk(x, mod, (9,), "dense"), y + branch[0] * mod[:, None, 1])
