"""Embedder = backbone -> pooling -> linear head to `embed_dim`, plus its weight files.

Owns: `build_embedder(model_cfg)` (initial backbone weights as model.pretrained / pretrained_path
say: none, the hub, a local file), BatchNorm freezing, `save_weights` / `load_embedder` (plain
torch files: {"state_dict", "model" (the ModelConfig as a dict), "extra"}, written atomically).
Outputs are raw (NOT L2-normalised): losses and eval normalise themselves.
Tests: tests/unit/test_models.py.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PRETRAINED_HUB, PRETRAINED_NONE, ModelConfig, pretrained_source
from ..fileio import atomic_path
from .backbones import (
    Backbone,
    CheckpointError,
    build_backbone,
    load_pretrained_backbone,
    load_state_dict_checked,
    read_checkpoint,
)

__all__ = ["Embedder", "build_embedder", "save_weights", "load_embedder", "pool_features"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def pool_features(feat: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C, H, W) map or (B, N, C) tokens -> (B, C). avgmax = avg + max (sum keeps C)."""
    if feat.dim() == 4:
        flat = feat.flatten(2)  # B, C, HW
        dim = 2
    elif feat.dim() == 3:
        flat, dim = feat, 1  # B, N, C (ViT tokens)
    elif feat.dim() == 2:
        return feat
    else:
        raise ValueError(f"cannot pool a backbone output of shape {tuple(feat.shape)}")
    if pooling == "avg":
        return flat.mean(dim)
    if pooling == "max":
        return flat.amax(dim)
    if pooling == "avgmax":
        return flat.mean(dim) + flat.amax(dim)
    raise ValueError(f"unknown model.pooling {pooling!r}; choose avg, max or avgmax")


class Embedder(nn.Module):
    """images -> (B, embed_dim) raw embeddings."""

    def __init__(self, backbone: Backbone, embed_dim: int, pooling: str = "avg", freeze_bn: bool = False) -> None:
        super().__init__()
        pool_features(torch.zeros(1, 1, 1, 1), pooling)  # validate the name early
        self.backbone = backbone
        self.feature_dim = int(backbone.feature_dim)
        self.embed_dim = int(embed_dim)
        self.pooling = pooling
        self.head = nn.Linear(self.feature_dim, self.embed_dim)
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            for m in self._bn_layers():
                for p in m.parameters():
                    p.requires_grad_(False)

    def _bn_layers(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, _BN_TYPES)]

    def train(self, mode: bool = True) -> Embedder:
        """Frozen BN stays in eval mode (running stats used, not updated) even in train()."""
        super().train(mode)
        if self.freeze_bn:
            for m in self._bn_layers():
                m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim), before the head."""
        return pool_features(self.backbone(x), self.pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (the trainers give them different learning rates)."""
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in self.head.parameters() if p.requires_grad],
        }


def build_embedder(model_cfg: ModelConfig) -> Embedder:
    """Build from config; the backbone starts from the hub's weights (model.pretrained=hub), a
    local file (model.pretrained=<path> / pretrained_path) or random ones."""
    kind, path = pretrained_source(model_cfg)
    backbone = build_backbone(model_cfg.backbone, hub=kind == PRETRAINED_HUB, token_pool=model_cfg.token_pool)
    if path:
        load_pretrained_backbone(backbone, path)
    return Embedder(backbone, model_cfg.embed_dim, model_cfg.pooling, model_cfg.freeze_bn)


def save_weights(
    path: str | os.PathLike[str], embedder: nn.Module, model_cfg: ModelConfig, extra: dict[str, Any] | None = None
) -> Path:
    """torch.save {"state_dict", "model", "extra"} atomically (tmp + rename): readers never see
    a half-written file."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in embedder.state_dict().items()},
        "model": dataclasses.asdict(model_cfg),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_embedder(path: str | os.PathLike[str], map_location: Any = "cpu") -> Embedder:
    """Rebuild the embedder a `save_weights` file describes and load its weights (strict)."""
    obj = read_checkpoint(path, map_location)
    if not isinstance(obj, dict) or "state_dict" not in obj or "model" not in obj:
        raise CheckpointError(
            f"{str(path)!r} is not an embedder weights file (expected keys 'state_dict' "
            f"and 'model', found {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in obj["model"].items() if k in fields})
    # the saved state dict replaces any pretrained init: nothing is read from a file or the hub
    cfg.pretrained, cfg.pretrained_path = PRETRAINED_NONE, ""
    emb = build_embedder(cfg)
    load_state_dict_checked(emb, obj["state_dict"], what=f"weights file {str(path)!r}")
    return emb
