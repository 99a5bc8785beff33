"""The multi-scale residual VQ-VAE tokenizer (VAR's, configurable).

>>> from hmar.tokenizer import VQVAE
>>> vq = VQVAE()                      # the official vae_ch160v4096z32 layout
>>> idx = vq.img_to_indices(img)      # list of [B, pn*pn] index maps, coarse to fine
>>> img2 = vq.indices_to_img(idx)     # decoded image in [-1, 1]
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import HMARError
from ..presets import TokenizerConfig
from .autoencoder import Decoder, Encoder
from .quantizer import MultiScaleQuantizer, phi_index_table


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale residual quantiser -> post_quant_conv -> decoder.

    Images are ``[B, 3, R, R]`` in ``[-1, 1]`` with ``R = patch_nums[-1] * 2**(len(ch_mult)-1)``.
    """

    def __init__(self, config: Optional[TokenizerConfig] = None, **overrides):
        super().__init__()
        cfg = config or TokenizerConfig(**overrides)
        self.config = cfg
        kw = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                  dropout=cfg.dropout, using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa, groups=cfg.norm_groups)
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums, cfg.beta,
                                            cfg.quant_resi, cfg.share_quant_resi)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return self.quantize.patch_nums

    def set_patch_nums(self, patch_nums: Sequence[int]) -> None:
        """Switch the scale schedule (e.g. to the one a transformer was trained with)."""
        self.quantize.set_patch_nums(patch_nums)
        self.config.patch_nums = self.quantize.patch_nums

    # -------------------------------------------------------------- encode / decode
    def encode_features(self, img: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``f = quant_conv(encoder(img))``: ``[B, Cz, H, W]``."""
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def img_to_indices(self, img: torch.Tensor) -> List[torch.Tensor]:
        """Image in [-1, 1] -> list over scales of ``[B, pn*pn]`` code indices (row-major)."""
        R = self.config.resolution
        if img.dim() != 4 or tuple(img.shape[1:]) != (3, R, R):
            raise HMARError(f"images must be [B, 3, {R}, {R}] (the last scale {self.patch_nums[-1]} x the "
                            f"downsampling factor {self.config.downsample}), got {list(img.shape)}: resize them, or "
                            "set_patch_nums() to a schedule whose last scale is the image side / "
                            f"{self.config.downsample}")
        return self.quantize.encode(self.encode_features(img))

    def fhat_to_img(self, f_hat: torch.Tensor, max_batch: Optional[int] = None) -> torch.Tensor:
        """Decode an accumulated latent ``f_hat`` to an image clamped to [-1, 1], ``max_batch`` images at a time
        (default: :func:`decode_chunk`'s choice, which bounds the decoder's activation memory; every image is
        decoded on its own, so the chunking does not change the result)."""
        return decode_in_chunks(lambda f: self.decoder(self.post_quant_conv(f)).clamp(-1, 1), f_hat,
                                max_batch or decode_chunk(self.config, f_hat.shape[0], f_hat.element_size()))

    def indices_to_fhat(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of the per-scale contributions of ``indices`` (the accumulated reconstruction): the first
        ``len(indices)`` scales of the schedule, each ``[B, pn*pn]`` integer codes."""
        pns = self.patch_nums
        if not 0 < len(indices) <= len(pns):
            raise HMARError(f"got index maps of {len(indices)} scales; the tokenizer's schedule {pns} has "
                            f"{len(pns)}: pass a non-empty prefix of it (set_patch_nums() for another schedule)")
        for si, (idx, pn) in enumerate(zip(indices, pns)):
            if idx.dim() != 2 or idx.shape != (indices[0].shape[0], pn * pn) or idx.is_floating_point():
                raise HMARError(f"the index map of scale {si} must be integer codes of shape [B, {pn * pn}] "
                                f"({pn}x{pn}, row-major, B as at scale 0), got {idx.dtype} {list(idx.shape)}")
        return self.quantize.indices_to_fhat(indices)

    def indices_to_img(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode per-scale indices to an image in [-1, 1]."""
        return self.fhat_to_img(self.indices_to_fhat(indices))

    def next_scale_inputs(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the next-scale branch, ``[B, L-1, Cz]`` (see the quantiser)."""
        return self.quantize.next_scale_inputs(indices)

    def masked_inputs(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the masked branch, ``[B, L-1, Cz]`` (see the quantiser)."""
        return self.quantize.masked_inputs(indices)

    def forward(self, img: torch.Tensor):
        """Training pass: returns (reconstruction (unclamped), VQ loss, per-scale code hits, indices)."""
        f_st, vq_loss, hits, idx = self.quantize(self.encode_features(img))
        return self.decoder(self.post_quant_conv(f_st)), vq_loss, hits, idx

    # -------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict loading that tolerates any row count of the training-only buffer
        ``quantize.ema_vocab_hit_SV`` (the official loader does the same)."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# the largest full-resolution activation of one decode chunk (the decoder keeps a few of them alive)
DECODE_CHUNK_BYTES = 256 * 2 ** 20


def decode_chunk(config: TokenizerConfig, batch: int, element_size: int = 4,
                 budget: int = DECODE_CHUNK_BYTES) -> int:
    """Images per decoder call for a batch of ``batch``: as many as keep one full-resolution activation
    (``ch * ch_mult[0]`` channels at the image size) within ``budget`` bytes, preferring a divisor of ``batch``
    (equal chunks: one shape for a compiled decoder). The official 256 px tokenizer in bf16: 8 of 16 images."""
    res = config.patch_nums[-1] * config.downsample
    per_image = config.ch * config.ch_mult[0] * res * res * element_size
    limit = max(1, min(batch, budget // per_image))
    divisor = max(d for d in range(1, limit + 1) if batch % d == 0)
    return divisor if 2 * divisor >= limit else limit


def decode_in_chunks(decode, f_hat: torch.Tensor, max_batch: int) -> torch.Tensor:
    """``decode(f_hat)`` computed ``max_batch`` images at a time (one call when the batch fits)."""
    if f_hat.shape[0] <= max_batch:
        return decode(f_hat)
    return torch.cat([decode(part) for part in f_hat.split(max_batch)])


__all__ = ["VQVAE", "TokenizerConfig", "MultiScaleQuantizer", "phi_index_table", "decode_chunk", "decode_in_chunks"]
