"""The whole chain on a ViT whose published weights come from the Hugging Face hub cache, offline.

The test builds its own hub cache (tests/_hub_cache.py: timm's tiny `test_vit`, saved as the
published weights of timm/test_vit.r160_in1k), then runs `python -m slade_dist pipeline` with
`model.backbone=timm:test_vit model.pretrained=hub` under HF_HUB_OFFLINE=1 on tiny real shards:
SwAV multi-crop (32 px global and 16 px local crops through one ViT), teacher, embed, cluster,
student, eval. Then eval again under the In-shop query/gallery protocol. Checks the retrieval grids
(PNG size and rows, TensorBoard images) of the teacher and the final model, and that the SwAV
stage took the pretrained-start learning rate. Covers models/backbones.py (hub, ViT),
eval/grids.py + eval/stage.py (grids in the stage), train/pretrain.py (auto lr multiplier).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slade_dist.eval.grids import GridLayout
from tests._hub_cache import cache_timm_weights

from . import _train_workers as W

REPO = Path(__file__).resolve().parents[2]
CHAIN = (
    "model.backbone=timm:test_vit",
    "model.pretrained=hub",
    "pretrain.steps=4",
    "pretrain.local_crops=2",
    "train.teacher_steps=6",
    "train.student_steps=6",
    "student.basis_warmup_steps=2",
    "pseudo.k=6",
    "pseudo.niter=4",
    "run.rounds=1",
    "eval.grid_queries=4",
    "eval.grid_k=5",
    "eval.grid_tile=32",
)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "slade_dist", *args], capture_output=True, text=True, cwd=REPO, env=full_env, timeout=900
    )


def tb_images(tb_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    ea.Reload()
    return {t: [e.step for e in ea.Images(t)] for t in ea.Tags()["images"]}


def check_grid(path: Path, rows: int, k: int) -> None:
    png = Image.open(path)
    assert png.size == GridLayout(rows=rows, k=k, tile=32).size(), (path, png.size)
    layout = GridLayout(rows=rows, k=k, tile=32)
    pixels = np.asarray(png.convert("RGB"))
    for r in range(rows):  # every row starts with a blue-framed query
        x0, y0, _, _ = layout.cell_box(r, 0)
        assert tuple(pixels[y0 + 1, x0 + 1]) == (40, 90, 200), (path, r)


@pytest.mark.slow
def test_vit_from_the_hub_cache_through_every_stage_and_the_grids(tmp_path):
    cache = tmp_path / "hub"
    cache_timm_weights(cache, "test_vit")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    data = W.make_data(tmp_path / "data")
    run = tmp_path / "run"
    ovr = W.overrides(data, run, *CHAIN)
    r = cli("pipeline", *ovr, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "pretrain: backbone lr = pretrain.lr x 0.1 (auto: the backbone starts from pretrained weights)" in r.stderr

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "student r1"}
    emb = np.load(next((run / "round1" / "embed").glob("emb-*.npy")))
    assert emb.shape[1] == 32  # model.embed_dim, from the ViT's pooled class token
    # the test split has 4 classes of 5: 4 queries, one per class, top-5 each, teacher and final model
    for name in ("teacher", "student_r1"):
        check_grid(run / "eval" / f"retrieval_{name}.png", rows=4, k=5)
    assert tb_images(run / "tb" / "eval") == {"retrieval/teacher": [0], "retrieval/student_r1": [1]}
    assert "retrieval grids: " in r.stdout

    # the In-shop protocol: queries and gallery are separate splits of the same classes
    query = W.write_labeled(tmp_path / "query", 3, 2, n_shards=1, seed=7, prefix="query", class_offset=6)
    gallery = W.write_labeled(tmp_path / "gallery", 3, 4, n_shards=1, seed=8, prefix="gallery", class_offset=6)
    shop = ["eval.protocol=query_gallery", f"data.query_shards={query}", f"data.gallery_shards={gallery}"]
    r = cli("eval", *ovr, *shop, "eval.grid_queries=3", env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((run / "eval" / "metrics.json").read_text())["protocol"] == "query_gallery"
    for name in ("teacher", "student_r1"):  # one query of each of the 3 classes
        check_grid(run / "eval" / f"retrieval_{name}.png", rows=3, k=5)
