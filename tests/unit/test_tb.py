"""Tests of slade_dist/tb.py: TBWriter read back with TensorBoard's EventAccumulator, config_hparams.
(Progress bars: tests/unit/test_progress.py.)
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from slade_dist import stages
from slade_dist.config import load_config
from slade_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from slade_dist.tb import TBWriter, config_hparams

REPO = Path(__file__).resolve().parents[2]


def _accumulator(log_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _png(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def _next_second() -> None:
    """Event files are read in name order, and the name starts with the second it was opened:
    runs of a stage are seconds apart in real use, so a test's second run starts in a new second."""
    t = int(time.time())
    while int(time.time()) == t:
        time.sleep(0.05)


# ------------------------------------------------------------------------------------- images
def test_images_are_denormalised_with_the_data_mean_std_into_one_grid(tmp_path):
    colour = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    batch = ((colour - mean) / std).expand(4, 3, 8, 8)  # as the readers hand them to the model
    with TBWriter(tmp_path, enabled=True, image_norm=(IMAGENET_MEAN, IMAGENET_STD)) as tb:
        tb.images("batch/labeled", batch, 0, nrow=2)
        tb.images("batch/wide", batch, 0, nrow=4)
    ea = _accumulator(tmp_path)
    (square,), (wide,) = ea.Images("batch/labeled"), ea.Images("batch/wide")
    assert (square.width, square.height) == (22, 22)  # 2 x 2 images of 8 px, 2 px padding
    assert (wide.width, wide.height) == (42, 12)
    np.testing.assert_allclose(_png(square)[5, 5], [51, 128, 204], atol=2)  # the colour, not its z-scores


def test_uint8_images_are_shown_as_they_are_and_once_keeps_the_first_batch(tmp_path):
    with TBWriter(tmp_path, enabled=True, image_norm=(IMAGENET_MEAN, IMAGENET_STD)) as tb:
        for step, value in ((0, 200), (1, 10)):
            tb.images("pseudo/first", torch.full((2, 3, 4, 4), value, dtype=torch.uint8), step, once=True)
    (only,) = _accumulator(tmp_path).Images("pseudo/first")
    assert only.step == 0 and (_png(only)[3, 3] == 200).all()


def test_a_disabled_writer_writes_nothing(tmp_path):
    tb = TBWriter(tmp_path / "off", enabled=False)
    tb.images("x", torch.zeros(1, 3, 4, 4), 0)
    tb.hparams({"a": 1}, {"m": 1.0})
    tb.embedding("e", np.zeros((3, 2)), np.zeros(3, int))
    tb.close()
    assert not (tmp_path / "off").exists() and not tb.active


# ------------------------------------------------------------------------------- fresh runs
def test_a_rerun_from_step_0_replaces_the_old_curve_and_a_resume_keeps_its_prefix(tmp_path):
    with TBWriter(tmp_path, enabled=True) as tb:
        for s in range(5):
            tb.scalars({"loss": 1.0}, s)
    _next_second()
    with TBWriter(tmp_path, enabled=True) as tb:  # eval --force, or a trainer starting over
        for s in range(2):
            tb.scalars({"loss": 2.0}, s)
    assert [(e.step, e.value) for e in _accumulator(tmp_path).Scalars("loss")] == [(0, 2.0), (1, 2.0)]
    _next_second()
    with TBWriter(tmp_path, enabled=True, resume_step=1) as tb:  # resumed from the step-1 checkpoint
        tb.scalars({"loss": 3.0}, 2)
    assert [(e.step, e.value) for e in _accumulator(tmp_path).Scalars("loss")] == [(0, 2.0), (1, 2.0), (2, 3.0)]


# -------------------------------------------------------------------------------- projector
def _projector(log_dir: Path) -> ProjectorConfig:
    return text_format.Parse((log_dir / "projector_config.pbtxt").read_text(), ProjectorConfig())


