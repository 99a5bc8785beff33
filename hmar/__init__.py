"""hmar: HMAR (hierarchical masked auto-regressive image generation) and the VAR baseline in PyTorch.

Main entry points:

* :class:`hmar.HMARPipeline` -- load a model (ours or official files), generate, edit, save.
* :mod:`hmar.tokenizer` -- VAR's multi-scale residual VQ-VAE.
* :mod:`hmar.model` -- HMAR, VAR and the stage-1 next-scale transformer.
* :mod:`hmar.sampling` -- the HMAR and VAR samplers.
* :mod:`hmar.presets` -- named configurations and scale / masked-step schedules.
"""
from .errors import HMARError
from .model import HMAR, ScaleTransformer, build_model
from .pipeline import HMARPipeline
from .presets import ModelConfig, TokenizerConfig, list_presets, model_config, tokenizer_config
from .sampling import sample
from .tokenizer import VQVAE

__version__ = "0.1.0"
__all__ = ["HMARPipeline", "HMAR", "ScaleTransformer", "VQVAE", "ModelConfig", "TokenizerConfig", "build_model",
           "sample", "model_config", "tokenizer_config", "list_presets", "HMARError"]
