"""Turning a latent transformer into a pixel model, choosing what trains, and delta
checkpoints."""

from l2p.conversion.convert import ConversionReport, convert_to_pixel
from l2p.conversion.delta import load_delta, merge_delta, save_delta
from l2p.conversion.embedding_init import EmbeddingFit, fit_pixel_embedding
from l2p.conversion.folders import convert_folder, merge_folder
from l2p.conversion.trainable import TrainableReport, set_trainable

__all__ = [
    "ConversionReport",
    "EmbeddingFit",
    "TrainableReport",
    "convert_folder",
    "convert_to_pixel",
    "fit_pixel_embedding",
    "load_delta",
    "merge_delta",
    "merge_folder",
    "save_delta",
    "set_trainable",
]
