"""Sampling: the HMAR sampler (next-scale draft + masked refinement, no KV cache) and the VAR
sampler (KV cache), sharing guidance, top-k / top-p / temperature and seeding.

Per scale ``si`` (side ``pn``, ``n = pn^2`` tokens):

1. **Draft.** One next-scale pass on ``area(f_hat, pn)``; classifier-free guidance with VAR's
   linear ramp ``t = cfg * si / (S - 1)``, logits ``(1 + t) * cond - t * uncond``; sample every token.
2. **Refine** (HMAR, when the schedule entry ``[k0, k1, ..., km]`` has ``m >= 1`` passes): keep the
   ``k0`` most confident draft tokens (probability of the sampled token), mask the rest; each masked
   pass resamples the masked positions only and commits the ``k_j`` most confident of them; a
   committed token is never re-masked. Guidance inside masked passes is off by default (as in the
   official code) and on with ``guide_masked=True``.
3. ``f_hat += phi(up(e[tokens]))``; the next scale's input is ``area(f_hat, pn_next)``.

``constraints`` (used by :mod:`hmar.editing`) fixes known tokens per scale: they are written over
the draft, never masked, and act as context for the masked passes.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import HMARError
from .presets import resolve_schedule

Constraint = Tuple[torch.Tensor, torch.Tensor]  # (known indices [B, n], keep mask [B, n] bool)


@dataclass
class StepInfo:
    """What one transformer pass did (passed to ``callback``; for tests, progress and UIs)."""
    scale: int
    step: int                   # 0: next-scale draft, j >= 1: j-th masked pass
    kind: str                   # "next_scale" or "masked"
    before: torch.Tensor        # tokens before the pass ([B, n]; the draft itself for step 0)
    after: torch.Tensor         # tokens after the pass
    masked: Optional[torch.Tensor] = None  # positions the pass was allowed to overwrite


@dataclass
class SampleOutput:
    indices: List[torch.Tensor]          # per scale [B, pn^2]
    f_hat: torch.Tensor                  # accumulated latent [B, Cz, H, W]
    images: Optional[torch.Tensor] = None  # [B, 3, R, R] in [0, 1] when decoded
    passes: int = 0                      # transformer passes per image


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf the logits outside the ``top_k`` largest and outside the smallest set whose
    probability mass reaches ``top_p`` (the most likely token always survives). 0 disables either."""
    V = logits.shape[-1]
    use_k, use_p = 0 < top_k < V, 0.0 < top_p < 1.0
    if not (use_k or use_p):
        return logits
    # one ascending sort serves both filters (the k-th largest value is in it: no separate topk)
    sorted_logits, order = logits.sort(dim=-1)
    if use_k:
        kth = sorted_logits[..., V - top_k:V - top_k + 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        # the dropped values are the smallest, at the front: the sorted row stays sorted
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if use_p:
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _top_p_of_sorted(vals: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`filter_logits`'s top-p filter on logits sorted in descending order (a token goes when the mass of the
    more likely ones reaches ``top_p``; the first always stays)."""
    if not 0.0 < top_p < 1.0:
        return vals
    cum = vals.softmax(-1).cumsum(-1)
    before = torch.cat((torch.zeros_like(cum[..., :1]), cum[..., :-1]), -1)   # the mass of the more likely tokens
    return vals.masked_fill(before >= top_p, float("-inf"))


_SHIFT_BELOW_TEMPERATURE = 1e-4   # (fp32 logits would need |x| > 3e34 to overflow above it)


def shifted_temperature(temperature: float) -> Tuple[float, bool]:
    """(the temperature to divide by, whether each row's max must be subtracted first). Below 1e-4,
    ``logits / temperature`` could overflow to inf (a NaN softmax: token 0 everywhere); with the max subtracted it is
    the same distribution, the greedy limit. A temperature that is 0 in fp32 would make the max 0 / 0: it is floored
    at the smallest normal fp32, greedy already. Shared by the torch draw and the Triton draw kernel."""
    shift = temperature < _SHIFT_BELOW_TEMPERATURE
    return (max(temperature, torch.finfo(torch.float32).tiny) if shift else temperature), shift


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator, top_k: int = 0, top_p: float = 0.0,
                       temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position of ``logits`` ``[B, n, V]``; returns (tokens, their probabilities after the
    filters of :func:`filter_logits`). It does not check ``logits`` (non-finite ones give arbitrary tokens):
    :func:`sample` does, once per call.

    With ``0 < top_k < V`` only the ``top_k`` candidates of ``torch.topk`` are ever softmaxed and drawn from
    (a ``[.., top_k]`` problem instead of a sort and half a dozen passes over ``[.., V]``); they are the tokens
    :func:`filter_logits` keeps, except that exactly ``top_k`` survive a tie at the k-th value."""
    if temperature <= 0:
        raise HMARError(f"temperature must be > 0, got {temperature}")
    V = logits.shape[-1]
    temperature, shift = shifted_temperature(temperature)   # a tiny one: the row's max first (no overflow)
    if 0 < top_k < V:
        vals, cand = logits.topk(top_k, dim=-1)            # descending; temperature keeps the order
        vals = vals.float()
        if shift:
            vals = vals - vals[..., :1]
        probs = _top_p_of_sorted(vals / temperature, top_p).softmax(-1)
    else:
        x = logits.float()
        if shift:
            x = x - x.amax(-1, keepdim=True)
        probs, cand = filter_logits(x / temperature, 0, top_p).softmax(-1), None
    flat = probs.reshape(-1, probs.shape[-1])
    # one draw per row as torch.multinomial makes it over the V tokens (argmax of p / q, q ~ Exp(1); the same
    # generator calls, so the same tokens for a seed), without its host-side validity checks: no GPU
    # synchronisation, CUDA-graph safe. With top-k, the q of the candidates are picked out of the V drawn.
    q = torch.empty(flat.shape[0], V, device=generator.device).exponential_(1, generator=generator).to(flat.device)
    if cand is not None:
        cand = cand.reshape(-1, top_k)
        q = q.gather(1, cand)
    j = (flat / q).argmax(-1, keepdim=True)
    conf = flat.gather(1, j)
    tok = j if cand is None else cand.gather(1, j)
    return tok.view(probs.shape[:-1]), conf.view(probs.shape[:-1])


def draw_tokens(logits: torch.Tensor, gen: torch.Generator, weight: Optional[float], top_k: int, top_p: float,
                temperature: float, bad: torch.Tensor, fused: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass's draw: ``logits`` ``[2B, n, V]`` (cond rows first) guided as ``lerp(uncond, cond, weight)``, or
    ``[B, n, V]`` when ``weight`` is None; returns (tokens, confidences, ``bad`` or-ed with "some logits were not
    finite"). ``fused`` (a model's ``fused_draw``, set by :class:`hmar.accel.GraphedModel`): all of it in one
    Triton kernel (:func:`hmar.draw_kernel.fused_draw`), with the same Exp(1) draws from ``gen``; else as torch
    ops (the finite check, ``torch.lerp``, :func:`sample_from_logits`)."""
    if fused:
        from .draw_kernel import fused_draw
        rows = logits.numel() // logits.shape[-1] // (1 if weight is None else 2)
        q = torch.empty(rows, logits.shape[-1], device=gen.device).exponential_(1, generator=gen).to(logits.device)
        tok, conf, rows_bad = fused_draw(logits, q, weight, top_k, top_p, temperature)
        return tok, conf, bad | rows_bad.any()
    bad = bad | ~logits.isfinite().all()
    if weight is not None:
        B = logits.shape[0] // 2
        logits = torch.lerp(logits[B:], logits[:B], weight)    # (1 + t) cond - t uncond, one kernel
    return (*sample_from_logits(logits, gen, top_k, top_p, temperature), bad)


def _least_confident(conf: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``count[b]`` least confident positions among ``candidates`` (bool ``[B, n]``)."""
    score = conf.masked_fill(~candidates, float("inf"))
    order = score.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < count[:, None]) & candidates


def make_generator(seed_or_gen: Union[int, torch.Generator, None], device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` from a seed (or the given generator; a fresh random one for None)."""
    if isinstance(seed_or_gen, torch.Generator):
        if seed_or_gen.device.type != torch.device(device).type:
            raise HMARError(f"the generator is on {seed_or_gen.device} but the model runs on {device}: make it with "
                            f"torch.Generator(device={str(device)!r}), or pass an integer seed")
        return seed_or_gen
    g = torch.Generator(device=device)
    if seed_or_gen is None:
        g.seed()
        return g
    if isinstance(seed_or_gen, bool) or not isinstance(seed_or_gen, numbers.Integral):
        raise HMARError(f"the seed must be an integer, a torch.Generator or None, got {seed_or_gen!r}")
    if not -2 ** 63 <= int(seed_or_gen) < 2 ** 64:
        raise HMARError(f"the seed {int(seed_or_gen)} does not fit in 64 bits: use a seed in 0..2**64-1")
    g.manual_seed(int(seed_or_gen))
    return g


MAX_CFG = 1000.0   # the largest guidance scale check_options accepts


def check_options(cfg: float, top_k: int, top_p: float, temperature: float) -> None:
    """Raise :class:`HMARError` for a sampling option outside its domain (NaN guidance, negative top-k, ...)."""
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
    if not real(cfg) or not math.isfinite(cfg):
        raise HMARError(f"cfg (the guidance scale) must be a finite number, got {cfg!r}")
    if abs(cfg) > MAX_CFG:   # beyond it the guided logits overflow fp32 (inf, then NaN probabilities)
        raise HMARError(f"cfg (the guidance scale) must be within +-{MAX_CFG:g}, got {cfg!r} "
                        f"(useful scales are about 1 to 10)")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise HMARError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not real(top_p) or not 0.0 <= top_p <= 1.0:                # NaN fails the comparison too
        raise HMARError(f"top_p must be a number in [0, 1] (0 or 1: off), got {top_p!r}")
    if not real(temperature) or not 0.0 < temperature < math.inf:
        raise HMARError(f"temperature must be a finite number > 0, got {temperature!r}")


def class_id(label: Union[int, str, torch.Tensor], names: Optional[Sequence[str]]) -> int:
    """A class id (not range-checked) from an int, a one-element integer tensor, an id as text ("3", " -1") or a
    class name of ``names`` (case-insensitive, surrounding spaces ignored). :class:`HMARError` for anything else."""
    if isinstance(label, str):
        text = label.strip()
        if re.fullmatch(r"-?[0-9]+", text):   # an id; "--1" or "1-" is no id and no name either
            return int(text)
        low = [n.lower() for n in (names or [])]
        if text.lower() not in low:
            raise HMARError(f"unknown class name {label!r}; known: {', '.join(names or []) or 'none (use ids)'}")
        return low.index(text.lower())
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise HMARError(f"a class label must be an integer id or a class name, got {label!r}")
    return int(label)


def check_labels(labels: Union[Sequence[int], torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor:
    """Labels as a LongTensor (``-1``, unconditional, becomes the null class ``num_classes``).
    Raises :class:`HMARError` for ids outside ``-1 .. num_classes - 1``."""
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise HMARError(f"class labels must be integer ids (-1 for unconditional), got {labels!r}") from None
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):   # 1.5 / True: no ids
        raise HMARError(f"class labels must be integer ids (-1 for unconditional), got {labels!r}")
    t = t.long().flatten()
    if t.numel() == 0:
        raise HMARError("no class labels given: pass at least one class id (-1 for unconditional)")
    bad = [int(x) for x in t if not (-1 <= int(x) < num_classes)]
    if bad:
        raise HMARError(f"class id {bad[0]} is out of range: this model has {num_classes} classes "
                        f"(0..{num_classes - 1}; -1 for unconditional)")
    return torch.where(t < 0, num_classes, t).to(device)


@torch.no_grad()
def sample(model: nn.Module, tokenizer: nn.Module, labels: Union[Sequence[int], torch.Tensor], *,
           cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, temperature: float = 1.0,
           schedule=None, guide_masked: bool = False, generator: Union[int, torch.Generator, None] = 0,
           decode: bool = True, constraints: Optional[Sequence[Optional[Constraint]]] = None,
           callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False) -> SampleOutput:
    """Generate images of ``labels`` with an HMAR, stage-1 or VAR ``model`` and its ``tokenizer``.

    ``schedule``: masked-step schedule (see :func:`hmar.presets.resolve_schedule`); checked for every model
    but used only by one with a masked branch. Returns a :class:`SampleOutput` (images in [0, 1] if ``decode``).
    Raises :class:`HMARError` when the model's logits are not finite (NaN / inf: broken weights, or an
    overflow in low precision).
    """
    check_options(cfg, top_k, top_p, temperature)
    if not isinstance(guide_masked, bool):
        raise HMARError(f"guide_masked must be True or False, got {guide_masked!r}")
    cfgm = model.config
    quant = tokenizer.quantize if hasattr(tokenizer, "quantize") else tokenizer
    if tuple(quant.patch_nums) != tuple(cfgm.patch_nums):   # the tokenizer's own setter keeps its config in step
        (tokenizer if hasattr(tokenizer, "set_patch_nums") else quant).set_patch_nums(cfgm.patch_nums)
    if quant.vocab_size != cfgm.vocab_size or quant.z_channels != cfgm.z_channels:
        raise HMARError(f"tokenizer (vocab {quant.vocab_size}, {quant.z_channels} latent channels) does not match "
                        f"the model (vocab {cfgm.vocab_size}, {cfgm.z_channels} channels): pass the tokenizer it was trained with")
    has_mask = hasattr(model, "masked_logits")
    sched = resolve_schedule(schedule, cfgm.patch_nums)   # checked for every model, used by a masked branch
    sched = sched if has_mask else None
    y = check_labels(labels, cfgm.num_classes, model.device)
    gen = make_generator(generator, model.device)
    if constraints is not None and len(constraints) != len(cfgm.patch_nums):
        raise HMARError(f"constraints need one entry per scale ({len(cfgm.patch_nums)}), got {len(constraints)}")
    options = dict(cfg=float(cfg), top_k=int(top_k), top_p=float(top_p), temperature=float(temperature),
                   sched=None if sched is None else tuple(map(tuple, sched)), guide_masked=bool(guide_masked))

    def loop(m, y_, g):
        return scale_loop(m, quant, y_, g, constraints=constraints, callback=callback, progress=progress,
                          **options)

    run_loop = getattr(model, "run_loop", None)        # a CUDA-graphed model replays the whole loop
    if run_loop is not None and constraints is None and callback is None:
        out_idx, f_hat, passes, bad = run_loop(loop, y, gen, key=(id(quant), *sorted(options.items())))
    else:
        out_idx, f_hat, passes, bad = loop(model, y, gen)
    if bool(bad):
        raise HMARError("the model produced non-finite logits (NaN or inf): its weights are broken, or it overflowed "
                        "in low precision (try fp32)")
    images = None
    if decode:
        images = (tokenizer.fhat_to_img(f_hat) + 1) / 2
    return SampleOutput(out_idx, f_hat, images, passes)


def scale_loop(model: nn.Module, quant: nn.Module, y: torch.Tensor, gen: torch.Generator, *, cfg: float,
               top_k: int, top_p: float, temperature: float, sched, guide_masked: bool,
               constraints: Optional[Sequence[Optional[Constraint]]] = None,
               callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False
               ) -> Tuple[List[torch.Tensor], torch.Tensor, int, torch.Tensor]:
    """The per-scale loop of :func:`sample` on checked inputs (``y``: class ids with the null class for -1;
    ``sched``: a resolved schedule; None for a model without a masked branch). It never waits for the GPU (no host
    synchronisation), so a CUDA graph can capture it whole (:meth:`hmar.accel.GraphedModel.run_loop`).
    Returns (indices per scale, f_hat, passes per image, a bool tensor: some logits were not finite)."""
    cfgm = model.config
    device = y.device
    B, S = y.shape[0], len(cfgm.patch_nums)
    use_cfg = cfg != 0
    null = torch.full_like(y, cfgm.num_classes)
    cond_all = model.class_emb(torch.cat((y, null)))               # the start token's input
    # every pass takes the AdaLN modulations computed here once (they depend on the class only)
    ada_all = model.precompute_condition(cond_all) if hasattr(model, "precompute_condition") else cond_all
    cond = ada_all[:B]
    caches = model.new_caches()
    size = cfgm.patch_nums[-1]
    f_hat = torch.zeros(B, cfgm.z_channels, size, size, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    x_small: Optional[torch.Tensor] = None
    out_idx: List[torch.Tensor] = []
    passes = 0
    fused = getattr(model, "fused_draw", False)

    def draw(logits: torch.Tensor, weight: Optional[float], bad: torch.Tensor):
        """Tokens and confidences of one pass (guided with ``weight = 1 + t`` when given), and ``bad`` updated."""
        return draw_tokens(logits, gen, weight, top_k, top_p, temperature, bad, fused)

    it = range(S)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="scales", leave=False)

    for si in it:
        pn = cfgm.patch_nums[si]
        n = pn * pn
        t = cfg * si / max(S - 1, 1)
        # ---------------- next-scale draft (cond and uncond rows in one batch)
        x = model.embed_first(cond_all) if si == 0 else model.embed_scale(si, x_small).repeat(2, 1, 1)
        guided = use_cfg and (t != 0 or caches is not None)
        if not guided:
            x, c = x[:B], cond
        else:
            c = ada_all
        logits = model.next_scale_logits(x, c, caches)
        passes += 1
        tok, conf, bad = draw(logits, 1 + t if guided else None, bad)
        draft = tok
        keep = None
        if constraints is not None and constraints[si] is not None:
            known, keep = constraints[si]
            keep = keep.to(device)
            tok = torch.where(keep, known.to(device), tok)
            conf = conf.masked_fill(keep, float("inf"))
        if callback:
            callback(StepInfo(si, 0, "next_scale", draft, tok, None if keep is None else ~keep))

        # ---------------- masked refinement
        steps = sched[si] if sched is not None else [n]        # [n]: no masked pass
        if len(steps) > 1 and si > 0:
            free = torch.ones(B, n, dtype=torch.bool, device=device) if keep is None else ~keep
            u = free.sum(1)                                     # tokens to generate per image
            remaining = [sum(steps[j + 1:]) for j in range(len(steps))]
            count = lambda j: torch.where(u == n, torch.full_like(u, remaining[j]),  # noqa: E731
                                          (u.float() * remaining[j] / n).round().long())
            M = _least_confident(conf, free, count(0))
            for j in range(1, len(steps)):
                x_cur = quant.current_scale_input(si, tok)
                xm = model.embed_masked(si, x_small, x_cur, M)
                guided_m = guide_masked and use_cfg and t != 0
                lm = model.masked_logits(xm.repeat(2, 1, 1), ada_all) if guided_m else model.masked_logits(xm, cond)
                passes += 1
                new, newconf, bad = draw(lm, 1 + t if guided_m else None, bad)
                before = tok
                tok = torch.where(M, new, tok)
                if callback:
                    callback(StepInfo(si, j, "masked", before, tok, M))
                if j < len(steps) - 1:
                    M = _least_confident(newconf, M, count(j))
        out_idx.append(tok)
        f_hat, x_small = quant.add_scale(si, f_hat, quant.lookup(tok, pn))

    return out_idx, f_hat, passes, bad
