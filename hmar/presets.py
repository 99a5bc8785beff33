"""Named configurations: scale schedules, masked-step schedules, tokenizer and transformer presets.

Every preset a user can ask for by name is listed here (``hmar.presets.list_presets()``).
Transformer presets follow the official size rule: width ``64 * depth``, ``depth`` heads of 64,
8 branch blocks for HMAR (below depth 8: all blocks). Any depth works through the pattern
``hmar-d<N>`` / ``var-d<N>`` (optionally suffixed ``-512``), not only the published ones.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import HMARError

# token-map side lengths per resolution (the latent is 16x smaller than the image)
PATCH_NUMS: Dict[int, Tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}

# masked-step schedules: per scale, how many tokens of the next-scale draft are kept (first entry),
# then how many are committed after each masked pass. [n] alone means no refinement there.
MASK_SCHEDULES: Dict[str, List[List[int]]] = {
    # the official 256 px default: refine the 2x2 scale once and the 3x3 scale three times (14 passes)
    "official-256": [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]],
    # the official 512 px benchmark schedule
    "official-512": [[1], [1, 3], [1, 1, 2, 5], [5, 11], [36], [81], [169], [324], [576], [1024]],
}


def schedule_none(patch_nums: Sequence[int]) -> List[List[int]]:
    """No masked refinement anywhere: pure next-scale (VAR-like) sampling, one pass per scale."""
    return [[pn * pn] for pn in patch_nums]


def schedule_coarse(patch_nums: Sequence[int], steps: int = 4, upto: int = 4) -> List[List[int]]:
    """``steps`` masked passes at every scale with side <= ``upto`` (more steps at coarse scales)."""
    out = []
    for pn in patch_nums:
        n = pn * pn
        k = min(steps, n - 1) if pn <= upto else 0
        if k <= 0:
            out.append([n])
            continue
        # keep a share of the draft, then commit the rest in k roughly equal chunks
        parts = [max(1, n // (k + 1))]
        rest = n - parts[0]
        for i in range(k):
            parts.append(rest // (k - i))
            rest -= parts[-1]
        out.append([p for p in parts if p > 0])
    return out


def default_schedule(patch_nums: Sequence[int]) -> List[List[int]]:
    """The official default for the 256/512 schedules; for any other schedule the same shape:
    one masked pass at the second scale, three at the third, none elsewhere."""
    pn = tuple(patch_nums)
    if pn == PATCH_NUMS[256]:
        return [list(s) for s in MASK_SCHEDULES["official-256"]]
    if pn == PATCH_NUMS[512]:
        return [list(s) for s in MASK_SCHEDULES["official-512"]]
    out = []
    for i, p in enumerate(pn):
        n = p * p
        if i == 1 and n == 4:
            out.append([1, 3])
        elif i == 2 and n == 9:
            out.append([1, 1, 2, 5])
        else:
            out.append([n])
    return out


def resolve_schedule(spec: Any, patch_nums: Sequence[int]) -> List[List[int]]:
    """Turn a schedule spec (None, a preset name, 'none', 'coarse', or a list of lists) into a
    validated per-scale schedule for ``patch_nums`` (numpy arrays and integers count as lists and ints)."""
    if hasattr(spec, "tolist") and not isinstance(spec, str):   # a numpy array / tensor: plain lists and ints
        spec = spec.tolist()
    if isinstance(spec, (list, tuple)):
        spec = [s.tolist() if hasattr(s, "tolist") else s for s in spec]   # rows given as arrays
    if spec is None or (isinstance(spec, str) and spec == "default"):
        sched = default_schedule(patch_nums)
    elif isinstance(spec, str):
        if spec == "none":
            sched = schedule_none(patch_nums)
        elif spec == "coarse":
            sched = schedule_coarse(patch_nums)
        elif spec in MASK_SCHEDULES:
            sched = [list(s) for s in MASK_SCHEDULES[spec]]
        else:
            import json
            try:
                sched = json.loads(spec)
            except json.JSONDecodeError:
                raise HMARError(f"unknown schedule {spec!r}: use 'default', 'none', 'coarse', "
                                f"{', '.join(repr(k) for k in MASK_SCHEDULES)} or a JSON list like [[1],[1,3],...]")
    else:
        sched = spec
    if not isinstance(sched, (list, tuple)):
        raise HMARError(f"the schedule {spec!r} is not a list of per-scale lists: use a name ('default', 'none', "
                        f"'coarse', ...) or a list like [[1],[1,3],...]")
    validate_schedule(sched, patch_nums)
    return [[int(c) for c in s] for s in sched]


def validate_schedule(sched: Sequence[Sequence[int]], patch_nums: Sequence[int]) -> None:
    """Raise :class:`HMARError` unless every scale's counts are positive and sum to its token count."""
    if len(sched) != len(patch_nums):
        raise HMARError(f"the schedule has {len(sched)} entries but the model has {len(patch_nums)} scales "
                        f"{tuple(patch_nums)}: give one list per scale")
    for si, (s, pn) in enumerate(zip(sched, patch_nums)):
        counts_ok = isinstance(s, (list, tuple)) and all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                                         and c > 0 for c in s)   # numpy ints too; no bools
        if not s or not counts_ok:
            raise HMARError(f"schedule entry {si} is {s!r}: it must be a non-empty list of positive integers")
        if sum(s) != pn * pn:
            raise HMARError(f"schedule entry {si} {list(s)} sums to {sum(s)}, but scale {si} is {pn}x{pn} = "
                            f"{pn * pn} tokens: the counts of each scale must sum to its token count")


