"""Training: tokenizer (VQ-VAE), stage 1 (next-scale, HMAR or VAR), stage 2 (masked branch).

One module per job: :mod:`.config` (options, YAML), :mod:`.data` (image folders, token caches, batch
order), :mod:`.losses`, :mod:`.fused_ce` (chunked head + cross-entropy), :mod:`.schedule`, :mod:`.optim`,
:mod:`.distributed` (DDP/FSDP), :mod:`.checkpointing` (atomic, resumable), :mod:`.metrics` (logs),
:mod:`.loop` (the transformer trainer and its ``train_step``), :mod:`.tokenizer_trainer`, :mod:`.gan`,
:mod:`.tokenize` (token caches), :mod:`.tokenizer_io` (tokenizer directories).
"""
from .config import TokenizerTrainConfig, TrainConfig, build_config
from .losses import draw_masks, scale_loss_weights, token_loss_weights
from .schedule import Schedule, lr_factor, wd_value
from .tokenizer_io import load_tokenizer, save_tokenizer


def train(cfg: TrainConfig):
    """Run :class:`hmar.training.loop.Trainer` on ``cfg``; returns the final model directory."""
    from .loop import Trainer
    return Trainer(cfg).run()


def train_tokenizer(cfg: TokenizerTrainConfig):
    """Run :class:`hmar.training.tokenizer_trainer.TokenizerTrainer`; returns the tokenizer directory."""
    from .tokenizer_trainer import TokenizerTrainer
    return TokenizerTrainer(cfg).run()


__all__ = ["TrainConfig", "TokenizerTrainConfig", "build_config", "train", "train_tokenizer", "Schedule",
           "lr_factor", "wd_value", "scale_loss_weights", "token_loss_weights", "draw_masks", "load_tokenizer",
           "save_tokenizer"]
