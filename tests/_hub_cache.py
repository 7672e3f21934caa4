"""A Hugging Face hub cache made by a test: a tiny timm model's weights saved in the cache layout the
hub client reads offline (models--<org>--<name>/refs/main -> snapshots/<commit>/model.safetensors),
so `model.pretrained=hub` runs under HF_HUB_OFFLINE=1 with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex revision: refs/main names it


def cache_timm_weights(cache_dir: Path, name: str = "test_vit", seed: int = 123) -> dict[str, torch.Tensor]:
    """Save seeded weights of timm model `name` as its published weights in `cache_dir` (used as
    HF_HUB_CACHE); returns them, so a test can tell them from a fresh random init."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    weights = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id  # e.g. timm/test_vit.r160_in1k
    root = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    save_file(weights, str(snapshot / "model.safetensors"))
    return weights
