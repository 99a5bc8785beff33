"""Multi-scale residual quantiser: the algebra of f_hat, decoding, residuals, phi tables."""
import re

import pytest
import torch
import torch.nn.functional as F

from hmar import VQVAE, tokenizer_config
from hmar.tokenizer.quantizer import bicubic_up, phi_index_table


def test_phi_tables_match_official():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(14, 4) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert phi_index_table(4, 4) == [0, 1, 2, 3]
    assert phi_index_table(5, 1) == [0] * 5


@torch.no_grad()
def test_fhat_is_sum_of_contributions_and_decoding_agrees(tiny):
    *_, tok = tiny
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    idx = tok.img_to_indices(img)
    assert [t.shape for t in idx] == [(2, pn * pn) for pn in (1, 2, 3, 4)]
    contrib = tok.quantize.contributions(idx)
    f_hat = tok.indices_to_fhat(idx)
    torch.testing.assert_close(f_hat, sum(contrib), atol=1e-6, rtol=0)
    torch.testing.assert_close(tok.indices_to_img(idx), tok.fhat_to_img(f_hat), atol=0, rtol=0)
    # prefix of scales = partial sums
    torch.testing.assert_close(tok.indices_to_fhat(idx[:2]), contrib[0] + contrib[1], atol=1e-6, rtol=0)


@torch.no_grad()
def test_images_of_another_size_and_bad_index_maps_are_refused(tiny):
    """A 65 px image (latent 4x4 by the convs' rounding) used to be encoded silently and decode to 64 px; a 60 px one
    said only "4x the downsampling factor"; index maps of more scales than the schedule were cut silently."""
    from hmar.errors import HMARError
    *_, tok = tiny
    for shape in ((1, 3, 65, 65), (1, 3, 60, 60), (1, 3, 64, 32), (3, 64, 64)):
        with pytest.raises(HMARError, match=r"images must be \[B, 3, 64, 64\] \(the last scale 4 x the downsampling "
                                            r"factor 16\), got " + re.escape(str(list(shape)))):
            tok.img_to_indices(torch.zeros(shape))
    idx = tok.img_to_indices(torch.rand(2, 3, 64, 64) * 2 - 1)
    with pytest.raises(HMARError, match=r"index maps of 5 scales; the tokenizer's schedule \(1, 2, 3, 4\) has 4"):
        tok.indices_to_img(idx + idx[-1:])
    with pytest.raises(HMARError, match=r"scale 1 must be integer codes of shape \[B, 4\]"):
        tok.indices_to_img([idx[0], idx[1][:, :3]] + idx[2:])
    with pytest.raises(HMARError, match=r"scale 0 must be integer codes .*torch.float32"):
        tok.indices_to_img([i.float() for i in idx])
    torch.testing.assert_close(tok.indices_to_img(idx[:3]), tok.fhat_to_img(sum(tok.quantize.contributions(idx)[:3])),
                               atol=1e-6, rtol=0)   # a prefix still decodes


@torch.no_grad()
def test_residual_after_last_scale_is_what_quantisation_missed(tiny):
    *_, tok = tiny
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    f = tok.encode_features(img)
    idx = tok.quantize.encode(f)
    f_hat = tok.indices_to_fhat(idx)
    residual = f - f_hat
    # re-run the residual loop by hand: what is left after the last scale is f - f_hat,
    # and the last scale's codes are the nearest codes of what was left before it
    rest = f.clone()
    for si, pn in enumerate(tok.patch_nums[:-1]):
        rest -= tok.quantize.contributions(idx)[si]
    last = tok.quantize.nearest(rest)
    assert torch.equal(last, idx[-1])
    torch.testing.assert_close(rest - tok.quantize.contributions(idx)[-1], residual, atol=1e-5, rtol=0)


@torch.no_grad()
def test_teacher_forcing_inputs(tiny):
    *_, tok = tiny
    idx = [torch.randint(0, 64, (2, pn * pn)) for pn in tok.patch_nums]
    x = tok.next_scale_inputs(idx)
    assert x.shape == (2, 29, 8)
    # the input of scale 3 (4x4 = last) is f_hat of scales 0..2 at full size, flattened row-major
    f3 = tok.indices_to_fhat(idx[:3])
    torch.testing.assert_close(x[:, -16:], f3.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    # scale 1's input is area(f_hat of scale 0, 2x2)
    f1 = F.interpolate(tok.indices_to_fhat(idx[:1]), size=(2, 2), mode="area")
    torch.testing.assert_close(x[:, :4], f1.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    # the masked-branch input is each scale's own (non-accumulated) contribution
    xm = tok.masked_inputs(idx)
    c2 = F.interpolate(tok.quantize.contributions(idx)[2], size=(3, 3), mode="area")
    torch.testing.assert_close(xm[:, 4:13], c2.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)


def test_training_forward_straight_through(tiny):
    *_, tok = tiny
    tok.train()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    rec, vq_loss, hits, idx = tok(img)
    assert rec.shape == img.shape and hits.shape == (4, 64) and hits.sum(1).tolist() == [2, 8, 18, 32]
    (F.mse_loss(rec, img) + vq_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0          # straight-through reaches the encoder
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0       # the codebook learns from the VQ loss
    assert tok.quantize.quant_resi[0].weight.grad.abs().sum() > 0   # and so do the phi convs


def test_other_configs_build():
    vq = VQVAE(tokenizer_config("vqvae-small"))
    img = torch.rand(1, 3, 64, 64) * 2 - 1  # 4 levels: downsample 8, last scale 8
    idx = vq.img_to_indices(img)
    assert [t.shape[1] for t in idx] == [1, 4, 9, 16, 36, 64]
    for share in (0, 1):
        v = VQVAE(tokenizer_config("vqvae-tiny", share_quant_resi=share))
        assert v.indices_to_img(v.img_to_indices(torch.zeros(1, 3, 64, 64))).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("n,size", [(1, 16), (2, 16), (5, 16), (13, 16), (9, 32), (24, 32), (4, 7)])
def test_bicubic_up_is_pytorch_bicubic(n, size):
    """The matrix form of the bicubic resize equals F.interpolate: exactly in float64, to rounding in fp32."""
    x = torch.randn(3, 4, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ref = F.interpolate(x, (size, size), mode="bicubic")
    assert (bicubic_up(x, size) - ref).abs().max() < 1e-12
    x32 = x.float()
    assert (bicubic_up(x32, size) - F.interpolate(x32, (size, size), mode="bicubic")).abs().max() < 2e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast does not lower it to bf16
        assert bicubic_up(x32, size).dtype == torch.float32
    assert bicubic_up(torch.empty(2, 4, n, n, device="meta"), size).shape == (2, 4, size, size)   # shapes only


def test_quantizer_upsampling_keeps_one_matrix_per_shape(tiny):
    q = tiny[-1].quantize
    h = torch.randn(2, q.z_channels, 3, 3)
    size = q.patch_nums[-1]
    ref = F.interpolate(h, (size, size), mode="bicubic")
    assert (q._full(h, size) - ref).abs().max() < 2e-6
    q._full(h * 2, size)
    assert sum(k[:2] == (3, size) for k in q._bicubic) == 1
