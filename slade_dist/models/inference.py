"""The one inference pass: a model over a finite batch stream -> L2-normalised embeddings.

Owns `embed_batches`, used by the eval stage, the trainers' periodic eval (both through
eval/stage.py's `embed_split`) and the embed stage (pseudo/embed.py): eval mode, no autograd, bf16
autocast on CUDA, outputs normalised in fp32. The model's train/eval mode is restored afterwards.
Tests: tests/unit/test_models.py, tests/unit/test_embed.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def embed_batches(
    model: torch.nn.Module, batches: Iterable[dict[str, Any]], device: torch.device
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """(embeddings (B, d) float32 numpy, the batch it came from) for each batch with "images"."""
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode():
            for batch in batches:
                x = batch["images"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    e = model(x)
                yield torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy(), batch
    finally:
        model.train(was_training)


def output_dim(model: torch.nn.Module) -> int:
    """Embedding width: the Embedder's embed_dim, else the last Linear layer's output size."""
    dim = getattr(model, "embed_dim", None)
    if isinstance(dim, int):
        return dim
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if heads:
        return int(heads[-1].out_features)
    raise RuntimeError("cannot tell the embedding width of this model (no embed_dim, no Linear layer)")
