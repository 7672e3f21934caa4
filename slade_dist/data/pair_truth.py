"""Truth for pseudo labels, where the data carries it: the hidden class of an unlabeled sample.

Unlabeled samples of the demo, the NABirds / CompCars converters (data/writers.py) and any crawl
whose json names a class carry a hidden `label`; it is never trained on, only measured against.
Owns `true_label_id(meta)`: that label as an int (an int label as is, any other value a stable
31-bit crc32 of its text, so only equality means anything; UNKNOWN = -1 where there is none). The
student's pseudo-labeled batches carry it as `true_labels` (data/readers.py,
`pseudo_labeled_batches`); the student measures its pairs against it (train/student.py,
`TruthPrecision`: truth/* in TensorBoard, `truth_precision` in DONE.json).
Tests: tests/unit/test_pair_truth.py.
"""

from __future__ import annotations

import zlib
from typing import Any

__all__ = ["UNKNOWN", "true_label_id"]

UNKNOWN = -1


def true_label_id(meta: Any) -> int:
    """The hidden class of a sample's parsed json ({"label": ...}) as an int >= 0, or -1."""
    label = meta.get("label") if isinstance(meta, dict) else None
    if label is None or isinstance(label, bool):
        return UNKNOWN
    if isinstance(label, int):
        return label if label >= 0 else UNKNOWN
    return zlib.crc32(str(label).encode("utf-8")) & 0x7FFFFFFF
