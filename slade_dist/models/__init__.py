"""Models: backbone registry (backbones.py), the embedder and its weight files (embedder.py), and
the one inference pass everything that embeds images uses (inference.py).
Tests: tests/unit/test_models.py."""

from .backbones import (
    BACKBONES,
    CheckpointError,
    HubWeightsMissing,
    StateDictMismatchError,
    UnsafeCheckpointError,
    build_backbone,
    load_pretrained_backbone,
    load_state_dict_checked,
    read_checkpoint,
    unsafe_global,
)
from .embedder import Embedder, build_embedder, load_embedder, pool_features, save_weights
from .inference import embed_batches, output_dim

__all__ = [
    "BACKBONES",
    "CheckpointError",
    "HubWeightsMissing",
    "StateDictMismatchError",
    "build_backbone",
    "load_pretrained_backbone",
    "load_state_dict_checked",
    "read_checkpoint",
    "UnsafeCheckpointError",
    "unsafe_global",
    "Embedder",
    "build_embedder",
    "load_embedder",
    "pool_features",
    "save_weights",
    "embed_batches",
    "output_dim",
]
