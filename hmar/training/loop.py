"""The transformer training loop (stage 1 next-scale / VAR, stage 2 masked), torchtitan-style:

    trainer = Trainer(TrainConfig(data=..., tokenizer=..., out=...))
    trainer.run()          # -> RUNDIR/model (save_pretrained), checkpoints/, log.txt, metrics.jsonl, samples/

:func:`train_step` is the one optimiser step both the loop and ``benchmarks/bench_train.py`` run.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HMARError
from ..model import HMAR, build_model, init_weights
from ..model.blocks import SelfAttention
from ..model.fp8 import check_supported as check_fp8
from ..model.fp8_training import TRAIN_INSTEAD, fp8_shapes_ok, to_float8_training
from ..presets import ModelConfig, model_config
from .checkpointing import (CheckpointManager, already_finished, gather_log_window, get_states, require_fresh_or_resume,
                            restore_position, resume_point, set_states, this_rank_log_window)
from .config import TrainConfig, check_common, config_to_dict, preset_config
from .data import (CorruptFiles, EpochBatches, EvalBatches, PaddedEval, TrainData, build_data, check_batch_fits,
                   check_cache_fits, check_data_options, is_token_cache, make_loader, quantizer_fingerprint,
                   read_token_cache)
from .distributed import (DistInfo, all_reduce_, all_reduce_max, cleanup, init_distributed,
                          seed_everything, wrap_model)
from .fused_ce import linear_cross_entropy
from .losses import (draw_masks, masked_ce, masked_coefficients, per_scale_stats, scale_loss_weights, split_scales,
                     token_loss_weights, weighted_ce, weighted_coefficients)
from .interrupt import GracefulStop, end_of_step
from .metrics import RunLogger, Throughput, check_finite_loss
from .optim import apply_schedule, build_adamw, clip_and_step, clip_grads, param_groups
from .schedule import Schedule, TimeBudget, is_due
from .tokenizer_io import load_tokenizer


# ------------------------------------------------------------------------------------ the step
class TrainForward(nn.Module):
    """What DDP / FSDP / torch.compile wrap: one ``forward`` for both stages, so that the wrappers' hooks
    (gradient reduction, parameter gathering) run for the masked branch too.

    Without ``target`` it returns the logits ``[B, L, V]``. With ``target`` ``[B, L]`` and the per-token loss
    coefficients ``coef`` ``[B, L]`` it returns ``(loss, ce, pred)`` from the chunked head + cross-entropy
    (:func:`hmar.training.fused_ce.linear_cross_entropy`): the head runs inside this ``forward``, so FSDP has
    its parameters gathered and torch.compile sees it in the same graph. ``backend``: the attention backend
    (``None``: chosen per call)."""

    def __init__(self, model: nn.Module, stage: str, backend: Optional[str] = None, label_smoothing: float = 0.0,
                 ce_chunk: Optional[int] = None):
        super().__init__()
        self.model, self.stage = model, stage
        self.backend, self.label_smoothing, self.ce_chunk = backend, label_smoothing, ce_chunk

    def forward(self, labels: torch.Tensor, x_ns: torch.Tensor, x_cur: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None,
                coef: Optional[torch.Tensor] = None) -> Any:
        masked = self.stage == "masked"
        if target is None:
            if masked:
                return self.model.forward_masked(labels, x_ns, x_cur, mask, backend=self.backend)
            return self.model(labels, x_ns, backend=self.backend)
        if masked:
            h = self.model.features_masked(labels, x_ns, x_cur, mask, backend=self.backend)
        else:
            h = self.model.features(labels, x_ns, backend=self.backend)
        head = self.model.output_head(masked)
        return linear_cross_entropy(h, head.weight, head.bias, target, coef, self.label_smoothing, self.ce_chunk)


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks FSDP shards one by one."""
    if isinstance(model, HMAR):
        return [*model.base_blocks, *model.ns_blocks, *model.mask_blocks]
    return list(model.blocks)


# the ModelConfig fields that fix the parameters' meaning: a checkpoint must agree on them to be resumed
_ARCHITECTURE = ("kind", "depth", "embed_dim", "num_heads", "mlp_ratio", "num_classes", "vocab_size", "z_channels",
                 "patch_nums", "branch_depth", "attn_l2_norm", "norm_eps")