def check_patch_nums(patch_nums: Sequence[Any], what: str = "patch_nums", first_is_one: bool = False) -> Tuple[int, ...]:
    """``patch_nums`` as a tuple of ints, or :class:`HMARError` unless it is a non-empty, strictly increasing list of
    positive integers (and, for a transformer, starting at 1: the start token is one position)."""
    try:
        pn = tuple(patch_nums)
    except TypeError:
        raise HMARError(f"{what} must be a list of scale sides like (1, 2, 3, 4), got {patch_nums!r}") from None
    if not pn or not all(isinstance(p, numbers.Real) and not isinstance(p, bool) and float(p).is_integer() for p in pn):
        raise HMARError(f"{what} must be a non-empty list of integer scale sides like (1, 2, 3, 4), got {patch_nums!r}")
    pn = tuple(int(p) for p in pn)
    if pn[0] < 1 or any(b <= a for a, b in zip(pn, pn[1:])):
        raise HMARError(f"{what} {pn} must be positive and strictly increasing (coarse to fine), e.g. (1, 2, 3, 4)")
    if first_is_one and pn[0] != 1:
        raise HMARError(f"{what} {pn} must start with 1: the first scale is the single start token (1x1)")
    return pn


@dataclass
class TokenizerConfig:
    """VAR's multi-scale residual VQ-VAE. Defaults are the official ``vae_ch160v4096z32``."""
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: Tuple[int, ...] = PATCH_NUMS[256]
    share_quant_resi: int = 4          # number of shared phi convs (0: one per scale, 1: one for all)
    quant_resi: float = 0.5            # phi mixing ratio
    beta: float = 0.25                 # commitment weight (tokenizer training)
    dropout: float = 0.0
    using_sa: bool = True
    using_mid_sa: bool = True
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.patch_nums = check_patch_nums(self.patch_nums, "the tokenizer's patch_nums")
        positive = lambda v: not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 1  # noqa: E731
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "norm_groups"):
            if not positive(getattr(self, name)):
                raise HMARError(f"the tokenizer's {name} must be an integer >= 1, got {getattr(self, name)!r}")
        try:
            self.ch_mult = tuple(self.ch_mult)
        except TypeError:
            raise HMARError(f"the tokenizer's ch_mult must be a list of integers >= 1, got {self.ch_mult!r}") from None
        if not self.ch_mult or not all(positive(m) for m in self.ch_mult):
            raise HMARError(f"the tokenizer's ch_mult must be a list of integers >= 1, got {self.ch_mult!r}")
        odd = sorted({c for c in (self.ch, *(self.ch * m for m in self.ch_mult)) if c % self.norm_groups})
        if odd:   # GroupNorm splits every level's channels (ch itself: the first block's input) into norm_groups
            raise HMARError(f"the tokenizer's channel widths {odd} (ch {self.ch}, times ch_mult) are not divisible by "
                            f"its norm_groups {self.norm_groups}: choose ch (or norm_groups) so that they are; the "
                            f"official VQ-VAE uses 32 groups")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise HMARError(f"unknown tokenizer config keys {sorted(bad)}; known: {sorted(known)}")
        d = dict(d)
        for k in ("ch_mult", "patch_nums"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class ModelConfig:
    """A scale-wise AdaLN transformer.

    ``kind``: ``"hmar"`` (trunk + next-scale branch + masked branch, block-diagonal),
    ``"nsp"`` (stage-1 next-scale model, block-diagonal, official stage-1 key layout) or
    ``"var"`` (VAR, block-causal, KV cache at inference).
    """
    kind: str = "hmar"
    depth: int = 16
    embed_dim: Optional[int] = None     # default 64 * depth
    num_heads: Optional[int] = None     # default depth
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: Tuple[int, ...] = PATCH_NUMS[256]
    branch_depth: int = 8               # HMAR: blocks in each branch (official: 8)
    drop_path_rate: Optional[float] = None  # default 0.1 * depth / 24
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    class_names: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if self.kind not in ("hmar", "nsp", "var"):
            raise HMARError(f"model kind {self.kind!r} is unknown: use 'hmar', 'nsp' or 'var'")
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        self.patch_nums = check_patch_nums(self.patch_nums, "the model's patch_nums", first_is_one=True)
        if self.depth < 1:
            raise HMARError(f"depth must be >= 1, got {self.depth}")
        for name in ("embed_dim", "num_heads", "vocab_size", "z_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise HMARError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.mlp_ratio > 0 or round(self.embed_dim * self.mlp_ratio) < 1:
            raise HMARError(f"mlp_ratio must be > 0 (the FFN's hidden width is embed_dim * mlp_ratio), got {self.mlp_ratio!r}")
        if self.embed_dim % self.num_heads:
            raise HMARError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.kind == "hmar" and not (1 <= self.branch_depth <= self.depth):
            raise HMARError(f"branch_depth {self.branch_depth} must be between 1 and depth {self.depth}")

    def stage_one(self) -> "ModelConfig":
        """The model stage 1 trains: for ``hmar``, the next-scale model (``nsp``, the official stage-1 layout) of the
        same depth, width and scales, whose branches stage 2 adds; a model of another kind is its own stage 1."""
        if self.kind != "hmar":
            return self
        d = self.to_dict()
        d["kind"] = "nsp"
        return ModelConfig.from_dict(d)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * 16

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise HMARError(f"unknown model config keys {sorted(bad)}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------- the registry
TINY_PATCH_NUMS = (1, 2, 3, 4)

_TOKENIZERS: Dict[str, Dict[str, Any]] = {
    "vqvae-ch160": {},  # official vae_ch160v4096z32
    "vqvae-ch160-512": {"patch_nums": PATCH_NUMS[512]},
    # small tokenizers for CPU tests, demos and small data (64 px images -> 4x4 latent)
    "vqvae-tiny": dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4), patch_nums=TINY_PATCH_NUMS),
    "vqvae-small": dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2, 4), patch_nums=(1, 2, 3, 4, 6, 8)),
    # small-image tokenizers (8x8 latent): 64 px (the shipped emoji model) and 32 px (Fashion-MNIST)
    "vqvae-64": dict(vocab_size=1024, z_channels=16, ch=48, ch_mult=(1, 1, 2, 2), norm_groups=16,
                     patch_nums=(1, 2, 3, 4, 5, 6, 8)),
    "vqvae-32": dict(vocab_size=512, z_channels=16, ch=48, ch_mult=(1, 2, 2), norm_groups=16,
                     patch_nums=(1, 2, 3, 4, 6, 8)),
}

