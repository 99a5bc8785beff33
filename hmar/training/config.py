"""Training options: one dataclass per trainer, YAML files, command-line overrides.

Precedence: dataclass default < ``--config FILE`` (YAML) < flags given on the command line.
Every field becomes a ``--flag`` (underscores as dashes) whose help text is the field's ``help``
metadata, so ``--help`` documents every option. Dict fields take ``KEY=VALUE`` (repeatable).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar

from ..errors import HMARError

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"        # the repository's configs/
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # hmar/configs (package data), if shipped


def opt(default: Any, help: str, *, type: Any = None, choices: Optional[List[str]] = None, nargs: Any = None,
        cli: bool = True) -> Any:
    """A dataclass field carrying its command-line help."""
    meta = {"help": help, "type": type, "choices": choices, "nargs": nargs, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type_copy(d), metadata=meta)
    return field(default=default, metadata=meta)


def type_copy(d: Any) -> Any:
    return json.loads(json.dumps(d))


@dataclass
class CommonConfig:
    """Options shared by the transformer and the tokenizer trainers."""
    data: Optional[str] = opt(None, "image folder (ROOT/<class>/*.png, or ROOT/train + a validation split ROOT/val, "
                                    "validate, validation or test) or a token cache written by `hmar tokenize` "
                                    "(transformer training only)", type=str)
    out: str = opt("runs/run", "run directory: checkpoints/, log.txt, metrics.jsonl, samples/ and the final model",
                   type=str)
    epochs: int = opt(10, "number of passes over the training set", type=int)
    max_steps: Optional[int] = opt(None, "stop after this many optimiser steps (overrides --epochs for the "
                                         "schedule length)", type=int)
    batch_size: int = opt(32, "GLOBAL batch size (each of N processes gets batch_size / N)", type=int)
    hflip: bool = opt(False, "random horizontal flips of training images (official recipe: off); a token cache "
                             "takes it only if made with `hmar tokenize --hflip --views N`")
    workers: int = opt(0, "DataLoader worker processes (0: load in the main process)", type=int)
    seed: int = opt(42, "random seed (model init, data order, augmentation, masks)", type=int)
    device: str = opt("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1", type=str)
    precision: str = opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16 (with a gradient scaler) "
                                 "or fp32", type=str, choices=["auto", "bf16", "fp16", "fp32"])
    grad_clip: float = opt(2.0, "clip the global gradient norm to this value (0: off)", type=float)
    log_every: int = opt(10, "write a metrics line every N steps", type=int)
    ckpt_every: int = opt(0, "save a resumable checkpoint every N steps (0: at the end of every epoch)", type=int)
    keep_last: int = opt(3, "number of resumable checkpoints kept in RUNDIR/checkpoints", type=int)
    resume: bool = opt(False, "continue from the newest checkpoint in RUNDIR/checkpoints (model, optimiser, "
                              "schedule, RNG states and data position)")
    progress: bool = opt(True, "show a tqdm progress bar (loss, images/s, ETA)")
    tensorboard: bool = opt(True, "also write TensorBoard logs to RUNDIR/tb when the tensorboard package is installed")
    fsdp: bool = opt(False, "shard parameters, gradients and optimiser state with FSDP2 (fully_shard) "
                            "instead of DDP (for large depths under torchrun)")
    compile: bool = opt(False, "torch.compile the model")
    time_budget: Optional[float] = opt(None, "wall-clock budget in seconds: the number of steps (and the lr "
                                             "schedule) is fitted to it from the measured step time, overriding "
                                             "--epochs/--max-steps (equal-compute comparisons, fixed-length jobs); "
                                             "the schedule starts after 5 timing steps (at the warm-up start lr)",
                                       type=float)


@dataclass
class TrainConfig(CommonConfig):
    """``hmar train``: stage 1 (next-scale: HMAR's block-diagonal model or VAR), stage 2 (masked)."""
    stage: str = opt("next-scale", "next-scale (stage 1, or VAR) or masked (stage 2, needs --init)", type=str,
                     choices=["next-scale", "masked"])
    model: str = opt("hmar-tiny", "model preset (hmar-tiny, nsp-tiny, var-tiny, hmar-small, hmar-d16, var-d16, "
                                  "any hmar-d<N>/var-d<N>); an hmar preset trains its stage-1 (nsp) model",
                     type=str)
    model_override: Dict[str, Any] = opt({}, "override a model config field, KEY=VALUE (repeatable), "
                                             "e.g. depth=2 embed_dim=64", type=str)
    tokenizer: Optional[str] = opt(None, "frozen tokenizer: a directory from `hmar train-tokenizer` (or its run dir), "
                                         "an hmar model directory, or the official vae_ch160v4096z32.pth", type=str)
    init: Optional[str] = opt(None, "stage 2: the stage-1 model directory (RUNDIR/model of a next-scale run, or "
                                    "the run dir itself)", type=str)
    branch_depth: Optional[int] = opt(None, "stage 2: blocks in each HMAR branch (default: the preset's, "
                                            "official 8)", type=int)
    blr: float = opt(1e-4, "base learning rate per 256 images; peak lr = blr * batch_size / 256", type=float)
    lr: Optional[float] = opt(None, "peak learning rate (overrides --blr)", type=float)
    warmup_epochs: Optional[float] = opt(None, "linear warm-up length in epochs (default: epochs / 50)", type=float)
    warmup_steps: Optional[int] = opt(None, "linear warm-up length in steps (overrides --warmup-epochs)", type=int)
    warmup_start: float = opt(0.005, "learning-rate factor at step 0 of the warm-up (official wp0)", type=float)
    schedule: str = opt("lin0", "lr schedule after warm-up: lin0 (official: hold 5%, then linear to "
                                "--final-lr-ratio), cos, or const", type=str, choices=["lin0", "cos", "const"])
    final_lr_ratio: float = opt(0.1, "final lr / peak lr (official wpe: 0.1 for d16/d20, 0.01 for d24/d30)",
                                type=float)
    weight_decay: float = opt(0.05, "AdamW weight decay at step 0 (official twd)", type=float)
    weight_decay_end: Optional[float] = opt(None, "weight decay at the last step, half-cosine from "
                                                  "--weight-decay (default: constant)", type=float)
    betas: Tuple[float, float] = opt([0.9, 0.95], "AdamW betas", type=float, nargs=2)
    fused: str = opt("auto", "fused AdamW: auto (on CUDA), on, off", type=str, choices=["auto", "on", "off"])
    loss_weight: str = opt("auto", "per-scale loss weighting of stage 1: gaussian (official HMAR), uniform (VAR: "
                                   "plain token mean), equal (each scale sums to 1); auto: gaussian for HMAR, "
                                   "uniform for VAR", type=str, choices=["auto", "gaussian", "uniform", "equal"])
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing (official: 0)", type=float)
    chunked_ce: bool = opt(True, "compute the output head and the cross-entropy in chunks of tokens, so the fp32 "
                                 "[batch, tokens, vocabulary] logits and their gradient never exist (same loss and "
                                 "gradients; --no-chunked-ce: the plain path)")
    compile_scope: str = opt("model", "what --compile compiles: model (the whole forward as one graph) or blocks "
                                      "(each transformer block compiled once and shared by every layer, as "
                                      "torchtitan does: the compile time does not grow with depth)", type=str,
                             choices=["model", "blocks"])
    compile_mode: str = opt("default", "torch.compile mode with --compile: default, reduce-overhead (the compiled "
                                       "forward and backward replayed as CUDA graphs), max-autotune, "
                                       "max-autotune-no-cudagraphs", type=str,
                            choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    fp8: bool = opt(False, "the blocks' qkv, proj, fc1 and fc2 GEMMs in fp8 (e4m3 forward, e5m2 gradients, one "
                           "scale per tensor; Hopper / Ada GPUs), same checkpoints; on an H100 1.09x the bf16 step at "
                           "hmar-d30, 0.93-0.96x at width 1024 (hmar-d16), with a lower peak memory "
                           "(BENCHMARKS.md 2i, 2j; hmar.model.fp8_training)")
    compile_backend: str = opt("inductor", "torch.compile backend used with --compile (inductor; aot_eager or eager "
                                           "to debug compilation problems)", type=str)
    attention_backend: str = opt("auto", "attention kernel in training: auto (CUDA: the fused Triton kernel, or one "
                                         "masked SDPA call for small calls; CPU: masked SDPA), reference (masked "
                                         "SDPA), per_scale (one SDPA call per scale) or triton", type=str,
                                 choices=["auto", "reference", "per_scale", "triton"])
    qk_norm: str = opt("auto", "the L2 normalisation of q and k: kernels (inside the Triton attention kernels, "
                               "which then take the packed qkv projection and write its gradient in its layout: "
                               "1.09x the step at hmar-d16, 1.06x at hmar-d30 on an H100, BENCHMARKS.md 2o), ops "
                               "(torch ops of their own before the attention), auto (kernels where the Triton "
                               "backend runs: CUDA with --attention-backend auto or triton)", type=str,
                       choices=["auto", "ops", "kernels"])
    mask_loss: str = opt("token", "stage 2: mean over all masked tokens of the batch (token) or per image, then "
                                  "over images (image, the official formula)", type=str, choices=["token", "image"])
    class_dropout: Optional[float] = opt(None, "probability of replacing a label by the null class (default: the "
                                               "model config's 0.1)", type=float)
    drop_path: Optional[float] = opt(None, "stochastic-depth rate (default: 0.1 * depth / 24)", type=float)
    init_adaln: float = opt(0.5, "scale of the AdaLN scale/shift rows at init (official aln)", type=float)
    init_adaln_gamma: Optional[float] = opt(None, "scale of the AdaLN gamma rows at init (official alng; default "
                                                  "1e-3 up to depth 20, 1e-4 to 24, else 1e-5)", type=float)
    init_head: float = opt(0.02, "scale of the output head at init (official hd)", type=float)
    eval_every: int = opt(0, "validate every N steps (0: at the end of every epoch, if there is a val split); "
                             "N > 0 needs a val split", type=int)
    eval_batches: int = opt(50, "at most this many validation batches per evaluation (0: the whole val split)",
                            type=int)
    sample_every: int = opt(0, "write a sample grid to RUNDIR/samples every N steps (0: only at the end; any "
                               "negative value, e.g. -1: never)", type=int)
    sample_classes: int = opt(8, "classes in a sample grid (the first N)", type=int)
    sample_per_class: int = opt(4, "images per class in a sample grid", type=int)
    sample_cfg: float = opt(1.5, "classifier-free guidance of the sample grids", type=float)


@dataclass
class TokenizerTrainConfig(CommonConfig):
    """``hmar train-tokenizer``: the multi-scale residual VQ-VAE."""
    preset: str = opt("vqvae-tiny", "tokenizer preset (vqvae-tiny, vqvae-small, vqvae-32, vqvae-64, vqvae-ch160, "
                                       "vqvae-ch160-512)", type=str)
    tokenizer_override: Dict[str, Any] = opt({}, "override a tokenizer config field, KEY=VALUE (repeatable), "
                                                 "e.g. ch=16 norm_groups=16 vocab_size=128", type=str)
    lr: float = opt(2e-4, "peak learning rate of the autoencoder (and the discriminator)", type=float)
    warmup_steps: int = opt(0, "linear lr warm-up steps", type=int)
    betas: Tuple[float, float] = opt([0.5, 0.9], "Adam betas (VQGAN's)", type=float, nargs=2)
    weight_decay: float = opt(0.0, "AdamW weight decay", type=float)
    l1: float = opt(1.0, "weight of the L1 reconstruction loss", type=float)
    l2: float = opt(1.0, "weight of the L2 (MSE) reconstruction loss", type=float)
    vq_weight: float = opt(1.0, "weight of the VQ loss (codebook + beta * commitment; beta from the preset)",
                           type=float)
    perceptual: Optional[str] = opt(None, "local TorchScript feature network for a perceptual loss (input images "
                                          "in [-1, 1], returns a tensor or a list of feature maps); never "
                                          "downloaded", type=str)
    perceptual_weight: float = opt(1.0, "weight of the perceptual loss", type=float)
    disc: bool = opt(False, "train a PatchGAN discriminator (hinge loss, adaptive weight)")
    disc_start: int = opt(2000, "step at which the GAN loss is switched on", type=int)
    disc_weight: float = opt(0.5, "GAN weight (times the adaptive gradient-norm ratio)", type=float)
    disc_layers: int = opt(3, "stride-2 layers of the discriminator", type=int)
    disc_channels: int = opt(64, "channels of the first discriminator layer", type=int)
    dead_code_steps: int = opt(200, "re-initialise codes unused for this many steps with encoder features of the "
                                    "current batch (0: never)", type=int)
    eval_batches: int = opt(20, "at most this many validation batches for the per-epoch PSNR (0: the whole val "
                                "split, or the whole training set when there is no val split)", type=int)


C = TypeVar("C", bound=CommonConfig)


# ------------------------------------------------------------------------------------ parsing
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: Type[CommonConfig]) -> None:
    """Add ``--config`` and one flag per field of ``cls``; defaults are suppressed so that only flags the user
    gives override the YAML file (the help text shows the built-in default)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file of options (keys = option names, dashes or underscores); flags given on "
                             "the command line override it. A bare name such as 'tiny' means configs/tiny.yaml")
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{meta.get('help', '')} (default: {default})".replace("%", "%%")
        kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        if isinstance(default, bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, dict):
            parser.add_argument(_flag(f.name), action="extend", nargs="+", metavar="KEY=VALUE", **kw)
        else:
            if meta.get("type") is not None:
                kw["type"] = meta["type"]
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if meta.get("nargs"):
                kw["nargs"] = meta["nargs"]
            parser.add_argument(_flag(f.name), **kw)


def parse_overrides(items: Any, what: str) -> Dict[str, Any]:
    """``["depth=2", "embed_dim=64"]`` (or a dict from YAML) -> ``{"depth": 2, "embed_dim": 64}``."""
    import yaml
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):   # one KEY=VALUE from YAML, not its characters
        items = [items]
    if not isinstance(items, (list, tuple)) or not all(isinstance(it, str) for it in items):
        raise HMARError(f"{what} expects KEY=VALUE items (a YAML mapping or a list of 'KEY=VALUE'), got {items!r}")
    out: Dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise HMARError(f"{what} expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def preset_config(build: Callable[..., T], cls: type, name: str, overrides: Dict[str, Any], flag: str) -> T:
    """``build(name, **overrides)`` (a preset of dataclass ``cls``); an unknown key or a value of the wrong
    type is an :class:`HMARError` naming ``flag`` instead of a ``TypeError`` from deep inside."""
    known = sorted(f.name for f in fields(cls))
    bad = sorted(set(overrides) - set(known))
    if bad:
        raise HMARError(f"{flag}: unknown key(s) {', '.join(bad)}; known: {', '.join(known)}")
    base = build(name)
    for key, value in overrides.items():
        if not _same_kind(value, getattr(base, key)):
            raise HMARError(f"{flag} {key}={value!r}: expected a value like {getattr(base, key)!r}")
    try:
        return build(name, **overrides)
    except HMARError as e:   # the config's own check (e.g. a width GroupNorm cannot split): name the flag
        if not overrides:
            raise
        given = " ".join(f"{k}={v}" for k, v in overrides.items())
        raise HMARError(f"{flag} {given}: {e}") from None
    except (TypeError, ValueError) as e:
        raise HMARError(f"{flag} {overrides}: a value does not fit preset {name!r} ({e})") from None


def _same_kind(value: Any, ref: Any) -> bool:
    """Whether ``value`` can stand where the preset has ``ref`` (numbers, flags, lists, strings)."""
    if ref is None or value is None:
        return True
    if isinstance(ref, bool) or isinstance(value, bool):
        return isinstance(ref, bool) and isinstance(value, bool)
    if isinstance(ref, (int, float)):
        return isinstance(value, int) or (isinstance(value, float) and isinstance(ref, float))
    if isinstance(ref, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(ref))


def resolve_config_path(name: str) -> Path:
    """A YAML path, or a bare name looked up in the repository's ``configs/`` folder."""
    p = Path(name)
    if p.is_file():
        return p
    for d in (CONFIG_DIR, PACKAGE_CONFIG_DIR):
        for cand in (d / name, d / f"{name}.yaml"):
            if cand.is_file():
                return cand
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise HMARError(f"config file {name!r} not found" + (f"; known names: {', '.join(known)}" if known else ""))


def load_yaml(path: Path) -> Dict[str, Any]:
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise HMARError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise HMARError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    if not isinstance(data, dict):
        raise HMARError(f"{path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: Type[C], args: Optional[argparse.Namespace] = None, **values: Any) -> C:
    """Defaults < YAML (``args.config``) < explicit flags in ``args`` < keyword ``values``."""
    known = {f.name for f in fields(cls)}
    merged: Dict[str, Any] = {}
    cfg_file = getattr(args, "config", None) if args is not None else values.pop("config", None)
    if cfg_file:
        path = resolve_config_path(cfg_file)
        data = load_yaml(path)
        bad = sorted(set(data) - known)
        if bad:
            raise HMARError(f"{path}: unknown option(s) {', '.join(bad)}; see --help for the list")
        merged.update(data)
    if args is not None:
        merged.update({k: v for k, v in vars(args).items() if k in known})
    merged.update(values)
    bad = sorted(set(merged) - known)
    if bad:
        raise HMARError(f"unknown option(s) {', '.join(bad)}")
    for f in fields(cls):
        if f.name in merged and isinstance(f.default_factory() if f.default is MISSING else f.default, dict):  # type: ignore[misc]
            merged[f.name] = parse_overrides(merged[f.name], _flag(f.name))
        elif f.name in merged:
            merged[f.name] = _typed(f, merged[f.name])
    if "betas" in merged:
        merged["betas"] = tuple(float(b) for b in merged["betas"])
    return cls(**merged)


def _typed(f: Any, value: Any) -> Any:
    """A YAML (or keyword) value checked and converted as argparse would the flag's: YAML 1.1 reads ``1e-4``
    (no dot) as a string, and a value outside ``choices`` would otherwise fail deep inside the run."""
    meta, flag = f.metadata, _flag(f.name)
    kind, default = meta.get("type"), f.default
    if value is None:   # YAML's null: only for options whose default is "none" (Optional), not for --seed or --out
        if "Optional" in str(f.type):
            return value
        shown = default if default is not MISSING else f.default_factory()  # type: ignore[misc]
        raise HMARError(f"{flag}: expected a value, got null: leave the option out for its default ({shown!r})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise HMARError(f"{flag}: expected true or false, got {value!r}")
        return value
    if meta.get("nargs"):
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) != meta["nargs"]:
            raise HMARError(f"{flag}: expected {meta['nargs']} values, got {value!r}")
        return [_scalar(kind, v, flag) for v in items]
    value = _scalar(kind, value, flag)
    if meta.get("choices") and value not in meta["choices"]:
        raise HMARError(f"{flag}: {value!r} is not one of {', '.join(meta['choices'])}")
    return value


def _scalar(kind: Any, value: Any, flag: str) -> Any:
    if kind not in (int, float, str) or isinstance(value, kind) and not isinstance(value, bool):
        return value
    ok = (kind is str and isinstance(value, (int, float)) and not isinstance(value, bool)) or \
         (kind is float and not isinstance(value, bool) and isinstance(value, (int, str))) or \
         (kind is int and isinstance(value, float) and value.is_integer())
    if ok:
        try:
            return kind(value)
        except ValueError:
            pass
    raise HMARError(f"{flag}: expected {'a number' if kind is float else 'an integer' if kind is int else 'text'}, "
                    f"got {value!r}" + (" (write floats in YAML with a dot: 1.0e-4)" if kind is float else ""))


_positive = (lambda v: v > 0, "a finite number > 0")
_non_negative = (lambda v: v >= 0, "a finite number >= 0")
_fraction = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
# float options and their domains (an option a config class lacks is skipped)
_DOMAINS: Dict[str, Tuple[Callable[[float], bool], str]] = {
    "lr": _positive, "blr": _positive, "time_budget": _positive, "warmup_start": _fraction,
    "final_lr_ratio": _non_negative, "weight_decay": _non_negative, "weight_decay_end": _non_negative,
    "grad_clip": _non_negative, "label_smoothing": _fraction, "class_dropout": _fraction,
    "drop_path": (lambda v: 0 <= v < 1, "a number in [0, 1)"), "init_adaln": _non_negative,
    "init_adaln_gamma": _non_negative, "init_head": _non_negative, "l1": _non_negative, "l2": _non_negative,
    "vq_weight": _non_negative, "perceptual_weight": _non_negative, "disc_weight": _non_negative,
}
# integer options of the tokenizer trainer: at least this
_INT_LOW = {"dead_code_steps": 0, "disc_start": 0, "disc_layers": 1, "disc_channels": 1}


def check_common(cfg: CommonConfig) -> None:
    """Refuse values that would fail only later (a division by zero at the first log line, a negative
    worker count), be silently ignored (``--max-steps 0``), shift the lr schedule (a negative warm-up) or train on
    nonsense (a NaN or negative lr, a dropout rate above 1, Adam betas of 1 or more, a NaN guidance of the grids)."""
    for name, low in (("log_every", 1), ("workers", 0), ("epochs", 0), ("max_steps", 1), ("keep_last", 1),
                      ("eval_batches", 0), ("warmup_steps", 0), ("warmup_epochs", 0), ("eval_every", 0),
                      ("ckpt_every", 0), *_INT_LOW.items()):
        v = getattr(cfg, name, None)
        if v is not None and v < low:
            raise HMARError(f"{_flag(name)} must be at least {low}, got {v}")
    for name, (ok, what) in _DOMAINS.items():
        v = getattr(cfg, name, None)
        if v is not None and not (math.isfinite(v) and ok(v)):   # NaN / inf fail here too
            raise HMARError(f"{_flag(name)} must be {what}, got {v}")
    betas = getattr(cfg, "betas", None)
    if betas is not None and not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise HMARError(f"--betas must be two numbers in [0, 1) (Adam's moment decays, e.g. 0.9 0.95), got "
                        f"{' '.join(map(str, betas))}")
    if getattr(cfg, "sample_cfg", None) is not None:
        from ..sampling import check_options
        try:
            check_options(cfg.sample_cfg, 0, 0.0, 1.0)
        except HMARError as e:
            raise HMARError(f"--sample-cfg: {e}") from None
    sampled = getattr(cfg, "sample_every", -1) >= 0
    for name in ("sample_classes", "sample_per_class"):
        if sampled and getattr(cfg, name) < 1:
            raise HMARError(f"{_flag(name)} must be at least 1, got {getattr(cfg, name)} (--sample-every -1: "
                            "no sample grids)")


def config_to_dict(cfg: CommonConfig) -> Dict[str, Any]:
    """JSON-friendly dict of a config (saved in checkpoints and the log)."""
    d = asdict(cfg)
    return type_copy({k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()})
