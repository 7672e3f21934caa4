"""Teacher and student stages on 2 real processes (DeepSpeed on CPU, gloo) over tiny real shards.

Checks: losses fall, every rank ends with identical parameters (and basis Gaussians), the student
with ONE pseudo-class per rank trains L_SD and mines Eq. 7 pairs at every step after its warm-up
(the pairs are the global batch's), the exported
final.pt files load without DeepSpeed, TensorBoard events read back with EventAccumulator carry
the monitoring tags (loss terms, lr per group, throughput, data wait, skipped corrupt samples,
mu/var, mined pairs, periodic eval), and the config text. Then the 2-rank ZeRO-0 teacher
checkpoint continues on 1 rank with exactly the same state.
"""

from __future__ import annotations

import pytest
import torch

from slade_dist.models import load_embedder
from slade_dist.stages import RunLayout

from . import _train_workers as W


@pytest.mark.slow
def test_teacher_then_student_on_two_ranks(tmp_path):
    data = W.make_data(tmp_path / "data", corrupt=3)
    run_dir = tmp_path / "run"
    W.write_pseudo(data["unlabeled"], RunLayout(run_dir).stage_dir("cluster", 1), data["truth"], noise=0.1)
    ovr = W.overrides(
        data,
        run_dir,
        "train.teacher_steps=16",
        "train.student_steps=16",
        "train.eval_every=8",
        "student.basis_warmup_steps=4",
        "student.unlabeled_classes_per_batch=2",  # one pseudo-class per rank
    )
    per_rank = W.run_ranks(2, ["teacher", "student"], ovr, tmp_path / "res")

    for stage in ("teacher", "student"):
        r0, r1 = per_rank[0][stage], per_rank[1][stage]
        assert r0["steps"] == r1["steps"] == 16
        assert r0["param_digest"] == r1["param_digest"], f"{stage}: replicas diverged"
        losses = [v for _, v in r0["loss_history"]]
        assert sum(losses[-2:]) < sum(losses[:2]), f"{stage} loss did not fall: {losses}"
    student = per_rank[0]["student"]
    assert student["basis"] == per_rank[1]["student"]["basis"]  # Gaussians and pair counts: the global batch's
    assert student["basis"]["mu_pos"] > student["basis"]["mu_neg"]
    assert student["init"].endswith("teacher/final.pt")

    layout = RunLayout(run_dir)
    emb = load_embedder(layout.stage_dir("teacher") / "final.pt")  # plain torch, no DeepSpeed
    assert emb(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    final = torch.load(layout.stage_dir("student", 1) / "final.pt", weights_only=True)
    assert final["extra"]["basis_state_dict"]["W_a"].shape == (6, 32)
    assert (layout.done_file("student", 1)).exists()

    teacher_tb = W.tb_scalars(layout.tb_dir("teacher"))
    assert {
        "loss/total",
        "loss/rank_labeled",
        "lr/backbone",
        "lr/head",
        "perf/images_per_s",
        "perf/data_wait_pct",
        "data/skipped_samples",
    } <= set(teacher_tb)
    assert any(t.startswith("eval/") for t in teacher_tb), sorted(teacher_tb)
    assert [s for s, _ in teacher_tb["loss/total"]] == list(range(2, 17, 2))

    student_tb = W.tb_scalars(layout.tb_dir("student", 1))
    assert {
        "loss/rank_labeled",
        "loss/ce",
        "loss/sd",
        "loss/rank_mined",
        "lr/basis",
        "basis/mu_pos",
        "basis/mu_neg",
        "basis/var_pos",
        "basis/var_neg",
        "mining/pos_pairs",
        "mining/neg_pairs",
        "data/skipped_samples",
        "perf/images_per_s",
    } <= set(student_tb)
    # one pseudo-class per rank: a rank alone has no pseudo-negative pair, the global batch has
    # (2 clusters x 4 images: 16 unordered negative pairs); every window after the warm-up trains
    # L_SD and mines pairs
    after_warmup = [s for s, _ in student_tb["loss/total"] if s > 4]
    sd, pos = dict(student_tb["loss/sd"]), dict(student_tb["mining/pos_pairs"])
    assert after_warmup and all(sd[s] > 0 and pos[s] > 0 for s in after_warmup), (sd, pos)
    # each rank draws its pseudo-class at random: a step whose two ranks drew the same one has no
    # negative pair at all, the others have 16 (logged: the mean over a window of 2 steps)
    neg = [v for _, v in student_tb["basis/n_neg_pairs"]]
    assert max(neg) == 16 and all(v in (0, 8, 16) for v in neg), neg
    # warm-up: the embedder's groups have lr 0 while W_a trains
    lr_head = dict(student_tb["lr/head"])
    assert lr_head[2] == 0.0 and lr_head[8] > 0.0 and dict(student_tb["lr/basis"])[2] > 0.0
    assert sum(v for _, v in student_tb["data/skipped_samples"]) > 0  # the corrupt jpgs were met
    assert "config/text_summary" in W.tb_text_tags(layout.tb_dir("teacher"))

    # ZeRO-0: the checkpoint written by 2 ranks loads directly on 1 (the same work, its DONE.json gone:
    # a changed config would start over instead, see test_faults.py)
    layout.done_file("teacher").unlink()
    one = W.run_ranks(1, ["teacher"], ovr, tmp_path / "one")[0]["teacher"]
    assert one["resumed"]["step"] == 16 and one["resumed"]["written_by_world_size"] == 2
    assert one["resumed"]["param_digest"] == per_rank[0]["teacher"]["param_digest"]
    assert one["resumed"]["optimizer_step"] == 16 and one["steps"] == 16
