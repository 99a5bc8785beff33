"""Training throughput of the transformer stages through the trainer's own step (``hmar.training.loop.train_step``):
random token indices and labels (no tokenizer encoder, no data loading), bf16 autocast on GPU, fused AdamW,
the official loss weighting and clipping.

    python benchmarks/bench_train.py                                  # hmar-d16 stage 1 and var-d16, batch 32
    python benchmarks/bench_train.py --preset hmar-d16 --stage masked --batch 32 --json out.json
    python benchmarks/bench_train.py --preset hmar-d16 --compile --attention-backend triton
    python benchmarks/bench_train.py --preset hmar-d16 --matrix --attention-backend auto per_scale
    python benchmarks/bench_train.py --preset hmar-d16 var-d16 --compare-compile   # eager vs compiled
    python benchmarks/bench_train.py --preset hmar-d16 --compile --qk-norm both   # q/k normalisation: ops vs kernels
    python benchmarks/bench_train.py --preset hmar-d16 --compile --qk-norm both --packed-qkv both   # + dqkv layout
    python benchmarks/bench_train.py --preset hmar-d16 --compile --fused-norm both   # LayerNorm + AdaLN kernels
    python benchmarks/bench_train.py --preset hmar-d30 --compile --compile-scope both   # whole model vs per block
    python benchmarks/bench_train.py --preset hmar-d16 --compile --fp8 both   # bf16 vs fp8 block GEMMs
    python benchmarks/bench_train.py --preset hmar-d30 --compile --clip-in-kernel both   # clipping pass vs in AdamW
    python benchmarks/bench_train.py --preset hmar-tiny --device cpu --steps 5   # smoke test

One configuration = preset x stage x (eager | ``--compile``) x (``--chunked-ce`` | ``--no-chunked-ce``) x
attention backend. ``--matrix`` runs, per preset, every combination of {eager, compiled} x {plain CE, chunked CE}
x the listed ``--attention-backend`` values side by side in one process (fresh model and optimiser each, same
seed and data) and prints each one's speed relative to the first (eager, plain CE, first backend).
``--qk-norm both`` runs every configuration with the L2 normalisation of q and k as ops of their own (``unfused``:
``hmar train --qk-norm ops``) and then inside the attention kernels (``fused``: ``--qk-norm kernels``), side by side,
the second compared with the first (default ``auto``: the trainer's choice, kernels on CUDA); the fused one hands the
kernels the packed qkv projection, whose gradient they write in its own layout (``--packed-qkv both``: unpacked q, k,
v first, then packed: :data:`hmar.attention.PACKED_QKV`). ``--dq-atomic both`` runs the Triton backward with its dQ
tiles and then with dq summed by atomics in the dK/dV programs (:data:`hmar.attention.triton_kernel.DQ_ATOMIC`).
``--fused-norm both`` does the same for each residual add +
LayerNorm + modulation as torch ops (``off``) and as hmar's Triton kernel and its backward (``on``:
:data:`hmar.model.blocks.FUSED_NORM_TRAINING`). ``--compile-scope both`` compiles the whole forward as one graph
(``model``, the default) and then each block on its own (``blocks``: one compiled graph shared by every block, so the
first step's compile time, printed too, does not grow with depth). ``--compile-mode default reduce-overhead`` runs
torch.compile's modes side by side (reduce-overhead: the compiled forward and backward as CUDA graphs). ``--fp8 both``
runs the blocks' four linears in bf16, then in fp8 (``hmar train --fp8``: :mod:`hmar.model.fp8_training`).
``--clip-in-kernel both`` clips the gradients with ``clip_grad_norm_``'s multiply pass, then inside the fused AdamW
kernel (the default: :func:`hmar.training.optim.clip_and_step`). Several
side-by-side options combine; each configuration is compared with the one that has them at their first values.

Presets of the performance goals: ``hmar-d16`` (>= 500 img/s at batch 32), ``hmar-d30`` (>= 91 img/s),
``hmar-d16-512`` (>= 129 img/s); ``var-d16`` for the VAR comparison. At their goal batch each line ends with the
ratio to the official VAR step's img/s (``OFFICIAL_IMG_S``, reference figures) and whether the goal is met. Prints images/s, ms/step, peak GPU memory
and the final loss per configuration (with ``--model-override drop_path_rate=0 cond_drop_rate=0`` the losses of
all variants must agree up to rounding: a cheap check that the fast paths compute the same thing);
``--json`` writes them to a file.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hmar.attention  # noqa: E402  (FUSED_QK_NORM: --qk-norm)
import hmar.model.blocks as blocks  # noqa: E402  (FUSED_NORM_TRAINING: --fused-norm)
from hmar.attention import triton_kernel  # noqa: E402  (DQ_ATOMIC: --dq-atomic)
from _inductor import inductor_patch, inductor_settings  # noqa: E402  (benchmarks/, this script's folder)
from hmar.attention import TRAINING_BACKENDS, choose_backend  # noqa: E402
from hmar.model import HMAR, build_model, init_weights  # noqa: E402
from hmar.presets import ModelConfig, model_config  # noqa: E402
from hmar.tokenizer.quantizer import MultiScaleQuantizer  # noqa: E402
from hmar.training.config import parse_overrides  # noqa: E402
from hmar.training.distributed import DistInfo, resolve_device  # noqa: E402
from hmar.training.loop import prepare_training, train_step  # noqa: E402
from hmar.training.losses import draw_masks  # noqa: E402
from hmar.training.optim import apply_schedule  # noqa: E402

GOAL_PRESETS = ("hmar-d16", "var-d16", "hmar-d30", "hmar-d16-512")


def build(preset: str, stage: str, device: torch.device, overrides: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """The model a run of ``hmar train --model PRESET --stage STAGE`` would train (random init)."""
    cfg = model_config(preset, **(overrides or {}))
    d = (cfg.stage_one() if stage == "next-scale" else cfg).to_dict()
    if stage == "masked":
        branch = d["branch_depth"] if d["kind"] == "hmar" else None
        d["kind"] = "nsp"
        nsp = build_model(ModelConfig.from_dict(d))
        init_weights(nsp)
        return HMAR.from_next_scale(nsp, branch)
    m = build_model(ModelConfig.from_dict(d))
    init_weights(m)
    return m


def resolved_backend(backend: str, cfg: ModelConfig, batch: int, amp: Optional[torch.dtype],
                     device: torch.device) -> str:
    """What ``auto`` picks for this model's training attention calls (``[B, H, L, D]``)."""
    if backend != "auto":
        return backend
    pattern = "block_causal" if cfg.kind == "var" else "block_diagonal"
    q = torch.empty(batch, cfg.num_heads, cfg.seq_len, cfg.head_dim, dtype=amp or torch.float32, device=device)
    return choose_backend(q, [p * p for p in cfg.patch_nums], pattern)


