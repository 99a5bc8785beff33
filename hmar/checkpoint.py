"""Checkpoints: the official ``.pth`` files (strict, shapes inferred) and our own format.

Our format is a directory with ``config.json`` (model, tokenizer, class names, sampling defaults),
``model.safetensors`` and ``tokenizer.safetensors``. Buffers that are functions of the config
(attention masks, level ids, zero biases, codebook-hit statistics) are not stored.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .errors import HMARError
from .fileio import atomic_path, ensure_writable_dir
from .model import build_model
from .model.keymaps import nsp_to_hmar
from .presets import ModelConfig, TokenizerConfig
from .tokenizer import VQVAE

PathLike = Union[str, os.PathLike]
DERIVED = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")
FORMAT_VERSION = 1
TOKENIZER_FORMAT = "hmar-tokenizer"   # config.json of a tokenizer directory (hmar.training.tokenizer_io)


def _is_derived(key: str) -> bool:
    return key.split(".")[-1] in DERIVED


# ------------------------------------------------------------------------------------ official files
def read_safetensors(path: PathLike, fix: str = "re-download or re-save it") -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; :class:`HMARError` (with ``fix``) for a damaged or truncated one."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise HMARError(f"{str(path)!r} is not a readable safetensors file ({e}): {fix}") from None


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` file and unwrap trainer
    checkpoints (``{'trainer': {'transformer_wo_ddp' | 'var_wo_ddp': ...}}``)."""
    p = Path(path)
    if not p.exists():
        raise HMARError(f"checkpoint {str(p)!r} does not exist: check the path")
    if p.is_dir():
        raise HMARError(f"{str(p)!r} is a directory: pass a checkpoint file, or load it with from_pretrained")
    kind = _directory_kind(p.parent) if p.name in ("config.json", "model.safetensors", "tokenizer.safetensors") \
        else None
    if kind is not None:
        raise HMARError(f"{str(p)!r} is one file of the {kind} directory {str(p.parent)!r}: pass the directory itself")
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    try:
        try:  # memory-map: a 10 GB d30 file is not copied into RAM
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise HMARError(f"{str(p)!r} is not a PyTorch checkpoint that loads with weights_only=True "
                        f"({type(e).__name__}: {(str(e).splitlines() or ['the file is empty'])[0][:120]})") from None
    if isinstance(obj, dict) and "states" in obj and "model_config" in obj:   # hmar train's RUN/checkpoints/*.pt
        raise HMARError(f"{str(p)!r} is a resumable training state, not a model: pass the run's model directory "
                        f"{str(p.parent.parent / 'model')!r} (written when the run ends), or continue the run with "
                        "`hmar train ... --resume`")
    if isinstance(obj, dict) and "trainer" in obj and isinstance(obj["trainer"], dict):
        for k in ("transformer_wo_ddp", "var_wo_ddp", "vae_local"):
            if k in obj["trainer"]:
                obj = obj["trainer"][k]
                break
    for k in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and k in obj and isinstance(obj[k], dict):
            obj = obj[k]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HMARError(f"{str(p)!r} does not hold a state dict of tensors")
    return obj


