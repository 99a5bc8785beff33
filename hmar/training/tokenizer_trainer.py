"""Training the multi-scale residual VQ-VAE (``hmar train-tokenizer``).

Loss = ``l1 * |x - x'| + l2 * (x - x')^2`` (+ ``perceptual``) + ``vq_weight * VQ`` (codebook + beta x
commitment, inside the quantiser) (+ after ``disc_start`` steps: adaptive-weighted hinge GAN loss against a
PatchGAN). Codebook statistics: per-scale EMA of code hits (``quantize.ema_vocab_hit_SV``: copy, then
factor 0.9 for 100 updates, then 0.99), and codes unused for ``dead_code_steps`` steps are re-initialised
with residual vectors of the current batch (at step 0 this initialises the whole codebook from data).
Per epoch: reconstruction PSNR and the share of codes in use per scale. Writes ``RUNDIR/tokenizer``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HMARError
from ..presets import TokenizerConfig, tokenizer_config
from ..tokenizer import VQVAE
from .checkpointing import (CheckpointManager, already_finished, gather_log_window, get_states, require_fresh_or_resume,
                            restore_position, resume_point, set_states, this_rank_log_window)
from .config import TokenizerTrainConfig, check_common, config_to_dict, preset_config
from .data import (CorruptFiles, EpochBatches, EvalBatches, PaddedEval, build_image_data, check_batch_fits,
                   is_token_cache, make_loader)
from .distributed import DistInfo, all_reduce_, all_reduce_max, broadcast_, cleanup, init_distributed, seed_everything, wrap_model
from .gan import PatchDiscriminator, PerceptualLoss, adaptive_weight, hinge_d_loss
from .loop import amp_dtype_for, discard_run_dir
from .interrupt import GracefulStop, end_of_step
from .metrics import RunLogger, Throughput, check_finite_loss, psnr
from .optim import clip_and_step
from .schedule import Schedule, TimeBudget
from .tokenizer_io import save_tokenizer

USAGE_FRACTION = 0.08   # a code is "used" at a scale if its EMA hits >= 0.08 x the uniform share (official)


class _TokForward(nn.Module):
    """VQVAE forward that also returns the (detached) encoder features, for dead-code re-initialisation."""

    def __init__(self, vq: VQVAE):
        super().__init__()
        self.vq = vq

    def forward(self, img: torch.Tensor):
        f = self.vq.encode_features(img)
        f_st, vq_loss, hits, _ = self.vq.quantize(f)
        rec = self.vq.decoder(self.vq.post_quant_conv(f_st))
        return rec, vq_loss, hits, f.detach()


@torch.no_grad()
def residual_pool(quant: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """All residual vectors the quantiser looks up while encoding ``f``: ``[sum_k B pn_k^2, Cz]``."""
    f = f.float()
    size = f.shape[-1]
    rest, pool = f.clone(), []
    for si, pn in enumerate(quant.patch_nums):
        z = rest if pn == size else F.interpolate(rest, size=(pn, pn), mode="area")
        pool.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        idx = quant.nearest(z)
        rest -= quant.scale_contribution(si, quant.lookup(idx, pn), size)
    return torch.cat(pool)


def update_ema_hits(ema: torch.Tensor, hits: torch.Tensor, updates: int) -> None:
    """Official EMA of per-scale code hits: copy the first counts, then factor 0.9 (100 updates), then 0.99."""
    if updates == 0:
        ema.copy_(hits)
    else:
        m = 0.9 if updates < 100 else 0.99
        ema.mul_(m).add_(hits, alpha=1 - m)


def code_usage(ema: torch.Tensor) -> List[float]:
    """Per scale, % of codes whose EMA hits reach ``0.08 x`` the uniform share."""
    V = ema.shape[1]
    thresh = USAGE_FRACTION * ema.sum(1, keepdim=True) / V
    return [round(float(x) * 100, 2) for x in ((ema >= thresh) & (ema > 0)).float().mean(1)]


class TokenizerTrainer:
    """End-to-end VQ-VAE training (single process or torchrun DDP)."""

    def __init__(self, cfg: TokenizerTrainConfig):
        self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.device)
        self.run_dir = Path(cfg.out)
        if cfg.batch_size < 1 or cfg.batch_size % self.info.world:
            raise HMARError(f"--batch-size {cfg.batch_size} must be a positive multiple of the {self.info.world} processes")
        if cfg.l1 <= 0 and cfg.l2 <= 0 and not cfg.perceptual:
            raise HMARError("no reconstruction loss: give --l1 and/or --l2 a positive weight")
        if is_token_cache(cfg.data):
            raise HMARError("train-tokenizer needs an image folder, not a token cache")
        check_common(cfg)
        require_fresh_or_resume(self.run_dir, cfg.resume)
        existed = self.run_dir.exists()
        self.log = RunLogger(self.run_dir, self.info.is_main, cfg.tensorboard)
        self.say = self.log.info if self.info.is_main else self._rank_warning
        try:
            self._build()
        except HMARError:
            discard_run_dir(self.log, self.run_dir, existed)
            raise

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        dev = self.info.device
        tcfg = preset_config(tokenizer_config, TokenizerConfig, cfg.preset, cfg.tokenizer_override,
                             "--tokenizer-override")
        self.data = build_image_data(cfg.data, tcfg.resolution, cfg.hflip, cfg.seed)
        check_batch_fits(len(self.data.train), cfg.batch_size, cfg.data, self.log.info)   # main process only
        torch.manual_seed(cfg.seed)
        self.vq = VQVAE(tcfg).to(dev).train()   # TokenizerConfig checked the sizes
        self.fwd = wrap_model(_TokForward(self.vq), self.info)
        self.opt = torch.optim.AdamW(self.vq.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        self.disc: Optional[nn.Module] = None
        if cfg.disc:
            self.disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(dev).train()
            self.disc_fwd = wrap_model(self.disc, self.info)
            self.dopt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
        self.perc = PerceptualLoss(cfg.perceptual).to(dev) if cfg.perceptual else None
        self.amp = amp_dtype_for(cfg.precision, dev)
        n = len(self.data.train)
        self.ipe = EpochBatches.batches_per_epoch(n, cfg.batch_size)
        self.total = cfg.max_steps if cfg.max_steps else cfg.epochs * self.ipe
        if cfg.time_budget:   # the budget sets the length (fitted from the step time after a few steps)
            self.total = TimeBudget.UNFITTED
        self.schedule = Schedule(cfg.lr, self.total, min(cfg.warmup_steps, self.total), "const", 0.0, 1.0, 0.0, 0.0)
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", cfg.keep_last, self.info)
        self.corrupt = CorruptFiles(self.say)
        V = tcfg.vocab_size
        self.last_used = torch.full((V,), -(10 ** 9), dtype=torch.long, device=dev)
        self.ema_updates = 0
        self.step, self.epoch, self.batch = 0, 0, 0
        self.sums: Dict[str, float] = {}   # this process's running sums of the epoch report's window
        self.count = 0
        nparams = sum(p.numel() for p in self.vq.parameters())
        self.say(f"tokenizer training: {cfg.preset} ({nparams / 1e6:.2f}M params, {tcfg.resolution}px, vocab {V}, "
                 f"scales {tuple(tcfg.patch_nums)}) on {n} images of {len(self.data.class_names)} classes; "
                 f"{self.info.world} process(es) on {dev}, batch {cfg.batch_size}, "
                 + (f"steps fitted to --time-budget {cfg.time_budget:g}s" if cfg.time_budget else f"{self.total} steps")
                 + "; losses: "
                 f"l1 {cfg.l1}, l2 {cfg.l2}, vq {cfg.vq_weight}"
                 + (f", perceptual {cfg.perceptual_weight}" if self.perc else "")
                 + (f", GAN {cfg.disc_weight} from step {cfg.disc_start}" if self.disc is not None else ""))

    def _rank_warning(self, msg: str) -> None:
        """Other ranks print only warnings (e.g. unreadable files in their shard)."""
        if msg.startswith("warning"):
            print(f"[rank {self.info.rank}] {msg}", file=sys.stderr)

    # ---------------------------------------------------------------- pieces
    def _reinit_dead_codes(self, f: torch.Tensor) -> int:
        """Replace codes unused for ``dead_code_steps`` steps by random residual vectors of this batch
        (chosen on rank 0 and broadcast); their Adam moments are reset. Returns how many were replaced."""
        K = self.cfg.dead_code_steps
        if K <= 0:
            return 0
        dead = (self.step - self.last_used) >= K
        n = int(dead.sum())
        if n == 0:
            return 0
        emb = self.vq.quantize.embedding.weight
        with torch.no_grad():
            pool = residual_pool(self.vq.quantize, f)
            g = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 7919 + self.step)
            pick = torch.randint(0, pool.shape[0], (n,), generator=g).to(pool.device) if pool.shape[0] < n else \
                torch.randperm(pool.shape[0], generator=g)[:n].to(pool.device)
            new = pool[pick]
            if pool.shape[0] < n:
                new = new + 0.01 * new.std() * torch.randn(new.shape, generator=g).to(new.device)
            w = emb.data.clone()
            w[dead] = new.to(w.dtype)
            broadcast_(w, self.info)
            emb.data.copy_(w)
            st = self.opt.state.get(emb, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k][dead] = 0
        self.last_used[dead] = self.step
        return n

    def _train_step(self, x: torch.Tensor) -> Dict[str, Any]:
        cfg = self.cfg
        lr, _ = self.schedule(self.step)
        for o in [self.opt] + ([self.dopt] if self.disc is not None else []):
            for g in o.param_groups:
                g["lr"] = lr
        dev = self.info.device
        with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            rec, vq_loss, hits, f = self.fwd(x)
        rec = rec.float()
        l1 = (x - rec).abs().mean()
        l2 = F.mse_loss(rec, x)
        nll = cfg.l1 * l1 + cfg.l2 * l2
        out: Dict[str, Any] = {"l1": l1.detach(), "l2": l2.detach(), "vq": vq_loss.detach()}
        if self.perc is not None:
            p = self.perc(x, rec)
            nll = nll + cfg.perceptual_weight * p
            out["perceptual"] = p.detach()
        loss = nll + cfg.vq_weight * vq_loss
        gan_on = self.disc is not None and self.step >= cfg.disc_start
        if gan_on:
            self.disc.requires_grad_(False)
            with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                g_loss = -self.disc(rec).float().mean()
            w = adaptive_weight(nll, g_loss, self.vq.decoder.conv_out.weight) * cfg.disc_weight
            loss = loss + w * g_loss
            out.update(g_loss=g_loss.detach(), gan_w=w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(self.opt, list(self.vq.parameters()), cfg.grad_clip)
        if gan_on:
            self.disc.requires_grad_(True)
            with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = self.disc_fwd(torch.cat([x, rec.detach()])).float()
            real, fake = logits.chunk(2)
            d_loss = hinge_d_loss(real, fake)
            self.dopt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.dopt.step()
            out["d_loss"] = d_loss.detach()
        # codebook statistics (global over processes)
        hits = all_reduce_(hits.detach().clone(), self.info)
        update_ema_hits(self.vq.quantize.ema_vocab_hit_SV, hits, self.ema_updates)
        self.ema_updates += 1
        self.last_used[hits.sum(0) > 0] = self.step
        out["reinit"] = self._reinit_dead_codes(f)
        out["loss"] = loss.detach()
        out["psnr"] = psnr(rec.detach(), x)
        return out

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """PSNR of centre-crop reconstructions of the val split (or of the training images)."""
        ds = self.data.val
        if ds is None:
            from .data import ImageFolderDataset
            tr = self.data.train
            ds = ImageFolderDataset(tr.root, tr.resolution, train=False, seed=self.cfg.seed,
                                    class_names=tr.class_names)
        local = self.cfg.batch_size // self.info.world
        loader = make_loader(PaddedEval(ds), EvalBatches(len(ds), local, self.info.rank, self.info.world,
                                                         self.cfg.eval_batches), self.cfg.workers)
        self.vq.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        first = None
        for batch in loader:
            x = batch["img"].to(self.info.device)
            valid = (batch["index"] >= 0).to(self.info.device)
            rec = self.vq.indices_to_img(self.vq.img_to_indices(x))
            a, b = ((x + 1) / 2).clamp(0, 1), ((rec + 1) / 2).clamp(0, 1)
            p = 10 * torch.log10(1.0 / ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10))
            tot += torch.stack([(p * valid).sum().double(), valid.sum().double()])
            if first is None:
                first = (x[:8].cpu(), rec[:8].cpu())
        self.vq.train()
        all_reduce_(tot, self.info)
        if first is not None and self.info.is_main:
            from ..pipeline import make_grid, to_pil
            x, r = first
            path = self.run_dir / "samples" / f"recon_epoch_{self.epoch:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            make_grid(to_pil((torch.cat([x, r]) + 1) / 2), ncols=x.shape[0]).save(path)
        return {"psnr": float(tot[0] / tot[1].clamp(min=1))}

    def save_checkpoint(self) -> None:
        opts = [self.opt]
        payload: Dict[str, Any] = {"states": get_states(self.fwd, opts, self.info), "epoch": self.epoch,
                                   "batch": self.batch, "stage": "tokenizer", "last_used": self.last_used.cpu(),
                                   "ema_updates": self.ema_updates, "corrupt": sorted(self.corrupt.seen),
                                   "num_train": len(self.data.train),
                                   "log_window": gather_log_window((dict(self.sums), self.count), self.info),
                                   "config": config_to_dict(self.cfg)}
        if self.disc is not None:
            payload["disc"] = get_states(self.disc_fwd, [self.dopt], self.info)
        path = self.ckpts.save(self.step, payload)
        if path is not None:
            self.say(f"saved checkpoint {path}")

    def _resume(self) -> bool:
        """Restore the newest checkpoint; True when the run had already finished (nothing restored)."""
        ck = resume_point(self, "tokenizer")
        if ck is None:
            return False
        if already_finished(self, ck, self.run_dir / "tokenizer"):
            return True
        try:
            set_states(self.fwd, [self.opt], ck["states"], self.info)
            if self.disc is not None and "disc" in ck:
                set_states(self.disc_fwd, [self.dopt], ck["disc"], self.info)
        except (RuntimeError, KeyError, ValueError) as e:
            raise HMARError(f"{ck['path']} does not fit this tokenizer ({str(e).splitlines()[0][:160]}): resume "
                            "with the options of the original run") from None
        self.last_used = ck["last_used"].to(self.info.device)
        self.ema_updates = int(ck["ema_updates"])
        window = this_rank_log_window(ck, self.info)
        if window is not None:   # same processes: continue this rank's epoch-report window
            self.sums, self.count = dict(window[0]), int(window[1])
        restore_position(self, ck)
        return False

    # ---------------------------------------------------------------- loop
    def run(self) -> Path:
        """Train; returns ``RUNDIR/tokenizer``."""
        cfg, info = self.cfg, self.info
        if cfg.resume:
            if self._resume():   # finished: leave metrics, checkpoints and the tokenizer as they are
                self.log.close()
                cleanup(info)
                return self.run_dir / "tokenizer"
        else:
            seed_everything(cfg.seed * 1000 + info.rank + 1)
        if info.is_main:
            self.log.record(0, "config", {"train": config_to_dict(cfg), "tokenizer": self.vq.config.to_dict(),
                                          "world": info.world}, echo=False)
        from tqdm.auto import tqdm
        bar = tqdm(total=None if cfg.time_budget else self.total, initial=self.step, unit="step",
                   dynamic_ncols=True, disable=not (info.is_main and cfg.progress), desc="tokenizer")
        self.log.bar = bar if not bar.disable else None
        meter = Throughput()
        saved = evaluated = False
        t0 = time.time()
        budget = TimeBudget(cfg.time_budget) if cfg.time_budget else None
        with GracefulStop(info) as stop:
            while self.step < self.total:
                sampler = EpochBatches(len(self.data.train), cfg.batch_size, info.rank, info.world, cfg.seed,
                                       self.epoch, start=self.batch)
                for batch in make_loader(self.data.train, sampler, cfg.workers, info.device.type == "cuda"):
                    if batch["bad"]:
                        self.corrupt.update(batch["bad"])
                    x = batch["img"].to(info.device, non_blocking=True)
                    out = self._train_step(x)
                    for k, v in out.items():
                        self.sums[k] = self.sums.get(k, 0.0) + float(v)
                    self.count += 1
                    meter.add(cfg.batch_size)
                    self.step += 1
                    self.batch += 1
                    end_epoch = self.batch >= self.ipe
                    bar.update(1)
                    if budget is not None:
                        new = budget.total(self.step, self.total, (lambda v: all_reduce_max(v, info)) if info.initialized else None)
                        if new != self.total:
                            self.total = self.schedule.total = bar.total = new
                            end_epoch = end_epoch or self.step >= self.total
                    saved = evaluated = False
                    if self.step % cfg.log_every == 0:
                        bar.set_postfix(loss=f"{float(out['loss']):.4f}", psnr=f"{out['psnr']:.2f}", refresh=False)
                    if end_epoch or self.step >= self.total:
                        self._epoch_report(self.sums, self.count, meter.rate())
                        self.sums, self.count = {}, 0
                        evaluated = True
                    if end_epoch:
                        self.epoch, self.batch = self.epoch + 1, 0
                    saved = end_of_step(self, stop, bar, cfg.ckpt_every, end_epoch)
                    if self.step >= self.total or end_epoch:
                        break
        bar.close()
        self.log.bar = None
        if not evaluated and self.count:
            self._epoch_report(self.sums, self.count, meter.rate())
        if not saved:
            self.save_checkpoint()
        out_dir = self.run_dir / "tokenizer"
        if info.is_main:
            save_tokenizer(out_dir, self.vq, extra={"class_names": self.data.class_names,
                                                    "training": {"steps": self.step}})
        if self.corrupt.count:
            self.say(f"{self.corrupt.count} unreadable image(s) were skipped (listed above)")
        self.say(f"done: {self.step} steps in {time.time() - t0:.1f}s; tokenizer: {out_dir}")
        self.log.close()
        cleanup(info)
        return out_dir

    def _epoch_report(self, sums: Dict[str, float], count: int, img_s: float) -> None:
        means = torch.tensor([sums[k] / max(count, 1) for k in sorted(sums)], dtype=torch.float64,
                             device=self.info.device)
        all_reduce_(means, self.info, "mean")
        rec = {k: round(float(v), 5) for k, v in zip(sorted(sums), means.tolist()) if k != "reinit"}
        check_finite_loss(rec.get("loss", 0.0), self.step, self.run_dir)
        rec["reinit_codes"] = int(sums.get("reinit", 0))
        rec["usage_pct"] = code_usage(self.vq.quantize.ema_vocab_hit_SV)
        rec["img_s"] = round(img_s, 2)
        rec["epoch"] = self.epoch
        rec["corrupt_files"] = self.corrupt.count
        rec.update({f"val_{k}": round(v, 4) for k, v in self.evaluate().items()})
        if self.info.is_main:
            self.log.record(self.step, "epoch", rec)
