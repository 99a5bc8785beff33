"""Lower bounds of one stage-1 (next-scale) training step from its FLOPs and bytes at the H200's measured ceilings,
per kind of kernel, next to the step times measured: where each training goal stands against what the hardware
allows. Arithmetic only (no GPU). The sampling counterpart is ``floors.py``, whose ceilings this script uses.

A step over B images of L tokens (R = B L rows, width C, depth D, MLP hidden H = 4C by default, vocabulary V):
- GEMMs: the blocks' qkv, proj, fc1 and fc2 and the head over R rows, each three times (forward, dX, dW; hmar's
  chunked cross-entropy computes the head's logits a second time in the backward, which the floor leaves out); the word
  embedding (z -> C) over the R - B rows after the start token, twice (forward, dW: its input needs no gradient);
  each block's and the head's AdaLN linear over B rows, three times. Each GEMM takes at least
  max(2 M K N / GEMM_TFS, bytes / HBM_TBS).
- Attention, forward + backward: 14 n m C FLOPs an image, scale and block, n the scale's tokens and m the tokens it
  attends to (the forward's two n x m products, the backward's five): m = n for HMAR (block-diagonal), m = every
  token up to the scale's end for VAR (block-causal). It takes at least those FLOPs at the rate hmar's Triton
  kernels reached at N = 2240, B = 16, H = 16 (BENCHMARKS.md 1: 1.410 ms), or its bytes (q, k, v and out in the
  forward; q, k, v, out, d_out, dq, dk and dv in the backward), whichever is larger. The q / k normalisation counts
  as fused into the kernels (no bytes of its own).
- Elementwise and normalisation work that cuBLAS cannot take into its GEMMs, each bf16 tensor read or written once,
  at HBM_TBS. Per row and block, in elements: forward, the two residual add + LayerNorm + modulation kernels (read x
  and the branch, write x' and the output: 4 C each) and GELU (read u, write its output: 2 H); backward, GELU's (read
  u and the gradient, write du: 3 H) and the two norms' (read x', the output's gradient, the residual gradient and
  the branch, write two gradients: 6 C each). 20 C + 5 H elements (40 C + 10 H bytes; 80 C at H = 4C). The head's
  norm adds 5 C elements a row, the cross-entropy 3 V (the logits written and read once, their gradient written
  once).
- The optimiser: fused AdamW reads the fp32 parameter, gradient and both moments and writes three (28 bytes a
  trained parameter), and the gradient clipping reads the gradients once more (4 bytes).

Two of these ceilings are measured rates, not hardware bounds: the GEMMs' 713 TF/s is the issue's reference figure
(the profiles measured cuBLAS at up to 740 TF/s, BENCHMARKS.md 2e), and the attention's rate is hmar's own kernel's.

    python benchmarks/floors_train.py                  # the three training goal configs, at their goal batches
    python benchmarks/floors_train.py --configs hmar-d16 --batch 64 --json floors-train.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from floors import GEMM_TFS, HBM_TBS, gemm_shapes  # noqa: E402  (benchmarks/, this script's folder)
from hmar.model import build_model  # noqa: E402
from hmar.presets import ModelConfig, model_config  # noqa: E402

# hmar's Triton attention, forward + backward, bf16, block-diagonal over the 512 px schedule (N = 2240, B = 16, H =
# 16, head dim 64): 1.410 ms in BENCHMARKS.md 1, for 14 x sum(n^2) x 1024 x 16 FLOPs
_N2_512 = sum((p * p) ** 2 for p in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
ATTN_TRAIN_TFS = 14 * _N2_512 * 1024 * 16 / 1.410e-3 / 1e12

# the goal batch and img/s of each config (the performance issue), and the fastest compiled step measured on the
# H200 (BENCHMARKS.md 2e for hmar-d16 and hmar-d16-512; 2g for hmar-d30, with the q / k normalisation inside the
# kernels: the default path took 212.54 ms in the same run), with the kernel time by kind of 2g's
# profiled hmar-d16 step (75.17 ms, 71.8 ms of kernels; "elementwise": every kernel that is not a GEMM, the
# attention or AdamW: inductor's norms, GELU, the q / k normalisation, residuals, the loss)
GOALS = {"hmar-d16": (32, 500.0), "hmar-d30": (16, 91.0), "hmar-d16-512": (8, 129.0)}
MEASURED = {
    "hmar-d16": dict(step_ms=74.01, section="2e",
                     kinds=dict(gemm=37.6, attention=6.8, elementwise=24.8, optimizer=2.6)),
    "hmar-d30": dict(step_ms=208.50, section="2g"),
    "hmar-d16-512": dict(step_ms=69.26, section="2e"),
}
KINDS = ("gemm", "attention", "elementwise", "optimizer")


Config = Union[str, ModelConfig]   # a preset name or a config


def _config(cfg: Config) -> ModelConfig:
    return model_config(cfg) if isinstance(cfg, str) else cfg


def _params(cfg: Config) -> int:
    """Trained parameters of stage 1 (the next-scale network; no weights are allocated)."""
    with torch.device("meta"):
        model = build_model(_config(cfg).stage_one())
    return sum(p.numel() for p in model.parameters())


def train_gemms(cfg: Config, batch: int, head_products: int = 3) -> List[Tuple[int, int, int, int]]:
    """(M, K, N, times) of every GEMM of one step: ``times`` counts the forward and the backward products
    (``head_products=4``: the head as hmar's chunked cross-entropy runs it, its logits computed again in the
    backward)."""
    cfg = _config(cfg)
    C, D, R = cfg.embed_dim, cfg.depth, batch * cfg.seq_len
    *blocks, (_, V, _) = gemm_shapes(cfg)   # the sampler's per-pass GEMMs: the blocks' four linears, the head
    out = [(R, k, n, 3 * count) for k, n, count in blocks]
    out += [(R, C, V, head_products), (R - batch, cfg.z_channels, C, 2), (batch, C, 6 * C, 3 * D), (batch, C, 2 * C, 3)]
    return out


def gemm_flops(cfg: Config, batch: int, head_products: int = 3) -> int:
    """FLOPs of one step's GEMMs, forward and backward (2 M K N a product)."""
    return sum(2 * m * k * n * t for m, k, n, t in train_gemms(cfg, batch, head_products))


