"""Evaluation: FID (pytorch-fid's Inception, loaded offline), precision/recall, an in-domain classifier,
and sharded sample generation. Heavy pieces load lazily: importing this package loads no weights."""
from .classifier import ClassifierExtractor, load_classifier, train_classifier
from .features import extract_features
from .fid import ReferenceStats, compute_fid, feature_stats, frechet_distance, load_stats, reference_stats, save_stats
from .generate import dist_rank_world, generate_samples
from .inception import export_half, load_inception
from .metrics import evaluate_folder
from .prdc import precision_recall

__all__ = ["ClassifierExtractor", "ReferenceStats", "compute_fid", "dist_rank_world", "evaluate_folder",
           "export_half", "extract_features", "feature_stats", "frechet_distance", "generate_samples",
           "load_classifier", "load_inception", "load_stats", "precision_recall", "reference_stats",
           "save_stats", "train_classifier"]
