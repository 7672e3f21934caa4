"""Models: backbone registry and the embedder (see backbones.py, embedder.py).
Tests: tests/unit/test_models.py."""
from .backbones import (BACKBONES, KeyReport, StateDictMismatchError, build_backbone,
                        load_pretrained_backbone, load_state_dict_checked)
from .embedder import Embedder, build_embedder, load_embedder, pool_features, save_weights

__all__ = ["BACKBONES", "KeyReport", "StateDictMismatchError", "build_backbone", "load_pretrained_backbone",
           "load_state_dict_checked", "Embedder", "build_embedder", "load_embedder", "pool_features",
           "save_weights"]
