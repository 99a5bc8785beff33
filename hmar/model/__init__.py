"""Transformers: :class:`HMAR`, :class:`ScaleTransformer` (VAR / stage-1) and their building blocks."""
from ..presets import ModelConfig
from .blocks import AdaLNBlock, AdaLNHead, SelfAttention
from .keymaps import hmar_to_nsp, nsp_to_hmar
from .transformer import HMAR, ScaleTransformer, build_model, init_weights

__all__ = ["HMAR", "ScaleTransformer", "ModelConfig", "build_model", "init_weights", "AdaLNBlock", "AdaLNHead",
           "SelfAttention", "nsp_to_hmar", "hmar_to_nsp"]
