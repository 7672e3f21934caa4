"""The same method at any world size: 1, 2 and 4 real gloo ranks, and 2 ranks x train.grad_accum 2,
holding the same global batches, give the same losses, the same SLADE Gaussians and mined pairs,
the same SwAV codes (loss, queue) and the same parameters after every step (so the same averaged
gradients: SGD without momentum, decay or clipping), for pretrain, teacher and student, with one
class and one pseudo-class per rank at 4 ranks. BatchNorm that trains is synchronised
(model.sync_bn); the grad_accum runs use frozen BatchNorm (per-micro-batch statistics are refused).
Workers: tests/integration/_world_workers.py (the real Trainer and train/loop.py's optimizer_step).
"""

from __future__ import annotations

import pytest
import torch

from slade_dist import dist
from tests.integration import _world_workers as W

pytestmark = pytest.mark.slow

RUNS = {  # (world, grad_accum, frozen BatchNorm)
    "bn": [(1, 1, False), (2, 1, False), (4, 1, False)],
    "accum": [(1, 1, True), (2, 2, True)],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    results = {}
    for shapes in RUNS.values():
        for world, accum, frozen in shapes:
            dist.run_local_processes(W.world_worker, world, args=(str(out), accum, frozen), extra_env=env)
            tag = f"w{world}-a{accum}-{'frozen' if frozen else 'bn'}"
            results[(world, accum, frozen)] = torch.load(out / f"{tag}.pt")
    return results


def _same(ref: list[dict], got: list[dict], what: str) -> None:
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        where = f"{what} step {step}"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), where
        assert set(a["scalars"]) == set(b["scalars"]), where
        for key, value in a["scalars"].items():
            if key.endswith(("_pairs", "pos_mined", "neg_mined")):  # pair counts: exactly the same pairs
                assert b["scalars"][key] == value, f"{where} {key}"
            else:
                assert b["scalars"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{where} {key}"
        scale = (a["params"] - (ref[step - 1]["params"] if step else a["params"])).abs().max().item()
        assert torch.allclose(b["params"], a["params"], rtol=1e-4, atol=1e-5 + 1e-3 * scale), where


@pytest.mark.parametrize("group", ["bn", "accum"])
@pytest.mark.parametrize("stage", ["pretrain", "teacher", "student"])
def test_every_world_size_trains_the_same(runs, group, stage):
    ref_key, *others = RUNS[group]
    ref = runs[ref_key][stage]
    assert ref[1]["params"].ne(ref[0]["params"]).any()  # training moves the weights
    for key in others:
        _same(ref, runs[key][stage], f"{stage} {key} vs {ref_key}")


def test_slade_terms_are_alive_with_one_pseudo_class_per_rank(runs):
    """At 4 ranks each rank holds a single pseudo-class (2 of the step's 8 unlabeled rows): L_SD
    and Eq. 7 mining still see the global batch's negative pairs, at every step after the warm-up."""
    student = runs[(4, 1, False)]["student"]
    for step in range(1, W.STEPS):
        s = student[step]["scalars"]
        assert s["basis/n_neg_pairs"] == 24 and s["basis/n_pos_pairs"] == 4  # 8 rows of 4 classes
        assert s["loss/sd"] > 0
        assert s["mining/pos_pairs"] > 0 and s["loss/rank_mined"] > 0
        assert s["mining/literal_neg_pairs"] == s["mining/neg_pairs"]  # the literal reading trains
    # the same batch per rank alone would have had no negative pair: the terms would be dead
    assert sum(student[step]["scalars"]["mining/neg_pairs"] for step in range(1, W.STEPS)) > 0


def test_swav_uses_its_queue_at_every_world_size(runs):
    for key in RUNS["bn"]:
        used = [s["scalars"]["swav/queue_used"] for s in runs[key]["pretrain"]]
        assert used == [0.0, 0.0, 0.0, 1.0]  # 24 global rows = 3 steps of 8: full from the 4th step
