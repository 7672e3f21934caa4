"""Truth for pseudo labels, where the data carries it: how many of the pairs trained on are right.

Unlabeled samples of the demo, the NABirds / CompCars converters (data/writers.py) and any crawl
whose json names a class carry a hidden `label`; it is never trained on, only measured against.
Owns:
- `true_label_id(meta)`: that label as an int (an int label as is, any other value a stable
  31-bit crc32 of its text, so only equality means anything; -1 where there is none); the student's
  pseudo-labeled batches carry it as `true_labels` (data/readers.py, `pseudo_labeled_batches`);
- `same_label_pairs(labels)`: the (2, n) ordered pairs i != j of equal label (a batch's
  pseudo-positive pairs: same cluster);
- `pair_agreement(pairs, true_labels, same)` -> (agreeing, known) and `pair_precision(...)` ->
  agreeing / known or None: of the pairs whose two truths are known, the share with the same
  truth (positives, same=True) or different truths (negatives, same=False). Pairs are (2, n) index
  tensors into the batch, as basis.mine_pairs returns them (Eq. 7 mined pairs). Summing
  (agreeing, known) over ranks and steps gives the precision of a whole run.
Tests: tests/unit/test_pair_truth.py.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

__all__ = ["UNKNOWN", "true_label_id", "same_label_pairs", "pair_agreement", "pair_precision"]

UNKNOWN = -1


def true_label_id(meta: Any) -> int:
    """The hidden class of a sample's parsed json ({"label": ...}) as an int >= 0, or -1."""
    label = meta.get("label") if isinstance(meta, dict) else None
    if label is None or isinstance(label, bool):
        return UNKNOWN
    if isinstance(label, int):
        return label if label >= 0 else UNKNOWN
    return zlib.crc32(str(label).encode("utf-8")) & 0x7FFFFFFF


def same_label_pairs(labels: torch.Tensor) -> torch.Tensor:
    """(2, n) long tensor of the ordered pairs (i, j), i != j, with labels[i] == labels[j]."""
    labels = labels.view(-1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    return same.nonzero().t().contiguous()


def pair_agreement(pairs: torch.Tensor, true_labels: torch.Tensor, same: bool = True) -> tuple[int, int]:
    """(pairs whose truths agree with `same`, pairs whose two truths are known)."""
    if pairs is None or pairs.numel() == 0:
        return 0, 0
    truth = true_labels.view(-1).to(pairs.device)
    a, b = truth[pairs[0]], truth[pairs[1]]
    known = (a != UNKNOWN) & (b != UNKNOWN)
    equal = (a == b) & known
    agreeing = int(equal.sum()) if same else int((known & ~equal).sum())
    return agreeing, int(known.sum())


def pair_precision(pairs: torch.Tensor, true_labels: torch.Tensor, same: bool = True) -> float | None:
    """Share of the pairs with both truths known whose truths are equal (same=True: positives) or
    differ (same=False: negatives); None when no pair has both truths."""
    agreeing, known = pair_agreement(pairs, true_labels, same)
    return agreeing / known if known else None