def attended_pairs(cfg: Config) -> int:
    """Sum over scales of (its tokens) x (the tokens they attend to), one image: the attention's n x m tiles."""
    cfg = _config(cfg)
    sizes = [p * p for p in cfg.patch_nums]
    if cfg.kind == "var":   # block-causal: every scale attends to all scales up to itself
        return sum(n * sum(sizes[:i + 1]) for i, n in enumerate(sizes))
    return sum(n * n for n in sizes)


def floors(cfg: Config, batch: int) -> Dict[str, float]:
    """Floors (ms) per kind over one training step, and the FLOPs / bytes behind them."""
    cfg = _config(cfg)
    C, D, V = cfg.embed_dim, cfg.depth, cfg.vocab_size
    R = batch * cfg.seq_len
    out: Dict[str, float] = dict(gemm_tflop=gemm_flops(cfg, batch) / 1e12)
    out["gemm"] = sum(t * max(2 * m * k * n / GEMM_TFS / 1e9, 2 * (m * k + k * n + m * n) / HBM_TBS / 1e9)
                      for m, k, n, t in train_gemms(cfg, batch))
    attn_flops = 14 * attended_pairs(cfg) * C * D * batch
    attn_bytes = (4 + 8) * 2 * R * C * D
    out["attn_tflop"] = attn_flops / 1e12
    out["attention"] = max(attn_flops / ATTN_TRAIN_TFS / 1e9, attn_bytes / HBM_TBS / 1e9)
    hidden = round(C * cfg.mlp_ratio)
    elem_bytes = R * ((40 * C + 10 * hidden) * D + 10 * C + 6 * V)
    out["elementwise_gb"] = elem_bytes / 1e9
    out["elementwise"] = elem_bytes / HBM_TBS / 1e9
    params = _params(cfg)
    out["params_m"] = params / 1e6
    out["optimizer"] = 32 * params / HBM_TBS / 1e9
    out["total"] = sum(out[k] for k in KINDS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(GOALS))
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: each config's goal batch)")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"ceilings: GEMM {GEMM_TFS:.0f} TF/s, HBM {HBM_TBS} TB/s, attention forward + backward "
          f"{ATTN_TRAIN_TFS:.0f} TF/s")
    rows = []
    for name in args.configs.split(","):
        goal_batch, goal_ips = GOALS.get(name, (None, None))
        batch = args.batch or goal_batch
        if batch is None:
            raise SystemExit(f"{name}: no goal batch; pass --batch")
        f = floors(name, batch)
        print(f"{name}, batch {batch}: GEMMs {f['gemm_tflop']:.2f} TFLOP, attention {f['attn_tflop']:.2f} TFLOP, "
              f"elementwise {f['elementwise_gb']:.1f} GB, {f['params_m']:.1f} M parameters")
        m = MEASURED.get(name) if batch == goal_batch else None
        for kind in KINDS:
            got = m.get("kinds", {}).get(kind) if m else None
            print(f"  {kind:<12} floor {f[kind]:7.2f} ms" + (f"  measured {got:6.2f} ms ({got / f[kind]:.2f}x the "
                                                             f"floor)" if got else ""))
        line = f"  {'sum':<12} floor {f['total']:7.2f} ms ({batch / f['total'] * 1e3:.0f} img/s)"
        if goal_ips and batch == goal_batch:
            line += f"; the goal, {goal_ips:g} img/s, needs {batch / goal_ips * 1e3:.2f} ms"
        if m:
            line += (f"; measured {m['step_ms']} ms ({batch / m['step_ms'] * 1e3:.1f} img/s, BENCHMARKS.md "
                     f"{m['section']})")
        print(line)
        rows.append(dict(config=name, batch=batch, **f, measured=m))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