_TINY_MODELS: Dict[str, Dict[str, Any]] = {
    "hmar-tiny": dict(kind="hmar", depth=4, embed_dim=64, num_heads=2, branch_depth=2, num_classes=10,
                      vocab_size=64, z_channels=8, patch_nums=TINY_PATCH_NUMS),
    "var-tiny": dict(kind="var", depth=4, embed_dim=64, num_heads=2, num_classes=10,
                     vocab_size=64, z_channels=8, patch_nums=TINY_PATCH_NUMS),
    "nsp-tiny": dict(kind="nsp", depth=4, embed_dim=64, num_heads=2, num_classes=10,
                     vocab_size=64, z_channels=8, patch_nums=TINY_PATCH_NUMS),
    "hmar-small": dict(kind="hmar", depth=6, embed_dim=256, num_heads=4, branch_depth=3, num_classes=10,
                       vocab_size=512, z_channels=16, patch_nums=(1, 2, 3, 4, 6, 8)),
    "var-small": dict(kind="var", depth=6, embed_dim=256, num_heads=4, num_classes=10,
                      vocab_size=512, z_channels=16, patch_nums=(1, 2, 3, 4, 6, 8)),
    # pair with vqvae-64 (the shipped emoji model: 9 classes) and vqvae-32 (Fashion-MNIST: 10 classes)
    "hmar-64": dict(kind="hmar", depth=6, embed_dim=256, num_heads=4, branch_depth=2, num_classes=9,
                    vocab_size=1024, z_channels=16, patch_nums=(1, 2, 3, 4, 5, 6, 8)),
    "var-64": dict(kind="var", depth=6, embed_dim=256, num_heads=4, num_classes=9,
                   vocab_size=1024, z_channels=16, patch_nums=(1, 2, 3, 4, 5, 6, 8)),
    "hmar-32": dict(kind="hmar", depth=6, embed_dim=256, num_heads=4, branch_depth=2, num_classes=10,
                    vocab_size=512, z_channels=16, patch_nums=(1, 2, 3, 4, 6, 8)),
    "var-32": dict(kind="var", depth=6, embed_dim=256, num_heads=4, num_classes=10,
                   vocab_size=512, z_channels=16, patch_nums=(1, 2, 3, 4, 6, 8)),
}

