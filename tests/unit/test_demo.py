"""The demo generator: deterministic, right splits and formats (read back with webdataset), fast; planted
copies of test images and duplicate groups, their identity in planted.json."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from slade_dist.config import DemoConfig
from slade_dist.data.demo import MAX_CLASSES, PLANTED_FILE, class_table, generate, read_planted, render
from slade_dist.data.shards import read_classes, read_index, shard_paths

SMALL = dict(
    image_size=32,
    train_classes=4,
    test_classes=3,
    extra_classes=2,
    labeled_per_class=3,
    test_per_class=2,
    unlabeled_per_class=5,
    shard_size=7,
    workers=2,
)


def read_all(shard_dir):
    samples = []
    for p in shard_paths(shard_dir):
        for s in wds.WebDataset(str(p), shardshuffle=False):
            samples.append(s)
    return samples


def digest(out):
    h = hashlib.sha256()
    for split in ("train", "test", "unlabeled"):
        for p in shard_paths(out / split):
            h.update(p.read_bytes())
    return h.hexdigest()


def test_splits_formats_and_hidden_labels(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "d"), **SMALL)
    res = generate(cfg, progress=False)
    assert res["counts"] == {"train": 12, "test": 6, "unlabeled": 45}
    train, test, unl = (read_all(tmp_path / "d" / s) for s in ("train", "test", "unlabeled"))
    assert sorted({int(s["cls"]) for s in train}) == [0, 1, 2, 3]  # dense ids
    assert sorted({int(s["cls"]) for s in test}) == [0, 1, 2]
    assert all("cls" not in s for s in unl)  # no label member in the unlabeled set
    hidden = [json.loads(s["json"]) for s in unl]
    assert {h["split"] for h in hidden} == {"train", "test", "extra"}
    assert sorted({h["label"] for h in hidden}) == list(range(9))
    names_train, names_test = read_classes(tmp_path / "d" / "train"), read_classes(tmp_path / "d" / "test")
    assert len(names_train) == 4 and len(names_test) == 3 and not set(names_train) & set(names_test)
    img = Image.open(io.BytesIO(train[0]["jpg"]))
    assert img.size == (32, 32) and img.format == "JPEG"
    idx = read_index(tmp_path / "d" / "unlabeled")
    assert idx["total"] == 45 and [s["count"] for s in idx["shards"]] == [7] * 6 + [3]
    assert idx["shards"][0]["name"] == "unlabeled-000000.tar"


def test_deterministic_and_independent_of_workers(tmp_path):
    a = DemoConfig(out=str(tmp_path / "a"), **SMALL)
    b = replace(a, out=str(tmp_path / "b"), workers=1)
    generate(a, progress=False)
    generate(b, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    c = replace(a, out=str(tmp_path / "c"), seed=1)
    generate(c, progress=False)
    assert digest(tmp_path / "c") != digest(tmp_path / "a")


def test_rerun_skips_same_params_and_regenerates_changed(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "d"), **SMALL)
    assert not generate(cfg, progress=False)["skipped"]
    assert generate(cfg, progress=False)["skipped"]
    assert generate(replace(cfg, workers=1), progress=False)["skipped"]  # worker count changes no byte
    assert not generate(replace(cfg, labeled_per_class=4), progress=False)["skipped"]


def test_classes_differ_in_fine_details_only():
    cfg = DemoConfig(**{k: v for k, v in SMALL.items()})
    table = class_table(cfg)
    assert len(set(table)) == len(table) == 9
    # a train and a test class share most attributes in a big enough draw: fine-grained by design
    big = class_table(DemoConfig(train_classes=40, test_classes=40, extra_classes=20))
    shared = max(sum(a == b for a, b in zip(x, y)) for x in big[:40] for y in big[40:80])
    assert shared == 4
    with pytest.raises(ValueError, match="attribute space"):
        class_table(DemoConfig(train_classes=MAX_CLASSES, test_classes=2, extra_classes=0))


def test_render_varies_within_class_and_supports_224():
    table = class_table(DemoConfig(**SMALL))
    a = np.asarray(render(table[0], 64, np.random.default_rng(1)), dtype=float)
    b = np.asarray(render(table[0], 64, np.random.default_rng(2)), dtype=float)
    assert np.abs(a - b).mean() > 10  # nuisance: pose, background, clutter
    assert render(table[0], 224, np.random.default_rng(0)).size == (224, 224)


def test_rate_at_64px(tmp_path):
    """Reports the generation rate (the issue asks >= 5,000 images/min on 2 cores; measured, not asserted
    as a timing: the test only checks the figure is computed)."""
    cfg = DemoConfig(
        out=str(tmp_path / "d"),
        image_size=64,
        train_classes=10,
        test_classes=10,
        extra_classes=0,
        labeled_per_class=10,
        test_per_class=10,
        unlabeled_per_class=10,
        shard_size=100,
    )
    res = generate(cfg, progress=False)
    assert res["images"] == 400 and res["images_per_minute"] > 0


def test_planted_copies_mix_in_under_ordinary_keys_with_their_identity_aside(tmp_path):
    plain = DemoConfig(out=str(tmp_path / "plain"), **SMALL)
    planted = replace(plain, out=str(tmp_path / "planted"), planted_test_copies=8, duplicate_groups=3)
    generate(plain, progress=False)
    res = generate(planted, progress=False)
    assert res["counts"]["unlabeled"] == 45 + 8 + 3 * 2  # group size 3: the original and 2 copies
    assert not (tmp_path / "plain" / PLANTED_FILE).exists()
    truth = read_planted(tmp_path / "planted")
    unl = {s["__key__"]: s for s in read_all(tmp_path / "planted" / "unlabeled")}
    test = {s["__key__"]: s for s in read_all(tmp_path / "planted" / "test")}
    # every drawn image is the same image as without planting (only the keys move)
    assert {s["jpg"] for s in read_all(tmp_path / "plain" / "unlabeled")} <= {s["jpg"] for s in unl.values()}
    assert len(truth["test_copies"]) == 8 and len({c["of"] for c in truth["test_copies"]}) == 6  # 6 test images
    for c in truth["test_copies"]:
        copy, original = unl[c["key"]], test[c["of"]]
        assert (copy["jpg"] == original["jpg"]) == (c["edit"] == "same bytes")
        hidden = json.loads(copy["json"])  # an ordinary json: the class it shows, no hint of planting
        assert set(hidden) == {"source", "class_name", "label", "split"} and hidden["split"] == "test"
        assert hidden["class_name"] == json.loads(original["json"])["class_name"]
    assert len(truth["duplicate_groups"]) == 3
    for g in truth["duplicate_groups"]:
        assert len(g["keys"]) == 3 and g["edits"][0] == "original"
        assert len({json.loads(unl[k]["json"])["label"] for k in g["keys"]}) == 1
    assert generate(planted, progress=False)["skipped"]  # the planted counts are part of the params
    with pytest.raises(ValueError, match="more than the 45 unlabeled images"):
        generate(replace(planted, out=str(tmp_path / "x"), duplicate_groups=46), progress=False)