def bench(preset: str, stage: str, batch: int, steps: int, warmup: int, precision: str, fused: str,
          device: torch.device, compile_backend: str = "inductor", ce_chunk: Optional[int] = None,
          overrides: Optional[Dict[str, Any]] = None, profile: bool = False, **variant: Any) -> Dict[str, Any]:
    """One configuration's step time. ``variant``: the keys of :data:`VARIANT` (each defaults to its value there);
    ``inductor``: ``torch._inductor.config`` settings for the compile, comma-separated ``KEY=VALUE`` ("": the
    defaults)."""
    unknown = set(variant) - set(VARIANT)
    if unknown:
        raise TypeError(f"bench() got unknown variant keys {sorted(unknown)}")
    v = {**VARIANT, **variant}
    saved_packed, hmar.attention.PACKED_QKV = hmar.attention.PACKED_QKV, v["packed_qkv"]
    saved_norm, blocks.FUSED_NORM_TRAINING = blocks.FUSED_NORM_TRAINING, v["fused_norm"]
    saved_dqa, triton_kernel.DQ_ATOMIC = triton_kernel.DQ_ATOMIC, v["dq_atomic"]
    try:
        with inductor_patch(v["inductor"]):
            res = _bench(preset, stage, batch, steps, warmup, precision, fused, device, compile_backend, ce_chunk,
                         overrides, profile, v)
        return dict(res, inductor=v["inductor"], fused_norm=v["fused_norm"])
    finally:
        hmar.attention.PACKED_QKV = saved_packed
        blocks.FUSED_NORM_TRAINING = saved_norm
        triton_kernel.DQ_ATOMIC = saved_dqa


