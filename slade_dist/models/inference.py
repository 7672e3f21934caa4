"""The one inference pass (`embed_batches`: a model over a finite batch stream -> L2-normalised
embeddings) of eval, the trainers' periodic eval, the embed stage and the pretrain stage's kNN
check; its precision rule is docs/METHOD.md "Inference". The model's train/eval mode is restored.
Tests: tests/unit/test_models.py, tests/unit/test_embed.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def embed_batches(
    model: torch.nn.Module, batches: Iterable[dict[str, Any]], device: torch.device, autocast: bool | None = None
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """(embeddings (B, d) float32 numpy, the batch it came from) for each batch with "images".

    autocast: bf16 for the backbone (None: on CUDA only)."""
    was_training = model.training
    model.eval().to(device)
    on = device.type == "cuda" if autocast is None else autocast
    try:
        with torch.inference_mode():
            for batch in batches:
                e = forward_fp32_head(model, batch["images"].to(device, non_blocking=True), on)
                yield torch.nn.functional.normalize(e, dim=1).cpu().numpy(), batch
    finally:
        model.train(was_training)


def forward_fp32_head(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """The model's output in fp32; under `autocast` only the backbone runs in bf16 (the head's output
    is the embedding: in bf16 near neighbours' cosines round together). A model without the
    Embedder's features/head split runs under autocast as a whole."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        if not (callable(features) and isinstance(head, torch.nn.Module)):
            return model(x).float()
        f = features(x)
    with torch.autocast(x.device.type, enabled=False):
        return head(f.float())


def output_dim(model: torch.nn.Module) -> int:
    """Embedding width: the Embedder's embed_dim, else the last Linear layer's output size."""
    dim = getattr(model, "embed_dim", None)
    if isinstance(dim, int):
        return dim
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if heads:
        return int(heads[-1].out_features)
    raise RuntimeError("cannot tell the embedding width of this model (no embed_dim, no Linear layer)")