def test_embedding_keeps_at_most_50_classes_with_names_and_thumbnails(tmp_path):
    labels = np.repeat(np.arange(60), 4)
    feats = np.random.default_rng(0).standard_normal((240, 5)).astype(np.float32)
    names = [f"bird{c}" for c in range(60)]
    thumbs = torch.randint(0, 255, (240, 3, 8, 8), dtype=torch.uint8)
    with TBWriter(tmp_path, enabled=True) as tb:
        tb.embedding("eval/test", feats, labels, thumbs, step=3, names=names)
    (emb,) = _projector(tmp_path).embeddings
    folder = tmp_path / "00003" / "eval%2ftest"
    meta = (folder / "metadata.tsv").read_text().split()
    assert len(set(meta)) == 50 and set(meta) <= set(names) and len(meta) == 200
    assert len((folder / "tensors.tsv").read_text().splitlines()) == 200
    assert emb.sprite.single_image_dim == [8, 8] and (folder / "sprite.png").stat().st_size > 0
    with TBWriter(tmp_path / "few", enabled=True) as tb:
        tb.embedding("test", feats, labels, step=0, max_points=30)
    assert len((tmp_path / "few" / "00000" / "test" / "tensors.tsv").read_text().splitlines()) == 30


def test_a_rerun_replaces_the_projector_instead_of_adding_to_it(tmp_path):
    feats, labels = np.ones((4, 2), np.float32), np.arange(4)
    with TBWriter(tmp_path, enabled=True) as tb:
        tb.embedding("eval/test", feats, labels, torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    with TBWriter(tmp_path, enabled=True) as tb:  # eval --force, this time without thumbnails
        tb.embedding("eval/test", feats, labels)
    (emb,) = _projector(tmp_path).embeddings  # one entry, the rerun's
    assert not emb.sprite.image_path and not (tmp_path / "00000" / "eval%2ftest" / "sprite.png").exists()


def test_projector_reads_pairs_until_it_has_enough_rows_of_the_first_classes(tmp_path):
    closed = []

    def pairs():  # what models.embed_batches yields: (embeddings, the batch)
        try:
            for b in range(100):
                lab = torch.arange(b * 4, b * 4 + 4) % 60
                yield np.full((4, 3), b, np.float32), {"labels": lab, "images": torch.zeros(4, 3, 40, 40)}
        finally:
            closed.append(True)

    with TBWriter(tmp_path, enabled=True, image_norm=(IMAGENET_MEAN, IMAGENET_STD)) as tb:
        tb.projector("test", pairs(), 1, max_points=220)
    meta = (tmp_path / "00001" / "test" / "metadata.tsv").read_text().split()
    assert len(meta) == 220 and set(map(int, meta)) == set(range(50))  # the first 50 labels met
    assert closed == [True]  # the reader was ended, not left half-read
    assert _projector(tmp_path).embeddings[0].sprite.single_image_dim == [32, 32]


# ---------------------------------------------------------------------------------- hparams
def test_hparams_go_into_the_writers_own_run_with_the_metrics(tmp_path):
    with TBWriter(tmp_path, enabled=True) as tb:
        tb.scalars({"eval/map_at_r": 0.25}, 0)
        tb.hparams({"train.lr": 0.1, "model.backbone": "tiny_cnn", "bad": [1]}, {"final/map_at_r": 0.5})
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-run (torch's add_hparams makes one)
    ea = _accumulator(tmp_path)
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == 0.1
    assert start.hparams["model.backbone"].string_value == "tiny_cnn" and "bad" not in start.hparams
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in exp.metric_infos] == ["final/map_at_r"]
    assert [e.value for e in ea.Scalars("final/map_at_r")] == [0.5]


def test_config_hparams_are_the_knobs_that_change_results_among_the_chains_declared_reads():
    cfg = load_config(None, ["data.train_shards=/somewhere", "train.lr=0.01"], check_paths=False)
    hp = config_hparams(cfg, stages.chain_reads(cfg))
    assert hp["train.lr"] == 0.01 and hp["model.backbone"] == cfg.model.backbone
    assert "data.augment.flip" in hp and "pseudo.k" in hp and "run.rounds" in hp
    for left_out in ("data.train_shards", "train.log_every", "data.num_workers", "run.dir", "run.round"):
        assert left_out not in hp
    assert not any(k.startswith(("launch.", "demo.")) for k in hp)  # no stage reads them
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    assert "pretrain.steps" not in config_hparams(cfg, stages.STAGES["teacher"].reads)
    assert config_hparams(cfg, ["train.lr"]) == {"train.lr": 0.01}
