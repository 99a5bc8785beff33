"""Explicit, tested key maps between the official checkpoint layouts.

* stage-1 next-scale (NSP) ``blocks.j`` / ``head*`` / ``word_embed.bias``
  -> HMAR ``base_blocks`` / ``ns_blocks`` (and ``mask_blocks``) / ``ns_head*`` / ``word_embed_bias``
* stage-2 masked (MP) ``blocks.j >= d-b`` / ``head*`` / ``mask_embed`` -> HMAR ``mask_blocks`` / ``mask_head*``
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

StateDict = Dict[str, torch.Tensor]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def nsp_to_hmar(nsp: StateDict, depth: int, branch_depth: int, mp: Optional[StateDict] = None) -> StateDict:
    """HMAR state dict from a stage-1 state dict (and, if given, a stage-2 one for the masked branch;
    without it the masked branch starts as a copy of the next-scale branch)."""
    trunk = depth - branch_depth
    out: StateDict = {}
    for k, v in nsp.items():
        m = _BLOCK.match(k)
        if m:
            j, rest = int(m.group(1)), m.group(2)
            if j < trunk:
                out[f"base_blocks.{j}.{rest}"] = v
            else:
                out[f"ns_blocks.{j - trunk}.{rest}"] = v
                if mp is None:
                    out[f"mask_blocks.{j - trunk}.{rest}"] = v.clone()
        elif k.startswith("head"):
            out["ns_" + k] = v
            if mp is None:
                out["mask_" + k] = v.clone()
        elif k == "word_embed.bias":
            out["word_embed_bias"] = v
        else:
            out[k] = v
    if mp is not None:
        for k, v in mp.items():
            m = _BLOCK.match(k)
            if m and int(m.group(1)) >= trunk:
                out[f"mask_blocks.{int(m.group(1)) - trunk}.{m.group(2)}"] = v
            elif k.startswith("head"):
                out["mask_" + k] = v
            elif k == "mask_embed.weight":
                out[k] = v
    return out


def hmar_to_nsp(hmar: StateDict, depth: int, branch_depth: int) -> StateDict:
    """The stage-1 (next-scale only) state dict inside an HMAR state dict."""
    trunk = depth - branch_depth
    out: StateDict = {}
    for k, v in hmar.items():
        if k.startswith("base_blocks."):
            out["blocks." + k[len("base_blocks."):]] = v
        elif k.startswith("ns_blocks."):
            j, rest = k[len("ns_blocks."):].split(".", 1)
            out[f"blocks.{int(j) + trunk}.{rest}"] = v
        elif k.startswith("ns_head"):
            out[k[3:]] = v
        elif k == "word_embed_bias":
            out["word_embed.bias"] = v
        elif k.startswith(("mask_blocks.", "mask_head", "mask_embed")):
            continue
        else:
            out[k] = v
    return out