QK_NORM_MODES = ("auto", "ops", "kernels")
"""Where training normalises q and k (:func:`prepare_training`'s ``qk_norm``)."""
COMPILE_SCOPES = ("model", "blocks")
"""What ``--compile`` compiles in training (:func:`prepare_training`'s ``compile_scope``)."""
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes (:func:`prepare_training`'s ``compile_mode``; None: the default)."""


@dataclass
class StepState:
    """Everything :func:`train_step` needs."""
    module: nn.Module                     # the wrapped (DDP/FSDP/compiled) TrainForward
    wrapped: nn.Module                    # the same before torch.compile (for state dicts)
    model: nn.Module                      # the raw transformer
    optimizer: torch.optim.Optimizer
    params: List[nn.Parameter]            # trainable parameters
    quantizer: nn.Module                  # the tokenizer's quantiser (teacher-forcing inputs)
    stage: str
    token_weights: torch.Tensor           # [L] on the device (stage 1)
    amp_dtype: Optional[torch.dtype]
    scaler: Optional[Any]
    grad_clip: float
    label_smoothing: float
    mask_loss: str
    info: DistInfo
    fsdp: bool = False
    chunked_ce: bool = False              # chunked head + CE (the [B, L, V] logits never exist)
    cuda_graphs: bool = False             # compiled in reduce-overhead mode
    clip_in_kernel: bool = True           # the clipping inside the fused AdamW kernel (clip_and_step)

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return tuple(self.model.config.patch_nums)


def amp_dtype_for(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """autocast dtype: ``auto`` = bf16 on CUDA, none (fp32) on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def qk_norm_in_kernels(mode: str, device: torch.device, backend: Optional[str]) -> bool:
    """Whether training normalises q and k inside the Triton attention kernels (``mode``: ``kernels``; ``ops``: as
    torch ops of their own; ``auto``: kernels where the Triton backend runs, CUDA with the ``auto`` or ``triton``
    backend; ``kernels`` also takes Triton's CPU interpreter, for tests). In the kernels, each attention layer hands
    them its packed qkv projection and gets that projection's gradient back in its own layout
    (:func:`hmar.attention.packed_attention`): no normalisation ops, no stacking of dq, dk, dv (H100, compiled:
    1.09x the step at hmar-d16, 1.06x at hmar-d30, 1.01x at hmar-d16-512, BENCHMARKS.md 2o). Calls the kernels do
    not take (a head dim other than 64 / 128) run as ops either way."""
    if mode not in QK_NORM_MODES:
        raise HMARError(f"--qk-norm: {mode!r} is not one of {', '.join(QK_NORM_MODES)}")
    if mode == "ops":
        return False
    from ..attention import triton_kernel_runs_on
    able = backend in (None, "triton") and triton_kernel_runs_on(device)   # (the Triton backend normalises q, k)
    if mode == "kernels" and not able:
        raise HMARError("--qk-norm kernels: the q/k normalisation runs inside the Triton attention kernels, which "
                        "need the triton package, a CUDA device and --attention-backend auto or triton; use "
                        "--qk-norm auto or ops here")
    return able and (mode == "kernels" or torch.device(device).type == "cuda")   # (auto: not the CPU interpreter)


def prepare_training(model: nn.Module, quantizer: nn.Module, stage: str, info: DistInfo, *, loss_weight: str = "gaussian",
                     precision: str = "auto", fused: str = "auto", betas: Tuple[float, float] = (0.9, 0.95),
                     lr: float = 1e-4, grad_clip: float = 2.0, label_smoothing: float = 0.0, mask_loss: str = "token",
                     fsdp: bool = False, compile: bool = False, chunked_ce: bool = True,
                     attention_backend: str = "auto", ce_chunk: Optional[int] = None,
                     compile_backend: str = "inductor", compile_scope: str = "model",
                     compile_mode: Optional[str] = None, fp8: bool = False, qk_norm: str = "auto") -> StepState:
    """Freeze what the stage does not train, move to the device, wrap (DDP/FSDP, compile) and build AdamW.

    ``chunked_ce``: the head + cross-entropy in chunks of ``ce_chunk`` tokens (default: 128 MiB of fp32 logits
    per chunk), same loss and gradients as the plain path. ``attention_backend``: auto (chosen per call, see
    :func:`hmar.attention.choose_backend`), reference, per_scale or triton. ``compile_scope`` (with ``compile``):
    ``model``, the whole forward as one graph, or ``blocks``, each transformer block and AdaLN head compiled on its
    own (:func:`hmar.accel.compile_blocks`, torchtitan's regional compilation): every block shares one compiled
    graph, so the compile time does not grow with depth; the embedding and the chunked head + CE stay eager. Both
    work under DDP and FSDP2 (the blocks are compiled before they are wrapped; FSDP's hooks run around them).
    ``compile_mode``: torch.compile's (None or ``default``; ``reduce-overhead`` replays the compiled forward and
    backward as CUDA graphs, :func:`train_step` marks each step's start for them). ``fp8``: the blocks' four
    linears multiply in fp8 in the forward and the backward (:mod:`hmar.model.fp8_training`; same parameters and
    checkpoints). ``qk_norm``: where the attention layers normalise q and k (:func:`qk_norm_in_kernels`; sets
    :attr:`hmar.model.blocks.SelfAttention.fused_qk_norm`)."""
    if compile_scope not in COMPILE_SCOPES:
        raise HMARError(f"--compile-scope: {compile_scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    if compile_mode not in COMPILE_MODES:
        raise HMARError(f"--compile-mode: {compile_mode!r} is not one of {', '.join(map(str, COMPILE_MODES[1:]))}")
    mode = None if compile_mode == "default" else compile_mode
    dev = info.device
    from ..attention import check_backend
    try:
        backend = check_backend(attention_backend, dev)
    except ValueError as e:
        raise HMARError(f"--attention-backend: {e}") from None
    fused_qk = qk_norm_in_kernels(qk_norm, dev, backend)
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.fused_qk_norm = fused_qk
    if stage == "masked":
        if not isinstance(model, HMAR):
            raise HMARError("stage 2 (masked) trains an HMAR model: build it with HMAR.from_next_scale")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.masked_branch_parameters():
            p.requires_grad_(True)
    model.to(dev).train()
    quantizer.to(dev).eval()
    if fp8:
        try:
            to_float8_training(model)
        except ValueError as e:
            raise HMARError(f"--fp8: {e}") from None
    fwd = TrainForward(model, stage, backend, label_smoothing, ce_chunk)
    if compile and compile_scope == "blocks":
        from ..accel import compile_blocks
        compile_blocks(model, mode, backend=compile_backend, dynamic=None)
    wrapped = wrap_model(fwd, info, fsdp=fsdp, blocks=lambda: transformer_blocks(model))
    whole = compile and compile_scope == "model"
    module = torch.compile(wrapped, backend=compile_backend, mode=mode) if whole else wrapped
    groups = param_groups(wrapped.named_parameters())
    opt = build_adamw(groups, lr, betas, fused, dev)
    amp = amp_dtype_for(precision, dev)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0 ** 11) if amp == torch.float16 else None
    params = [p for g in opt.param_groups for p in g["params"]]
    w = token_loss_weights(model.config.patch_nums, loss_weight).to(dev)
    return StepState(module, wrapped, model, opt, params, quantizer, stage, w, amp, scaler, grad_clip,
                     label_smoothing, mask_loss, info, fsdp, chunked_ce,
                     cuda_graphs=compile and compile_mode == "reduce-overhead")


def train_step(st: StepState, indices: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None,
               metrics: bool = False) -> Dict[str, torch.Tensor]:
    """One optimiser step on token indices ``[B, L]`` (this rank's share) and labels ``[B]``; ``mask``
    ``[B, L]`` for stage 2. Returns detached tensors (``loss``, ``grad_norm``; with ``metrics`` also the
    plain mean CE and accuracy over the trained tokens and the last scale's CE)."""
    if st.cuda_graphs:   # a new step: the CUDA graphs may overwrite the outputs of the step before
        torch.compiler.cudagraph_mark_step_begin()
    idx = split_scales(indices, st.patch_nums)
    masked = st.stage == "masked"
    with torch.no_grad():
        x_ns = st.quantizer.next_scale_inputs(idx)
        x_cur = st.quantizer.masked_inputs(idx) if masked else None
    total = None
    if masked and st.mask_loss == "token" and st.info.world > 1:
        total = all_reduce_(mask.sum().float(), st.info)
    logits = pred = None
    if st.chunked_ce:   # same loss and gradients, without the [B, L, V] logits
        coef = (masked_coefficients(mask, st.mask_loss, total, st.info.world) if masked
                else weighted_coefficients(st.token_weights, indices.shape[0]))
    with torch.autocast(st.info.device.type, dtype=st.amp_dtype or torch.float32, enabled=st.amp_dtype is not None):
        if st.chunked_ce:
            loss, ce, pred = st.module(labels, x_ns, x_cur, mask, indices, coef)
        else:
            logits = st.module(labels, x_ns, x_cur, mask)
    if logits is not None:   # the plain path: loss from the full logits
        if masked:
            loss, ce = masked_ce(logits, indices, mask, st.mask_loss, st.label_smoothing, total, st.info.world)
        else:
            loss, ce = weighted_ce(logits, indices, st.token_weights, st.label_smoothing)
    if st.scaler is not None:
        st.scaler.scale(loss).backward()
        st.scaler.unscale_(st.optimizer)
        gn = clip_grads(st.params, st.grad_clip)   # after the unscale, before the GradScaler's step
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        loss.backward()
        gn = clip_and_step(st.optimizer, st.params, st.grad_clip, st.clip_in_kernel)   # inside the fused AdamW
    st.optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss.detach(), "grad_norm": gn.detach()}
    if metrics:
        with torch.no_grad():
            sel = mask if masked else torch.ones_like(indices, dtype=torch.bool)
            n = sel.sum().clamp(min=1)
            out["ce"] = (ce.detach() * sel).sum() / n
            hit = (pred if pred is not None else logits.detach().argmax(-1)) == indices
            out["acc"] = (hit & sel).sum() / n
            last = st.patch_nums[-1] ** 2
            out["ce_tail"] = (ce.detach()[:, -last:] * sel[:, -last:]).sum() / sel[:, -last:].sum().clamp(min=1)
    return out


# ------------------------------------------------------------------------------------ the trainer
def discard_run_dir(log: RunLogger, run_dir: Path, existed: bool) -> None:
    """After a configuration error: close the log and remove the run directory if this run created it."""
    import shutil
    log.close()
    if not existed and log.enabled:
        shutil.rmtree(run_dir, ignore_errors=True)


def default_adaln_gamma(depth: int) -> float:
    """Official ``alng`` by depth: 1e-3 up to d20, 1e-4 up to d24, 1e-5 beyond."""
    return 1e-3 if depth <= 20 else (1e-4 if depth <= 24 else 1e-5)


class Trainer:
    """Stage 1 (next-scale; HMAR's block-diagonal model or VAR) or stage 2 (masked branch) training."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = init_distributed(cfg.device)
        self.run_dir = Path(cfg.out)
        self.stage = cfg.stage
        if cfg.batch_size < 1 or cfg.batch_size % self.info.world:
            raise HMARError(f"--batch-size {cfg.batch_size} must be a positive multiple of the {self.info.world} "
                            "processes (it is the global batch)")
        check_common(cfg)
        check_data_options(cfg.data, cfg.hflip, cfg.eval_every)
        if cfg.fp8:
            try:
                check_fp8(self.info.device, TRAIN_INSTEAD)
            except ValueError as e:
                raise HMARError(f"--fp8: {e}") from None
        require_fresh_or_resume(self.run_dir, cfg.resume)
        existed = self.run_dir.exists()
        self.log = RunLogger(self.run_dir, self.info.is_main, cfg.tensorboard)
        self.say = self.log.info if self.info.is_main else self._rank_warning
        seed_everything(cfg.seed)
        try:
            self._build()
        except HMARError:
            discard_run_dir(self.log, self.run_dir, existed)
            raise

    def _rank_warning(self, msg: str) -> None:
        """Other ranks print only warnings (e.g. unreadable files in their shard)."""
        if msg.startswith("warning"):
            print(f"[rank {self.info.rank}] {msg}", file=sys.stderr)

    # ---------------------------------------------------------------- construction
    def _build(self) -> None:
        cfg, dev = self.cfg, self.info.device
        init_model, init_tok, init_names = self._load_init() if self.stage == "masked" else (None, None, None)
        cache_meta: Dict[str, Any] = {}
        if is_token_cache(cfg.data):
            _, cache_meta = read_token_cache(cfg.data)
        tok_path = cfg.tokenizer or cache_meta.get("tokenizer_path")
        if init_tok is not None:   # stage 2 keeps the tokenizer stage 1 was trained with
            self.tokenizer = init_tok.to(dev).eval().requires_grad_(False)
            if cfg.tokenizer and quantizer_fingerprint(load_tokenizer(cfg.tokenizer).quantize) != \
                    quantizer_fingerprint(init_tok.quantize):
                raise HMARError(f"--tokenizer {cfg.tokenizer} is not the tokenizer of the stage-1 model {cfg.init}: "
                                "drop --tokenizer (stage 2 uses the stage-1 model's own)")
        elif tok_path is not None:
            self.tokenizer = load_tokenizer(tok_path, device=dev)
        else:
            raise HMARError("no tokenizer: pass --tokenizer DIR (from `hmar train-tokenizer`, an hmar model dir, "
                            "or vae_ch160v4096z32.pth)")
        self.data: TrainData = build_data(cfg.data, self.tokenizer.config.resolution, cfg.hflip, cfg.seed)
        check_batch_fits(len(self.data.train), cfg.batch_size, cfg.data, self.log.info)   # main process only
        self.class_names = list(self.data.class_names)
        self.tokenizer_fp = fp = quantizer_fingerprint(self.tokenizer.quantize)   # frozen: checked and checkpointed
        if self.data.kind == "tokens":
            if cache_meta.get("quantizer_fingerprint") not in (None, fp):
                raise HMARError(f"token cache {cfg.data} was made with another tokenizer (fingerprint "
                                f"{cache_meta.get('quantizer_fingerprint')} vs {fp}): re-run `hmar tokenize` with "
                                f"--tokenizer {cfg.init if init_tok is not None else tok_path}")
        if self.stage == "masked":
            model = init_model
            if model.config.num_classes != len(self.class_names):
                raise HMARError(f"the stage-1 model has {model.config.num_classes} classes but {cfg.data} has "
                                f"{len(self.class_names)}: train stage 2 on the same data as stage 1")
            if init_names and list(init_names) != list(self.class_names):
                diff = next(i for i, (a, b) in enumerate(zip(init_names, self.class_names)) if a != b)
                raise HMARError(f"class {diff} of the stage-1 model is {init_names[diff]!r} but {cfg.data} calls it "
                                f"{self.class_names[diff]!r}: train stage 2 on the same data (same classes, same "
                                "order) as stage 1")
            if cfg.class_dropout is not None:
                model.config.cond_drop_rate = cfg.class_dropout
            weighting = "uniform"
        else:
            model = self._new_model()
            weighting = cfg.loss_weight if cfg.loss_weight != "auto" else (
                "uniform" if model.config.kind == "var" else "gaussian")
        self.tokenizer.set_patch_nums(model.config.patch_nums)
        if tuple(self.tokenizer.config.patch_nums) != tuple(model.config.patch_nums) or \
                self.tokenizer.quantize.vocab_size != model.config.vocab_size:
            raise HMARError("the tokenizer does not match the model (scales / vocabulary): use the tokenizer it was "
                            "trained with")
        if self.data.kind == "tokens":
            splits = {"train": self.data.train, **({"val": self.data.val} if self.data.val is not None else {})}
            check_cache_fits(cache_meta, splits, model.config.patch_nums, model.config.vocab_size, cfg.data,
                             fix=str(cfg.init if init_tok is not None else tok_path))
        model.config.class_names = self.class_names
        self.weighting = weighting
        self.st = prepare_training(model, self.tokenizer.quantize, self.stage, self.info, loss_weight=weighting,
                                   precision=cfg.precision, fused=cfg.fused, betas=tuple(cfg.betas),
                                   grad_clip=cfg.grad_clip, label_smoothing=cfg.label_smoothing,
                                   mask_loss=cfg.mask_loss, fsdp=cfg.fsdp, compile=cfg.compile,
                                   chunked_ce=cfg.chunked_ce, attention_backend=cfg.attention_backend,
                                   compile_backend=cfg.compile_backend, compile_scope=cfg.compile_scope,
                                   compile_mode=cfg.compile_mode, fp8=cfg.fp8, qk_norm=cfg.qk_norm)
        rows = cfg.batch_size // self.info.world * model.config.seq_len
        if cfg.fp8 and not fp8_shapes_ok(rows, 16, 16):
            self.say(f"warning: --fp8 needs batch x tokens per process to be a multiple of 16 ({rows} is not): the "
                     f"blocks' GEMMs run in bf16; pick a --batch-size that makes it one")
        self.model = model
        n = len(self.data.train)
        self.iters_per_epoch = EpochBatches.batches_per_epoch(n, cfg.batch_size)
        self.total = cfg.max_steps if cfg.max_steps else cfg.epochs * self.iters_per_epoch
        if self.total < 1:
            raise HMARError("nothing to train: --epochs and --max-steps give 0 steps")
        if cfg.time_budget:   # the budget sets the length (fitted from the step time after a few steps)
            self.total = TimeBudget.UNFITTED
        # --time-budget: whether the schedule has started (its offset set) and the lr of the last step; checkpointed
        self.budget_state: Dict[str, Any] = {"started": False, "last_lr": math.inf}
        if cfg.warmup_steps is not None:
            warm = cfg.warmup_steps
        elif cfg.warmup_epochs is not None:
            warm = round(cfg.warmup_epochs * self.iters_per_epoch)
        else:
            warm = round(self.total / 50)
        self.auto_warmup = cfg.warmup_steps is None and cfg.warmup_epochs is None
        peak = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256
        wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
        self.schedule = Schedule(peak, self.total, min(warm, self.total), cfg.schedule, cfg.warmup_start,
                                 cfg.final_lr_ratio, cfg.weight_decay, wd_end)
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", cfg.keep_last, self.info)
        # the every-image-of-a-class-unreadable check needs every file's outcome: one process only
        self.corrupt = CorruptFiles(self.say, self.data.train if self.info.world == 1 else None)
        self.step, self.epoch, self.batch = 0, 0, 0
        steps_text, warm_text = f"{self.total} steps", str(self.schedule.warmup)
        if cfg.time_budget:   # fitted during the run, from the measured step time
            steps_text = f"steps fitted to --time-budget {cfg.time_budget:g}s"
            warm_text = "a fiftieth of the fitted steps" if self.auto_warmup else warm_text
        trainable = sum(p.numel() for p in self.st.params)
        total_params = sum(p.numel() for p in model.parameters())
        self.say(f"{self.stage} training of {model.config.kind} (depth {model.config.depth}, width "
                 f"{model.config.embed_dim}, {total_params / 1e6:.2f}M params, {trainable / 1e6:.2f}M trained) on "
                 f"{n} {'token samples' if self.data.kind == 'tokens' else 'images'} of {len(self.class_names)} classes"
                 f"{', val ' + str(len(self.data.val)) if self.data.val is not None else ''}; {self.info.world} "
                 f"process(es) on {self.info.device}, global batch {cfg.batch_size}, "
                 f"{steps_text} ({self.iters_per_epoch}/epoch), peak lr {peak:.3g}, warm-up {warm_text}, "
                 f"loss weighting {weighting if self.stage != 'masked' else 'masked CE (' + cfg.mask_loss + ')'}"
                 f"{', fp8 block GEMMs' if cfg.fp8 else ''}")

    def _load_init(self) -> Tuple[HMAR, Any, Optional[List[str]]]:
        from ..checkpoint import load_pretrained
        cfg = self.cfg
        if not cfg.init:
            raise HMARError("--stage masked needs --init STAGE1_MODEL_DIR (RUNDIR/model of a next-scale run)")
        p = Path(cfg.init)
        if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
            p = p / "model"
        model, tok, config = load_pretrained(p, "cpu")
        if model.config.kind == "var":
            raise HMARError(f"{p} is a VAR model (block-causal): stage 2 needs HMAR's block-diagonal stage-1 model "
                            "(train it with --model hmar-... or nsp-...)")
        if model.config.kind == "nsp":
            model = HMAR.from_next_scale(model, self.cfg.branch_depth)
        return model, tok, model.config.class_names

    def _new_model(self) -> nn.Module:
        cfg = self.cfg
        base = preset_config(model_config, ModelConfig, cfg.model, cfg.model_override, "--model-override")
        d = base.stage_one().to_dict()
        tq = self.tokenizer.quantize
        if (tuple(d["patch_nums"]), d["vocab_size"], d["z_channels"]) != (tuple(tq.patch_nums), tq.vocab_size, tq.z_channels):
            self.say(f"note: preset {cfg.model} expects scales {tuple(d['patch_nums'])}, vocab {d['vocab_size']}, "
                     f"{d['z_channels']} latent channels; using the tokenizer's {tuple(tq.patch_nums)}, {tq.vocab_size}, "
                     f"{tq.z_channels}")
        d.update(patch_nums=list(tq.patch_nums), vocab_size=tq.vocab_size, z_channels=tq.z_channels,
                 num_classes=len(self.class_names), class_names=self.class_names)
        if cfg.class_dropout is not None:
            d["cond_drop_rate"] = cfg.class_dropout
        if cfg.drop_path is not None:
            d["drop_path_rate"] = cfg.drop_path
        mc = ModelConfig.from_dict(d)
        torch.manual_seed(cfg.seed)
        model = build_model(mc)
        gamma = cfg.init_adaln_gamma if cfg.init_adaln_gamma is not None else default_adaln_gamma(mc.depth)
        init_weights(model, init_adaln=cfg.init_adaln, init_adaln_gamma=gamma, init_head=cfg.init_head)
        return model

    # ---------------------------------------------------------------- batches
    def _tokens(self, batch: Dict[str, Any]) -> torch.Tensor:
        if "idx" in batch:
            return batch["idx"].to(self.info.device, non_blocking=True)
        img = batch["img"].to(self.info.device, non_blocking=True)
        with torch.no_grad():
            return torch.cat(self.tokenizer.img_to_indices(img), 1)

    def _masks(self, batch: Dict[str, Any], epoch: int, gamma: Optional[float] = None) -> Optional[torch.Tensor]:
        if self.stage != "masked":
            return None
        keys = [(self.cfg.seed, epoch, int(i)) for i in batch["index"]]
        return draw_masks(keys, self.model.config.patch_nums, gamma, self.info.device)

    # ---------------------------------------------------------------- hooks
    def evaluate(self) -> Dict[str, Any]:
        """Teacher-forced validation: per-scale CE and accuracy (stage 2: on masked tokens, gamma 0.5)."""
        if self.data.val is None:
            return {}
        st, pn = self.st, self.model.config.patch_nums
        local = self.cfg.batch_size // self.info.world
        loader = make_loader(PaddedEval(self.data.val),
                             EvalBatches(len(self.data.val), local, self.info.rank, self.info.world, self.cfg.eval_batches),
                             self.cfg.workers)
        S = len(pn)
        sums = {k: torch.zeros(S, dtype=torch.float64, device=self.info.device) for k in ("ce_sum", "correct", "count")}
        st.module.eval()
        with torch.no_grad():
            for batch in loader:
                valid = (batch["index"] >= 0).to(self.info.device)
                batch["index"] = batch["index"].abs()
                tokens = self._tokens(batch)
                labels = batch["label"].to(self.info.device)
                mask = self._masks(batch, -1, 0.5)
                idx = split_scales(tokens, pn)
                x_ns = st.quantizer.next_scale_inputs(idx)
                x_cur = st.quantizer.masked_inputs(idx) if mask is not None else None
                with torch.autocast(self.info.device.type, dtype=st.amp_dtype or torch.float32,
                                    enabled=st.amp_dtype is not None):
                    logits = st.module(labels, x_ns, x_cur, mask)
                ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
                sel = valid[:, None].expand_as(tokens)
                if mask is not None:
                    sel = sel & mask
                for k, v in per_scale_stats(ce, logits, tokens, pn, sel).items():
                    sums[k] += v
        st.module.train()
        for v in sums.values():
            all_reduce_(v, self.info)
        cnt = sums["count"].clamp(min=1)
        per_ce = (sums["ce_sum"] / cnt).tolist()
        per_acc = (sums["correct"] / cnt).tolist()
        out = {"val_loss": float(sums["ce_sum"].sum() / cnt.sum()), "val_acc": float(sums["correct"].sum() / cnt.sum()),
               "val_loss_per_scale": [round(x, 5) for x in per_ce], "val_acc_per_scale": [round(x, 5) for x in per_acc]}
        if self.stage != "masked":
            W = scale_loss_weights(pn, self.weighting)
            out["val_loss_weighted"] = float(sum(float(W[i]) * per_ce[i] for i in range(S)))
        return out

    def inference_model(self) -> Optional[nn.Module]:
        """The full model on the main process (a gathered copy under FSDP; collective), None elsewhere."""
        if not self.cfg.fsdp or not self.info.initialized:
            return self.model if self.info.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.st.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        m = build_model(ModelConfig.from_dict(self.model.config.to_dict()))
        m.load_state_dict({k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}, strict=False)
        return m.to(self.info.device)

    def sample_grid(self, tag: str) -> Optional[Path]:
        """Sample ``sample_per_class`` images of the first ``sample_classes`` classes into RUNDIR/samples."""
        from ..pipeline import make_grid, to_pil
        from ..sampling import sample
        m = self.inference_model()
        if m is None:
            return None
        was = m.training
        m.eval()
        C = min(self.cfg.sample_classes, len(self.class_names))
        labels = [c for c in range(C) for _ in range(self.cfg.sample_per_class)]
        with torch.compiler.set_stance("force_eager"):   # blocks compiled for training (--compile-scope blocks)
            out = sample(m, self.tokenizer, labels, cfg=self.cfg.sample_cfg, generator=self.cfg.seed)
        m.train(was)
        path = self.run_dir / "samples" / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(to_pil(out.images), ncols=self.cfg.sample_per_class).save(path)
        return path

    def save_checkpoint(self) -> None:
        states = get_states(self.st.wrapped, [self.st.optimizer], self.info)
        # every rank's running loss sum since the last log line, so a resumed run logs the same means
        payload = {"states": states, "epoch": self.epoch, "batch": self.batch, "stage": self.stage,
                   "log_window": gather_log_window((float(self.acc_loss), self.acc_n), self.info),
                   "scaler": self.st.scaler.state_dict() if self.st.scaler is not None else None,
                   "corrupt": sorted(self.corrupt.seen), "config": config_to_dict(self.cfg),
                   "num_train": len(self.data.train),
                   "model_config": self.model.config.to_dict(),
                   "quantizer_fingerprint": self.tokenizer_fp}
        if self.cfg.time_budget:   # a resumed budgeted run goes on with the schedule it had, not a new one
            payload["budget_schedule"] = {**self.budget_state, "offset": self.schedule.offset,
                                          "warmup": self.schedule.warmup, "total": self.total}
        path = self.ckpts.save(self.step, payload)
        if path is not None:
            self.say(f"saved checkpoint {path}")

    def _check_same_model(self, ck: Dict[str, Any]) -> None:
        """A checkpoint of another architecture (``--model var`` after ``hmar``, another depth) or of a run with
        another tokenizer (other codebook or phi weights: other teacher-forcing inputs) cannot be continued here."""
        old, now = ck.get("model_config") or {}, self.model.config.to_dict()
        same_kind = old.get("kind", now["kind"]) == now["kind"]   # another kind: the kind says it all
        keys = [k for k in _ARCHITECTURE if same_kind or k == "kind"]
        if now["kind"] != "hmar":
            keys = [k for k in keys if k != "branch_depth"]   # only HMAR's branches use it
        diff = [f"{k} {old[k]!r} -> {now[k]!r}" for k in keys if k in old and old[k] != now[k]]
        if diff:
            raise HMARError(f"{ck['path']} is of another model ({', '.join(diff)}): resume with the original run's "
                            "--model and size options, or train into a new --out")
        was, names = old.get("class_names"), now.get("class_names")
        if was and names and len(was) == len(names) and list(was) != list(names):   # (a count change: above)
            i = next(i for i, (a, b) in enumerate(zip(was, names)) if a != b)
            raise HMARError(f"{ck['path']} was trained with other classes: its class {i} is {was[i]!r}, this data's "
                            f"is {names[i]!r}; resume with the original --data, or train into a new --out (a data "
                            "folder read in another order, e.g. index folders 0..n-1 now by their index, keeps the "
                            f"checkpoint's order with a classes.json holding {json.dumps(list(was), ensure_ascii=False)})")
        fp = ck.get("quantizer_fingerprint")
        if fp is not None and fp != self.tokenizer_fp:
            raise HMARError(f"{ck['path']} was trained with another tokenizer (quantizer fingerprint {fp}, this run's "
                            f"is {self.tokenizer_fp}): resume with the original run's "
                            "--tokenizer (and data), or train into a new --out")

    def _resume(self) -> bool:
        """Restore the newest checkpoint; True when the run had already finished (nothing restored)."""
        ck = resume_point(self, self.stage)
        if ck is None:
            return False
        self._check_same_model(ck)
        if already_finished(self, ck, self.run_dir / "model"):
            return True
        try:
            set_states(self.st.wrapped, [self.st.optimizer], ck["states"], self.info)
        except (RuntimeError, KeyError, ValueError) as e:
            raise HMARError(f"{ck['path']} does not fit this model/optimiser ({str(e).splitlines()[0][:160]}): "
                            "resume with the options of the original run") from None
        if self.st.scaler is not None and ck.get("scaler"):
            self.st.scaler.load_state_dict(ck["scaler"])
        window = this_rank_log_window(ck, self.info)
        if window is not None:   # same processes: continue this rank's loss window
            self.acc_loss.fill_(float(window[0]))
            self.acc_n = int(window[1])
        restore_position(self, ck)
        sched = ck.get("budget_schedule")
        if self.cfg.time_budget and sched:
            self.budget_state = {"started": bool(sched["started"]), "last_lr": float(sched["last_lr"])}
            self.schedule.offset, self.schedule.warmup = int(sched["offset"]), int(sched["warmup"])
            self.total = self.schedule.total = max(int(sched["total"]), self.step + 1)
        return False

    # ---------------------------------------------------------------- the loop
    def run(self) -> Path:
        """Train to the end; returns the final model directory (``RUNDIR/model``)."""
        cfg, info, st = self.cfg, self.info, self.st
        self.acc_loss = torch.zeros((), device=info.device, dtype=torch.float64)   # loss sum since the last log
        self.acc_n = 0
        if cfg.resume:
            if self._resume():   # finished: leave metrics, checkpoints, model and samples as they are
                self.log.close()
                cleanup(info)
                return self.run_dir / "model"
        else:
            seed_everything(cfg.seed * 1000 + info.rank + 1)   # per-rank streams (class dropout, drop path)
        if info.is_main:
            self.log.record(0, "config", {"train": config_to_dict(cfg), "model": self.model.config.to_dict(),
                                          "world": info.world}, echo=False)
        from tqdm.auto import tqdm
        bar = tqdm(total=None if cfg.time_budget else self.total, initial=self.step, unit="step", dynamic_ncols=True,
                   leave=True, disable=not (info.is_main and cfg.progress), desc=self.stage)
        self.log.bar = bar if not bar.disable else None
        meter = Throughput()
        last: Dict[str, torch.Tensor] = {}
        evaluated = sampled = saved = False
        pin = info.device.type == "cuda"
        t_start = time.time()
        budget = TimeBudget(cfg.time_budget) if cfg.time_budget else None
        with GracefulStop(info) as stop:
            while self.step < self.total:
                sampler = EpochBatches(len(self.data.train), cfg.batch_size, info.rank, info.world, cfg.seed,
                                       self.epoch, start=self.batch)
                for batch in make_loader(self.data.train, sampler, cfg.workers, pin):
                    if batch["bad"]:
                        self.corrupt.update(batch["bad"])
                    tokens = self._tokens(batch)
                    labels = batch["label"].to(info.device, non_blocking=True)
                    mask = self._masks(batch, self.epoch)
                    if budget is not None and not self.budget_state["started"]:   # the run's length is not known
                        self.schedule.offset = self.step   # yet: the schedule starts once it is (warm-up start lr)
                    lr, wd = self.schedule(self.step)
                    if budget is not None and self.step > self.schedule.offset + self.schedule.warmup:
                        lr = min(lr, self.budget_state["last_lr"])   # a refit to more steps never raises a decaying lr
                        self.budget_state["last_lr"] = lr
                    apply_schedule(st.optimizer, lr, wd)
                    log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total
                    last = train_step(st, tokens, labels, mask, metrics=log_now)
                    self.acc_loss += last["loss"].double()
                    self.acc_n += 1
                    meter.add(cfg.batch_size)
                    self.step += 1
                    self.batch += 1
                    end_epoch = self.batch >= self.iters_per_epoch
                    if end_epoch:
                        self.epoch, self.batch = self.epoch + 1, 0
                    bar.update(1)
                    if budget is not None:
                        self._fit_budget(budget, bar)
                    evaluated = sampled = saved = False
                    if log_now:
                        self._log_train(last, self.acc_loss, self.acc_n, meter.rate(), lr, wd, bar)
                        self.acc_loss.zero_()
                        self.acc_n = 0
                    if is_due(cfg.eval_every, self.step, end_epoch):
                        self._log_eval()
                        evaluated = True
                    if cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                        self.sample_grid(f"step_{self.step:08d}")
                        sampled = True
                    saved = end_of_step(self, stop, bar, cfg.ckpt_every, end_epoch)
                    if self.step >= self.total or end_epoch:
                        break
        bar.close()
        self.log.bar = None
        if not evaluated:
            self._log_eval()
        if not saved:
            self.save_checkpoint()
        final = self.save_model()
        if cfg.sample_every >= 0 and not sampled:
            p = self.sample_grid(f"final_step_{self.step:08d}")
            if p is not None:
                self.say(f"sample grid: {p}")
        if self.corrupt.count:
            self.say(f"{self.corrupt.count} unreadable image(s) were skipped (listed above)")
        self.say(f"done: {self.step} steps in {time.time() - t_start:.1f}s; model: {final}")
        self.log.close()
        cleanup(info)
        return final

    def _fit_budget(self, budget: TimeBudget, bar: Any) -> None:
        new = budget.total(self.step, self.total, (lambda v: all_reduce_max(v, self.info)) if self.info.initialized else None)
        starts = budget.fitted and not self.budget_state["started"]   # the first estimate: the schedule starts
        self.budget_state["started"] = self.budget_state["started"] or budget.fitted
        if new != self.total:
            self.total = self.schedule.total = new
            if self.auto_warmup and starts:   # the default warm-up: a fiftieth of the fitted run's scheduled part
                self.schedule.warmup = round((new - self.schedule.offset) / 50)   # (fixed after: no second warm-up)
            bar.total = new

    def _log_train(self, last: Dict[str, torch.Tensor], acc_loss: torch.Tensor, n: int, img_s: float, lr: float,
                   wd: float, bar: Any) -> None:
        vals = torch.stack([acc_loss / max(n, 1), last["grad_norm"].double(), last["ce"].double(),
                            last["acc"].double(), last["ce_tail"].double()])
        all_reduce_(vals, self.info, "mean")
        loss, gn, ce, acc, tail = vals.tolist()
        check_finite_loss(loss, self.step, self.run_dir)
        rec = {"loss": loss, "ce": ce, "acc": acc, "ce_tail": tail, "grad_norm": gn, "lr": lr, "wd": wd,
               "img_s": round(img_s, 2), "epoch": self.epoch, "corrupt_files": self.corrupt.count}
        if self.info.is_main:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.1f}", refresh=False)
            self.log.record(self.step, "train", rec, echo=bar.disable)

    def _log_eval(self) -> None:
        res = self.evaluate()
        if res and self.info.is_main:
            self.log.record(self.step, "val", res)

    def save_model(self) -> Path:
        """``RUNDIR/model`` via :func:`hmar.checkpoint.save_pretrained` (class names included)."""
        from ..checkpoint import save_pretrained
        m = self.inference_model()
        out = self.run_dir / "model"
        if m is not None:
            save_pretrained(out, m, self.tokenizer, class_names=self.class_names,
                            extra={"training": {"stage": self.stage, "steps": self.step,
                                                "loss_weight": self.weighting if self.stage != "masked" else None}})
        from .distributed import barrier
        barrier(self.info)
        return out
