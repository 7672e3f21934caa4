"""The embed stage in one process on real demo shards and a real tiny_cnn teacher: alignment with
the shards, normalised float16 output equal to a direct forward pass, hidden labels, corrupt images,
shard subsets (job arrays) and resume, teacher change, clear errors.
(2 real ranks: tests/integration/test_pseudo_multirank.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slade_dist.data.readers import finite_batches, iter_shard
from slade_dist.data.shards import encode_jpeg, shard_paths, write_index, write_shard
from slade_dist.errors import UnusableInput
from slade_dist.models import load_embedder
from slade_dist.pseudo import embed
from slade_dist.stages import RunLayout
from tests.integration._pseudo_workers import make_cfg, make_demo, make_teacher


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 8 classes x 10 images in shards of 30 -> 3 shards (30, 30, 20)
    return make_demo(tmp_path_factory.mktemp("embed_demo"), unlabeled_per_class=10, shard_size=30)


def shard_keys_and_labels(shard):
    rows = [(key, meta.get("label")) for key, _img, _cls, meta in iter_shard(shard)]
    return [k for k, _ in rows], [str(v) for _, v in rows]


def test_outputs_aligned_normalised_and_equal_to_a_direct_forward(demo, tmp_path):
    run = tmp_path / "run"
    weights = make_teacher(run)
    cfg = make_cfg(run, demo)
    res = embed.run(cfg, run)
    out = RunLayout(run).stage_dir("embed", 1)
    shards = shard_paths(demo)
    assert res["written"] == len(shards) == 3 and res["images"] == 80 and res["skipped_corrupt"] == 0
    for shard in shards:
        keys, labels = shard_keys_and_labels(shard)
        emb = embed.load_embeddings(out, shard)
        assert embed.read_keys(out, shard) == keys
        assert emb.dtype == np.float16 and emb.shape == (len(keys), 16)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert embed.read_hidden_labels(out, shard).tolist() == labels
    model = load_embedder(weights).eval()
    batch = next(iter(finite_batches([shards[1]], cfg.data, 64, rank=0, world=1)))
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model(batch["images"]), dim=1).numpy()
    np.testing.assert_allclose(embed.load_embeddings(out, shards[1]).astype(np.float32), direct, atol=2e-3)
    facts = embed.read_embed_facts(out)
    assert facts["teacher_step"] == 123 and facts["dim"] == 16 and len(facts["teacher_sha256"]) == 64


def test_shard_subset_then_resume_then_new_teacher(demo, tmp_path):
    run = tmp_path / "run"
    make_teacher(run)
    cfg = make_cfg(run, demo)
    out = RunLayout(run).stage_dir("embed", 1)
    shards = shard_paths(demo)
    res = embed.run(cfg, run, shard_ids=[2])
    assert res["written"] == 1 and [embed.is_embedded(out, s) for s in shards] == [False, False, True]
    before = embed.emb_path(out, shards[2]).stat().st_mtime_ns
    res = embed.run(cfg, run)  # completes the rest, leaves shard 2 alone
    assert res["written"] == 2 and res["already_done"] == 1
    assert embed.emb_path(out, shards[2]).stat().st_mtime_ns == before
    assert embed.run(cfg, run)["written"] == 0
    with pytest.raises(ValueError, match="not in the unlabeled index"):
        embed.run(cfg, run, shard_ids=[7])
    old = embed.load_embeddings(out, shards[0]).copy()
    make_teacher(run, seed=1)  # a different teacher: every embedding is stale
    assert embed.run(cfg, run)["written"] == 3
    assert not np.allclose(old, embed.load_embeddings(out, shards[0]))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    def sample(i, data=None):
        img = Image.new("RGB", (32, 32), (10 * i, 100, 200 - 10 * i))
        return {
            "__key__": f"img{i:03d}",
            "jpg": data if data is not None else encode_jpeg(img),
            "json": json.dumps({"label": i % 2}).encode(),
        }

    unl = tmp_path / "unl"
    n0 = write_shard(unl / "unl-000000.tar", [sample(0), sample(1, b"not a jpeg at all"), sample(2)])
    n1 = write_shard(unl / "unl-000001.tar", [sample(3, b"\xff\xd8\xff garbage"), sample(4)])
    write_index(unl, [{"name": "unl-000000.tar", "count": n0}, {"name": "unl-000001.tar", "count": n1}], "unlabeled")
    run = tmp_path / "run"
    make_teacher(run)
    res = embed.run(make_cfg(run, unl), run)
    out = RunLayout(run).stage_dir("embed", 1)
    assert res["skipped_corrupt"] == 2 and res["images"] == 3
    assert embed.read_keys(out, 0) == ["img000", "img002"]
    assert embed.read_keys(out, 1) == ["img004"]
    assert embed.load_embeddings(out, 0).shape == (2, 16)
    assert embed.read_hidden_labels(out, 1).tolist() == ["0"]


def test_nothing_readable_is_unusable_input(tmp_path):
    """A crawl whose every image is outside the contract: one UnusableInput line (exit 2 at the
    CLI), not a RuntimeError traceback."""
    unl = tmp_path / "unl"
    n = write_shard(unl / "unl-000000.tar", [{"__key__": f"x{i}", "jpg": b"not a jpeg"} for i in range(3)])
    write_index(unl, [{"name": "unl-000000.tar", "count": n}], "unlabeled")
    run = tmp_path / "run"
    make_teacher(run)
    with pytest.raises(UnusableInput, match="not one of the 3 images of 1 shards .* could be read"):
        embed.run(make_cfg(run, unl), run)


def test_missing_teacher_is_a_clear_error(demo, tmp_path):
    # the shard-subset command line (--shards, job arrays) is the launcher's: tests/unit/test_launch.py
    run = tmp_path / "run"
    cfg = make_cfg(run, demo)
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        embed.run(cfg, run)
