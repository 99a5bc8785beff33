"""Adversarial and perceptual parts of the tokenizer loss: a PatchGAN discriminator, hinge losses, the
adaptive GAN weight, and a perceptual loss from a user-supplied (local) TorchScript feature network."""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HMARError


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) or 1, ch)


class PatchDiscriminator(nn.Module):
    """A PatchGAN: stride-2 4x4 convs (``layers`` of them), a stride-1 conv, and a 1-channel 4x4 output conv;
    one real/fake logit per overlapping patch. GroupNorm instead of BatchNorm (DDP- and batch-size-safe)."""

    def __init__(self, in_ch: int = 3, ch: int = 64, layers: int = 3):
        super().__init__()
        mods: List[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for i in range(1, layers):
            nc = ch * min(2 ** i, 8)
            mods += [nn.Conv2d(c, nc, 4, 2, 1, bias=False), _gn(nc), nn.LeakyReLU(0.2, True)]
            c = nc
        nc = ch * min(2 ** layers, 8)
        mods += [nn.Conv2d(c, nc, 4, 1, 1, bias=False), _gn(nc), nn.LeakyReLU(0.2, True), nn.Conv2d(nc, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``, halved."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """``||d rec / d W_last|| / (||d g / d W_last|| + 1e-4)``, clamped to ``[0, max_weight]`` and detached:
    balances the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualLoss(nn.Module):
    """Feature distance under a frozen TorchScript network loaded from a local file (never downloaded).

    The network takes images in ``[-1, 1]`` and returns a tensor or a list/tuple of feature maps; the loss is
    the mean over maps of the squared difference of channel-normalised features (LPIPS without learned
    weights)."""

    def __init__(self, path: Union[str, Path]):
        super().__init__()
        p = Path(path)
        if not p.is_file():
            raise HMARError(f"--perceptual {str(p)!r} does not exist: pass a local TorchScript feature network "
                            "(nothing is downloaded)")
        try:
            self.net = torch.jit.load(str(p), map_location="cpu").eval()
        except Exception as e:
            raise HMARError(f"--perceptual {str(p)!r} is not a TorchScript file ({type(e).__name__})") from None
        for q in self.net.parameters():
            q.requires_grad_(False)

    def _feats(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = self.net(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        fx, fy = self._feats(x), self._feats(y)
        for a, b in zip(fx, fy):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            loss = loss + ((a - b) ** 2).mean()
        return loss / max(len(fx), 1)