def _directory_kind(d: Path) -> Optional[str]:
    """``"hmar model"`` or ``"tokenizer"`` when ``d`` holds a ``config.json`` of our formats (not another
    library's), else None."""
    try:
        fmt = json.loads((d / "config.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return {"hmar": "hmar model", TOKENIZER_FORMAT: "tokenizer"}.get(fmt)


def detect_kind(sd: Dict[str, torch.Tensor], source: Optional[PathLike] = None) -> str:
    """``vqvae``, ``hmar``, ``mp`` (stage-2), ``nsp`` (stage-1) or ``var`` from the keys (and mask); ``source``
    (the file) is named in the error for none of them."""
    if any(k.startswith("encoder.") for k in sd) and any(k.startswith("quantize.") for k in sd):
        return "vqvae"
    # by key families, not single keys: a file missing one key is still recognised (and the load names the key)
    if any(k.startswith(("base_blocks.", "ns_blocks.", "mask_blocks.", "ns_head")) for k in sd):
        return "hmar"
    if any(k.startswith("blocks.") for k in sd):
        if "mask_embed.weight" in sd:
            return "mp"
        bias = sd.get("attn_bias_for_masking")
        if bias is not None and bias.shape[-1] > 1:
            # block-causal: the first query row of the last scale sees every key; block-diagonal: not
            return "var" if torch.isfinite(bias[0, 0, -1, 0]).item() else "nsp"
        return "var"
    what = "the checkpoint" if source is None else repr(str(source))
    raise HMARError(f"{what} is neither a VQ-VAE nor an HMAR/VAR transformer (first keys: {list(sd)[:4]}): pass an "
                    "official checkpoint (vae_ch160v4096z32.pth, hmar-d*.pth, var_d*.pth) or an hmar model directory")


def _patch_nums_from_levels(lvl: torch.Tensor) -> Tuple[int, ...]:
    counts = torch.bincount(lvl.flatten()).tolist()
    pn = tuple(int(round(math.sqrt(c))) for c in counts)
    if any(p * p != c for p, c in zip(pn, counts)):
        raise HMARError(f"cannot infer the scale schedule from 'lvl_1L': level sizes {counts} are not squares")
    return pn


def infer_model_config(sd: Dict[str, torch.Tensor], kind: Optional[str] = None) -> ModelConfig:
    """The :class:`ModelConfig` that an official transformer state dict was made with."""
    kind = kind or detect_kind(sd)
    if kind == "vqvae":
        raise HMARError("this checkpoint is a VQ-VAE (tokenizer), not a transformer: pass it with --vqvae")
    head = "ns_head.weight" if kind == "hmar" else "head.weight"
    shape = lambda key: tuple(_need(sd, key, "the model's size").shape)  # noqa: E731
    widths = {"pos_start": shape("pos_start")[-1], "class_emb.weight": shape("class_emb.weight")[-1],
              "word_embed.weight": shape("word_embed.weight")[0], head: shape(head)[-1]}
    vocabs = {k: sd[k].shape[0] for k in (head, head.replace("weight", "bias"), "mask_head.weight", "mask_head.bias")
              if k in sd}
    for what, sizes in (("model width", widths), ("vocabulary size", vocabs)):
        if len(set(sizes.values())) > 1:
            raise HMARError(f"the checkpoint's tensors disagree on the {what} (" +
                            ", ".join(f"{k}: {v}" for k, v in sizes.items()) + "): the file is damaged or edited")
    C = widths["pos_start"]
    nblocks = lambda pre: len({k.split(".")[1] for k in sd if k.startswith(pre + ".")})  # noqa: E731
    if kind == "hmar":
        branch = nblocks("ns_blocks")
        depth = nblocks("base_blocks") + branch
    else:
        depth = nblocks("blocks")
        branch = min(8, depth)
    vocab = shape(head)[0]
    # the blocks' per-head scales, by majority (one of them may be missing or damaged: the strict load names it)
    heads_seen = [v.shape[1] for k, v in sd.items() if k.endswith(".attn.scale_mul_1H11") and v.dim() > 1]
    l2 = bool(heads_seen)
    heads = max(set(heads_seen), key=heads_seen.count) if l2 else max(1, C // 64)
    pn = _patch_nums_from_levels(sd["lvl_1L"]) if "lvl_1L" in sd else None
    if pn is None:
        raise HMARError("cannot infer the scale schedule: the checkpoint has no 'lvl_1L' buffer")
    return ModelConfig(kind="nsp" if kind == "mp" else kind, depth=depth, embed_dim=C, num_heads=heads,
                       num_classes=shape("class_emb.weight")[0] - 1, vocab_size=vocab,
                       z_channels=shape("word_embed.weight")[1], patch_nums=pn, branch_depth=branch,
                       attn_l2_norm=l2)


def _need(sd: Dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """``sd[key]``, or an :class:`HMARError` naming the missing key (it is needed to infer ``what``)."""
    if key not in sd:
        raise HMARError(f"the checkpoint has no {key!r} (needed to infer {what}): the file is incomplete or "
                        "not an official checkpoint")
    return sd[key]


def infer_tokenizer_config(sd: Dict[str, torch.Tensor], patch_nums=None) -> TokenizerConfig:
    """The :class:`TokenizerConfig` of an official VQ-VAE state dict (scale schedule given separately)."""
    what = "the tokenizer's size"
    ch = _need(sd, "encoder.conv_in.weight", what).shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")}) or [0]
    ch_mult = []
    for i in levels:
        key = f"encoder.down.{i}.block.0.conv1.weight"
        c = _need(sd, key, what).shape[0]
        if c < ch or c % ch:
            raise HMARError(f"{key} has {c} output channels, not a multiple of encoder.conv_in.weight's {ch}: the file "
                            "is damaged or not an official VQ-VAE")
        ch_mult.append(c // ch)
    ch_mult = tuple(ch_mult)
    nres = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    V, Cz = _need(sd, "quantize.embedding.weight", what).shape
    zs = {k: sd[k].shape[i] for k, i in (("quantize.embedding.weight", 1), ("quant_conv.weight", 0),
                                         ("post_quant_conv.weight", 1)) if k in sd}
    if len(set(zs.values())) > 1:
        raise HMARError("the checkpoint's tensors disagree on the latent channels (" +
                        ", ".join(f"{k}: {v}" for k, v in zs.items()) + "): the file is damaged or edited")
    phis = {k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")}
    share = 1 if any(k.startswith("quantize.quant_resi.qresi.") for k in sd) else len(phis)
    nsc = sd["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in sd else 10
    if patch_nums is None:
        from .presets import PATCH_NUMS
        patch_nums = PATCH_NUMS[256] if nsc == 10 else tuple(range(1, nsc + 1))
    return TokenizerConfig(vocab_size=V, z_channels=Cz, ch=ch, ch_mult=ch_mult, num_res_blocks=nres,
                           patch_nums=tuple(patch_nums), share_quant_resi=share,
                           using_sa=any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in sd),
                           using_mid_sa=any(k.startswith("encoder.mid.attn_1.") for k in sd))


def load_official_model(path: PathLike, mask_path: Optional[PathLike] = None) -> nn.Module:
    """Build and strictly load an official HMAR / VAR / stage-1 (/ stage-1 + stage-2) checkpoint."""
    sd = read_state_dict(path)
    kind = detect_kind(sd, path)
    if kind == "vqvae":
        raise HMARError(f"{str(path)!r} is a VQ-VAE (tokenizer) checkpoint, not a transformer: "
                        "pass it with --vqvae and give the transformer with --checkpoint")
    try:
        cfg = infer_model_config(sd, kind)
    except HMARError as e:
        raise HMARError(f"{str(path)!r}: {e}") from None
    if mask_path is not None or kind == "mp":
        if kind == "mp":
            raise HMARError(f"{str(path)!r} is a stage-2 (masked) checkpoint: pass the stage-1 file as the "
                            "checkpoint and this one as the mask checkpoint")
        if kind == "hmar":
            raise HMARError(f"{str(path)!r} is an assembled HMAR checkpoint: a mask checkpoint only pairs with a "
                            "stage-1 (next-scale) file; drop it")
        if kind == "var" and "attn_bias_for_masking" in sd:
            raise HMARError(f"{str(path)!r} is a VAR (block-causal) checkpoint: a mask checkpoint only pairs with a "
                            "stage-1 (next-scale, block-diagonal) file; drop it, or pass the stage-1 file")
        mp = read_state_dict(mask_path)
        if detect_kind(mp, mask_path) != "mp":
            raise HMARError(f"{str(mask_path)!r} is not a stage-2 (masked) checkpoint (no mask_embed.weight): "
                            "pass the official stage-2 file as the mask checkpoint")
        # the stage-2 file has the stage-1 layout with word_embed's bias apart and a mask embedding (hmar-spec 8.3)
        with torch.device("meta"):
            own = build_model(cfg).state_dict()
        own["word_embed_bias"] = own.pop("word_embed.bias")
        own["mask_embed.weight"] = torch.empty(1, cfg.embed_dim, device="meta")
        _check_keys(own, mp, f"the stage-2 file {str(mask_path)!r} (for the stage-1 file {str(path)!r})",
                    allow_derived=True)
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "kind": "hmar"})
        sd = nsp_to_hmar(sd, cfg.depth, cfg.branch_depth, mp)
    with torch.device("meta"):
        model = build_model(cfg)
    _strict_load(model, sd, str(path))
    return model.eval()


def load_official_tokenizer(path: PathLike, patch_nums=None) -> VQVAE:
    """Build and strictly load an official VQ-VAE checkpoint (``vae_ch160v4096z32.pth``)."""
    sd = read_state_dict(path)
    if detect_kind(sd, path) != "vqvae":
        raise HMARError(f"{str(path)!r} is a transformer checkpoint, not a VQ-VAE: pass it with --checkpoint")
    try:
        cfg = infer_tokenizer_config(sd, patch_nums)
    except HMARError as e:
        raise HMARError(f"{str(path)!r}: {e}") from None
    with torch.device("meta"):
        vq = VQVAE(cfg)
    _strict_load(vq, sd, str(path))
    return vq.eval()


def _check_keys(own: Dict[str, torch.Tensor], sd: Dict[str, torch.Tensor], name: str,
                allow_derived: bool = False) -> None:
    """:class:`HMARError` naming the first missing, unexpected, wrongly shaped or integer-for-float key of ``sd``."""
    missing = [k for k in own if k not in sd and not (allow_derived and _is_derived(k))]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and sd[k].shape != own[k].shape and not k.endswith("ema_vocab_hit_SV")]
    dtype = [f"{k} is {str(sd[k].dtype).replace('torch.', '')}, not a float" for k in sd
             if k in own and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if missing or unexpected or shape or dtype:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shape:
            parts.append(f"shape mismatch: {shape[0]}")
        if dtype:
            parts.append(f"{len(dtype)} weights of the wrong type (e.g. {dtype[0]})")
        raise HMARError(f"{name} does not match the model it claims to be: " + "; ".join(parts))


def _strict_load(module: nn.Module, sd: Dict[str, torch.Tensor], name: str, allow_derived: bool = False) -> None:
    own = module.state_dict()
    sd = {k: v for k, v in sd.items()}
    _check_keys(own, sd, name, allow_derived)
    for k in own:
        if k not in sd:
            sd[k] = _derived_value(module, k, own[k])
    if "quantize.ema_vocab_hit_SV" in sd and sd["quantize.ema_vocab_hit_SV"].shape != own["quantize.ema_vocab_hit_SV"].shape:
        sd["quantize.ema_vocab_hit_SV"] = torch.zeros(own["quantize.ema_vocab_hit_SV"].shape)
    # assign=True: modules built on the meta device take the (memory-mapped) tensors as they are
    module.load_state_dict({k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in sd.items()},
                           strict=True, assign=True)


def _derived_value(module: nn.Module, key: str, like: torch.Tensor) -> torch.Tensor:
    """Recompute a buffer that our format does not store (works for modules built on the meta device)."""
    from .model.transformer import _bias_buffer, _levels
    leaf = key.split(".")[-1]
    if leaf == "lvl_1L":
        return _levels(module.config.patch_nums)
    if leaf == "attn_bias_for_masking":
        return _bias_buffer(module.config.patch_nums, module.pattern)
    return torch.zeros(like.shape, dtype=like.dtype)  # zero_k_bias, ema_vocab_hit_SV


# ------------------------------------------------------------------------------------ our format
def save_pretrained(directory: PathLike, model: nn.Module, tokenizer: VQVAE, *,
                    class_names: Optional[list] = None, sampling: Optional[Dict[str, Any]] = None,
                    dtype: Optional[torch.dtype] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.safetensors`` into ``directory``
    (all three to temporary names, then renamed into place together). ``dtype`` (e.g. fp16) shrinks the files."""
    from safetensors.torch import save_file
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HMARError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise HMARError(f"{str(d)!r} is a file: save_pretrained writes a directory, pass a new or existing directory")
    ensure_writable_dir(d, "the model directory")
    names = class_names if class_names is not None else model.config.class_names

    def tensors(m: nn.Module) -> Dict[str, torch.Tensor]:
        out = {}
        for k, v in m.state_dict().items():
            if _is_derived(k):
                continue
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[k] = v.contiguous()
        return out

    mcfg = model.config.to_dict()
    mcfg["class_names"] = list(names) if names is not None else None
    config = {"format": "hmar", "version": FORMAT_VERSION, "model": mcfg, "tokenizer": tokenizer.config.to_dict(),
              "sampling": sampling or {}, **(extra or {})}
    # every file is written to a temporary name first; only once all three are complete are they renamed into
    # place, config.json last (the exit stack unwinds in reverse): a failed or interrupted save leaves the previous
    # files (or none), and a folder with a config.json has its weights
    with ExitStack() as stack:
        tmp = {f: stack.enter_context(atomic_path(d / f))
               for f in ("config.json", "tokenizer.safetensors", "model.safetensors")}
        save_file(tensors(model), str(tmp["model.safetensors"]))
        save_file(tensors(tokenizer), str(tmp["tokenizer.safetensors"]))
        tmp["config.json"].write_text(json.dumps(config, indent=2))
    return d


def load_pretrained(directory: PathLike, device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[nn.Module, VQVAE, Dict[str, Any]]:
    """Load a directory written by :func:`save_pretrained` (or a training run directory: its ``model/``):
    (model, tokenizer, config dict)."""
    d = Path(directory)
    if not (d / "config.json").exists() and (d / "model" / "config.json").exists():
        d = d / "model"   # `hmar train --out RUN` writes the model to RUN/model
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        if d.name == "checkpoints" and any(d.glob("step_*.pt")):
            raise HMARError(f"{str(d)!r} holds resumable training states, not a model: pass the run's model "
                            f"directory {str(d.parent / 'model')!r} (written when the run ends), or continue the "
                            "run with `hmar train ... --resume`")
        raise HMARError(f"{str(d)!r} is not an hmar model directory (no config.json); for an official .pth "
                        "file pass the file itself")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HMARError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != "hmar":
        fmt = config.get("format") if isinstance(config, dict) else None
        raise HMARError(f"{cfg_path} is not an hmar config (format={fmt!r})")
    for key in ("model", "tokenizer"):
        if not isinstance(config.get(key), dict):
            raise HMARError(f"{cfg_path} has no {key!r} section: re-save the model with save_pretrained")
    try:
        with torch.device("meta"):
            model = build_model(ModelConfig.from_dict(config["model"]))
            tok = VQVAE(TokenizerConfig.from_dict(config["tokenizer"]))
    except HMARError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise HMARError(f"{cfg_path} does not describe a valid model ({type(e).__name__}: {e})") from None
    for fname, m in (("model.safetensors", model), ("tokenizer.safetensors", tok)):
        p = d / fname
        if not p.exists():
            raise HMARError(f"{str(d)!r} has no {fname}")
        _strict_load(m, read_safetensors(p), str(p), allow_derived=True)
    tok.set_patch_nums(model.config.patch_nums)
    return model.to(device).eval(), tok.to(device).eval(), config


def load_any(checkpoint: PathLike, vqvae: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
             mask_checkpoint: Optional[PathLike] = None) -> Tuple[nn.Module, VQVAE, Dict[str, Any]]:
    """A model directory of ours, or an official transformer file plus (``vqvae``) its tokenizer file."""
    p = Path(checkpoint)
    if p.is_dir():
        if mask_checkpoint is not None:
            raise HMARError(f"{str(p)!r} is a model directory (already assembled): a mask checkpoint only pairs "
                            "with an official stage-1 file; drop it")
        model, tok, config = load_pretrained(p, device)
        if vqvae is not None:
            tok = load_official_tokenizer(vqvae, model.config.patch_nums).to(device)
            _check_pair(model, tok, p, vqvae)
        return model, tok, config
    model = load_official_model(p, mask_checkpoint)
    if vqvae is None:
        raise HMARError(f"{str(p)!r} is an official transformer file: also pass its tokenizer with --vqvae "
                        "(e.g. vae_ch160v4096z32.pth)")
    tok = load_official_tokenizer(vqvae, model.config.patch_nums)
    _check_pair(model, tok, p, vqvae)
    return model.to(device), tok.to(device), {"model": model.config.to_dict(), "sampling": {}}


def _check_pair(model: nn.Module, tok: VQVAE, checkpoint: PathLike, vqvae: PathLike) -> None:
    """The transformer draws the tokenizer's codes: same vocabulary, same latent channels."""
    m, t = model.config, tok.config
    if (m.vocab_size, m.z_channels) != (t.vocab_size, t.z_channels):
        raise HMARError(f"the tokenizer {str(vqvae)!r} (vocab {t.vocab_size}, {t.z_channels} latent channels) does "
                        f"not match the transformer {str(checkpoint)!r} (vocab {m.vocab_size}, {m.z_channels} "
                        "channels): pass the VQ-VAE it was trained with")
