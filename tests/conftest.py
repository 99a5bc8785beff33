"""Shared fixtures: tiny random models, the golden-vector folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def golden_dir() -> Path:
    return Path(os.environ.get("HMAR_GOLDEN_DIR") or SHARED / "compat" / "golden")


def compat_dir() -> Path:
    return SHARED / "compat"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def tiny():
    """(hmar, var, nsp, tokenizer): random tiny models in eval mode, fp32."""
    from hmar import VQVAE, build_model, model_config, tokenizer_config
    torch.manual_seed(0)
    models = {k: build_model(model_config(f"{k}-tiny")).eval() for k in ("hmar", "var", "nsp")}
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    return models["hmar"], models["var"], models["nsp"], tok