VARIANT: Dict[str, Any] = dict(compile=False, chunked_ce=True, attention_backend="auto", fused_qk_norm=None,
                               inductor="", fused_norm=False, compile_scope="model", compile_mode="default",
                               fp8=False, clip_in_kernel=True, packed_qkv=True, dq_atomic="off")
"""What one configuration of a run may change, and the defaults (``hmar train``'s)."""


def _bench(preset, stage, batch, steps, warmup, precision, fused, device, compile_backend, ce_chunk, overrides,
           profile, v) -> Dict[str, Any]:
    compile, chunked_ce, attention_backend = v["compile"], v["chunked_ce"], v["attention_backend"]
    torch.manual_seed(0)
    model = build(preset, stage, device, overrides)
    cfg = model.config
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    weighting = "uniform" if cfg.kind == "var" else "gaussian"
    st = prepare_training(model, quant, stage, DistInfo(device=device), loss_weight=weighting, precision=precision,
                          fused=fused, lr=3e-4, compile=compile, chunked_ce=chunked_ce,
                          attention_backend=attention_backend, ce_chunk=ce_chunk, compile_backend=compile_backend,
                          compile_scope=v["compile_scope"], compile_mode=v["compile_mode"], fp8=v["fp8"],
                          qk_norm={None: "auto", False: "ops", True: "kernels"}[v["fused_qk_norm"]])
    st.clip_in_kernel = v["clip_in_kernel"]
    apply_schedule(st.optimizer, 3e-4, 0.05)
    L = cfg.seq_len
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, L), generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    mask = draw_masks([(0, 0, i) for i in range(batch)], cfg.patch_nums, device=device) if stage == "masked" else None
    cuda = device.type == "cuda"
    torch.manual_seed(1)   # the same dropout / drop-path stream for every variant
    t_first = time.perf_counter()
    for i in range(warmup):
        train_step(st, idx, labels, mask)
        if i == 0:
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t_first   # includes compilation with --compile
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = train_step(st, idx, labels, mask)
    loss = float(out["loss"])                                   # synchronises
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = {"preset": preset, "stage": stage, "kind": cfg.kind, "batch": batch, "seq_len": L,
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "trained_params_m": round(sum(p.numel() for p in st.params) / 1e6, 2),
           "precision": str(st.amp_dtype).replace("torch.", "") if st.amp_dtype else "fp32",
           "fused_adamw": bool(st.optimizer.defaults.get("fused")), "compile": compile,
           "compile_backend": compile_backend if compile else None,
           "compile_scope": v["compile_scope"] if compile else None,
           "compile_mode": v["compile_mode"] if compile else None, "chunked_ce": chunked_ce, "fp8": v["fp8"],
           "clip_in_kernel": v["clip_in_kernel"],
           "fused_qk_norm": any(getattr(m, "fused_qk_norm", False) for m in model.modules()),
           "packed_qkv": hmar.attention.PACKED_QKV, "dq_atomic": triton_kernel.DQ_ATOMIC,
           "attention_backend": os.environ.get("HMAR_ATTN_BACKEND") or attention_backend,
           "attention_resolved": resolved_backend(os.environ.get("HMAR_ATTN_BACKEND") or attention_backend, cfg,
                                                  batch, st.amp_dtype, device),
           "ms_per_step": round(dt * 1000, 2), "img_per_s": round(batch / dt, 1), "loss": round(loss, 5),
           "first_step_s": round(first_s, 2) if warmup else None,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    if cuda:
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    if profile:   # where a step's time goes: the kernels of 3 steps, after the timed ones
        from _profile import profile_table
        res["profile"] = profile_table(lambda: train_step(st, idx, labels, mask), rows=30, calls=3)
    del st, model
    release(device, compile)
    return res


def release(device: torch.device, compiled: bool) -> None:
    """Free what one configuration left behind before the next one is built."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def variant_name(r: Dict[str, Any]) -> str:
    compiled = ("compiled" + ("-blocks" if r.get("compile_scope") == "blocks" else "")
                + (f"-{r['compile_mode']}" if r.get("compile_mode") not in (None, "default") else ""))
    return (f"{compiled if r['compile'] else 'eager'}+{'chunked' if r['chunked_ce'] else 'plain'}-CE+"
            f"{r['attention_backend']}" + (f"({r['attention_resolved']})" if r["attention_backend"] == "auto" else "")
            + ("+fused-qk-norm" + ("" if r.get("packed_qkv", True) else "-unpacked") if r.get("fused_qk_norm") else "")
            + ("+fused-norm" if r.get("fused_norm") else "")
            + ("+fp8" if r.get("fp8") else "")
            + ("+clip-separate" if r.get("clip_in_kernel") is False else "")
            + ("+dq-atomic" if r.get("dq_atomic") == "on" else "")
            + (f"+[{r['inductor']}]" if r.get("inductor") else ""))


OFFICIAL_IMG_S = {  # preset: (batch, the official VAR step's img/s on the H200 (reference figures), goal ratio or None)
    "hmar-d16": (32, 200.0, 2.5), "var-d16": (32, 200.0, None), "hmar-d30": (16, 45.5, 2.0),
    "hmar-d16-512": (8, 51.6, 2.5)}


def against_official(r: Dict[str, Any]) -> str:
    """`` vs official VAR 1.84x (goal 2.5x: NOT met)`` for a goal preset at its goal batch (not the masked stage)."""
    if r["preset"] not in OFFICIAL_IMG_S or r["stage"] == "masked" or r["batch"] != OFFICIAL_IMG_S[r["preset"]][0]:
        return ""
    _, ref, goal = OFFICIAL_IMG_S[r["preset"]]
    x = r["img_per_s"] / ref
    verdict = "" if goal is None else f" (goal {goal}x: {'met' if x >= goal else 'NOT met'})"
    return f"  vs official VAR {x:.2f}x{verdict}"


def report(r: Dict[str, Any], base: Optional[Dict[str, Any]] = None, base_name: str = "eager") -> str:
    mem = f", peak {r['peak_mem_gib']:6.2f} GiB" if "peak_mem_gib" in r else ""
    ratio = f"  x{base['ms_per_step'] / r['ms_per_step']:.2f} vs {base_name}" if base is not None else ""
    ratio += against_official(r)
    return (f"{r['preset']:>12} {r['stage']:<10} batch {r['batch']}  {variant_name(r):<40} "
            f"{r['img_per_s']:8.1f} img/s {r['ms_per_step']:9.2f} ms/step{mem}  loss {r['loss']:.5f}{ratio}  "
            f"({r['params_m']}M params, {r['trained_params_m']}M trained, {r['precision']}, fused AdamW "
            f"{r['fused_adamw']}, first step {r['first_step_s']} s, {r['device']})")


def axes(a: argparse.Namespace) -> Dict[str, tuple]:
    """The values of each side-by-side option (``--qk-norm both`` / ``--fused-norm both``: without, then with;
    ``--compile-scope both``: model, then blocks; ``--inductor`` / ``--compile-mode``: the values given)."""
    return {"fused_qk_norm": {"auto": (None,), "unfused": (False,), "fused": (True,), "both": (False, True)}[a.qk_norm],
            "inductor": tuple(a.inductor),
            "fused_norm": {"off": (False,), "on": (True,), "both": (False, True)}[a.fused_norm],
            "compile_scope": ("model", "blocks") if a.compile_scope == "both" else (a.compile_scope,),
            "compile_mode": tuple(a.compile_mode),
            "fp8": {"off": (False,), "on": (True,), "both": (False, True)}[a.fp8],
            "clip_in_kernel": {"off": (False,), "on": (True,), "both": (False, True)}[a.clip_in_kernel],
            "packed_qkv": {"off": (False,), "on": (True,), "both": (False, True)}[a.packed_qkv],
            "dq_atomic": {"off": ("off",), "on": ("on",), "both": ("off", "on")}[a.dq_atomic]}


COMPILE_ONLY = ("inductor", "compile_scope", "compile_mode")
"""Options that change a compiled configuration only: an eager one runs once, with their first values."""


def baseline_name(key: str, first: Any) -> str:
    """How the ratios name the first value of a side-by-side option: ``x1.05 vs ops norm``."""
    if key == "inductor":
        return f"[{first}]" if first else "inductor defaults"
    return {"fused_qk_norm": "unfused", "fused_norm": "ops norm", "compile_scope": "whole-model compile",
            "compile_mode": f"mode {first}", "fp8": "bf16 GEMMs",
            "clip_in_kernel": "clipping separate" if first is False else "clipping in the kernel",
            "packed_qkv": "unpacked qkv" if first is False else "packed qkv",
            "dq_atomic": "dq tiles" if first == "off" else "dq atomics"}[key]


def variants(a: argparse.Namespace) -> List[Dict[str, Any]]:
    """The configurations to run, in order: each of :func:`_variants` with every combination of :func:`axes`."""
    ax = axes(a)
    out = []
    for v in _variants(a):
        for combo in itertools.product(*ax.values()):
            d = dict(v, **dict(zip(ax, combo)))
            if not (v["compile"] or all(d[k] == ax[k][0] for k in COMPILE_ONLY)):
                continue
            if d["fused_qk_norm"] is False and d["packed_qkv"] != ax["packed_qkv"][0]:
                continue   # (the packed form only exists with the normalisation in the kernels)
            out.append(d)
    return out


def _variants(a: argparse.Namespace) -> List[Dict[str, Any]]:
    if a.compare_compile:
        return [dict(compile=c, chunked_ce=a.chunked_ce, attention_backend=b)
                for b in a.attention_backend for c in (False, True)]
    if not a.matrix:
        return [dict(compile=a.compile, chunked_ce=a.chunked_ce, attention_backend=b) for b in a.attention_backend]
    return [dict(compile=c, chunked_ce=ce, attention_backend=b)
            for c, ce, b in itertools.product((False, True), (False, True), a.attention_backend)]


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["hmar-d16", "var-d16"],
                   help=f"model presets (default: hmar-d16 var-d16; the goals: {' '.join(GOAL_PRESETS)}; any "
                        "hmar-d<N>[-512] / var-d<N>[-512] / *-tiny preset)")
    p.add_argument("--stage", default="next-scale", choices=["next-scale", "masked"], help="training stage")
    p.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default: 5)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused AdamW (auto: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default: inductor; aot_eager for a quick CPU smoke test)")
    p.add_argument("--chunked-ce", action=argparse.BooleanOptionalAction, default=True,
                   help="chunked output head + cross-entropy (default: on; --no-chunked-ce: the plain path)")
    p.add_argument("--ce-chunk", type=int, default=None, metavar="TOKENS",
                   help="tokens per chunk of the chunked CE (default: 128 MiB of fp32 logits per chunk)")
    p.add_argument("--attention-backend", nargs="+", default=["auto"], choices=list(TRAINING_BACKENDS),
                   help="attention backend(s) (default: auto); several values run one configuration each")
    p.add_argument("--matrix", action="store_true",
                   help="run {eager, compiled} x {plain CE, chunked CE} x the --attention-backend values per preset, "
                        "side by side, with speed ratios against the first (eager, plain CE)")
    p.add_argument("--compare-compile", action="store_true",
                   help="per preset and backend: eager, then compiled, side by side, with the compiled speed-up")
    p.add_argument("--model-override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override model config fields, e.g. drop_path_rate=0 cond_drop_rate=0 (deterministic "
                        "losses) or num_heads=1 (head dim 64 for the Triton kernel on a tiny preset)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--profile", action="store_true",
                   help="also print (and keep in the JSON) a torch.profiler table of 3 steps per configuration")
    p.add_argument("--qk-norm", default="auto", choices=["auto", "unfused", "fused", "both"],
                   help="the L2 normalisation of q and k: the trainer's choice (default: hmar train --qk-norm auto, "
                        "inside the kernels on CUDA), as ops of their own (unfused), inside the attention kernels "
                        "(fused), or both side by side")
    p.add_argument("--packed-qkv", default="on", choices=["off", "on", "both"],
                   help="with --qk-norm fused: the packed qkv projection handed to the kernels, which write its "
                        "gradient in its own layout (default, hmar.attention.PACKED_QKV), unpacked q, k, v (off), or "
                        "both side by side")
    p.add_argument("--dq-atomic", default="off", choices=["off", "on", "both"],
                   help="the Triton backward's dq by dQ tiles of its own (default), summed by atomics in the dK/dV "
                        "programs (hmar.attention.triton_kernel.DQ_ATOMIC = on), or both side by side")
    p.add_argument("--fused-norm", default="off", choices=["off", "on", "both"],
                   help="each residual add + LayerNorm + modulation as torch ops (default), as hmar's Triton kernel "
                        "with its backward (hmar.model.blocks.FUSED_NORM_TRAINING), or both side by side")
    p.add_argument("--fp8", default="off", choices=["off", "on", "both"],
                   help="the blocks' four linears in bf16 (default), in fp8 forward and backward (hmar train --fp8, "
                        "hmar.model.fp8_training), or both side by side")
    p.add_argument("--clip-in-kernel", default="on", choices=["off", "on", "both"],
                   help="the gradient clipping inside the fused AdamW kernel (default, hmar.training.optim."
                        "clip_and_step), as clip_grad_norm_'s own multiply pass (off), or both side by side")
    p.add_argument("--compile-scope", default="model", choices=["model", "blocks", "both"],
                   help="with --compile: the whole forward as one graph (default), each block on its own "
                        "(hmar train --compile-scope blocks), or both side by side")
    p.add_argument("--compile-mode", nargs="+", default=["default"], metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="with --compile: torch.compile's mode (hmar train --compile-mode); several values run one "
                        "variant each, side by side, e.g. --compile-mode default reduce-overhead (CUDA graphs)")
    p.add_argument("--inductor", nargs="+", default=[""], metavar="SETTINGS",
                   help="with --compile: torch._inductor.config settings, comma-separated KEY=VALUE (\"\": the "
                        "defaults); several values run one variant each, side by side, each later one compared "
                        "with the first, e.g. --inductor \"\" coordinate_descent_tuning=True")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    for text in a.inductor:
        inductor_settings(text)             # a misspelt setting fails now, not after the first compile
    dev = resolve_device(a.device)
    overrides = parse_overrides(a.model_override, "--model-override")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    ax = axes(a)
    several = [k for k, vals in ax.items() if len(vals) > 1]
    for preset in a.preset:
        base, done = None, []
        for v in variants(a):
            try:
                r = bench(preset, a.stage, a.batch, a.steps, a.warmup, a.precision, a.fused, dev, a.compile_backend,
                          a.ce_chunk, overrides, a.profile, **v)
            except torch.OutOfMemoryError as e:   # report it, keep measuring the other configurations
                results.append(dict(preset=preset, stage=a.stage, batch=a.batch, **v, error=f"OOM: {e}"[:300]))
                print(f"{preset:>12} {a.stage:<10} batch {a.batch}  {v}: out of memory", flush=True)
                release(dev, v["compile"])
                continue
            results.append(r)
            done.append((v, r))
            differ = [k for k in several if v[k] != ax[k][0]]
            if differ:   # against the same configuration with those options at their first values, run before it
                want = dict(v, **{k: ax[k][0] for k in differ})
                ref = next((rr for vv, rr in done if vv == want), None)
                print(report(r, ref, " + ".join(baseline_name(k, ax[k][0]) for k in differ)), flush=True)
            elif several:
                print(report(r), flush=True)
            else:
                if a.compare_compile and not v["compile"]:
                    base = r             # the eager run of this backend: the compiled one is compared with it
                base = base or (r if a.matrix else None)
                print(report(r, base), flush=True)
            if "profile" in r:
                print(r["profile"], flush=True)
            if a.json:   # after every configuration, so a run stopped early keeps what it measured
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