_NAMED = re.compile(r"^(hmar|var|nsp)-d(\d+)(?:-(256|512|1024))?$")


def list_presets() -> Dict[str, List[str]]:
    """All preset names: transformers (the published depths; any depth also works) and tokenizers."""
    models = [f"{k}-d{d}{r}" for k in ("hmar", "var") for d in (16, 20, 24, 30) for r in ("", "-512")]
    return {"models": models + list(_TINY_MODELS), "tokenizers": list(_TOKENIZERS)}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a preset name such as ``hmar-d16``, ``var-d30-512`` or ``hmar-tiny``."""
    if name in _TINY_MODELS:
        return ModelConfig(**{**_TINY_MODELS[name], **overrides})
    m = _NAMED.match(name)
    if not m:
        raise HMARError(f"unknown model preset {name!r}; known: {', '.join(list_presets()['models'])} "
                        f"(any depth works: hmar-d<N>, var-d<N>, nsp-d<N>, optional -512)")
    kind, depth, res = m.group(1), int(m.group(2)), int(m.group(3) or 256)
    # 8 branch blocks (official); shallower models than that are all branch (no shared trunk)
    return ModelConfig(**{"kind": kind, "depth": depth, "patch_nums": PATCH_NUMS[res],
                          "branch_depth": min(8, depth), **overrides})


def tokenizer_config(name: str = "vqvae-ch160", **overrides: Any) -> TokenizerConfig:
    """The :class:`TokenizerConfig` of a preset name (``vqvae-ch160`` is VAR's official tokenizer)."""
    if name not in _TOKENIZERS:
        raise HMARError(f"unknown tokenizer preset {name!r}; known: {', '.join(_TOKENIZERS)}")
    return TokenizerConfig(**{**_TOKENIZERS[name], **overrides})
