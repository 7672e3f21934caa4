"""The "curate" stage: the unlabeled pool checked once, before anything reads it.

Runs first in the chain when `curate.enabled` (stages.pipeline_plan); every round's cluster stage
then uses only the samples it keeps (data/curation.py, pseudo/cluster_pool.py), and so does the
student drawing from the clusters.
1. **Decontamination**: a pool image that is a copy of an image of a test set (data.test_shards,
   data.query_shards, data.gallery_shards: each one set) is removed, and so is one whose bytes
   equal a test image's (blake2b; `curate.hash_check`).
2. **Near-duplicate groups** among the images left: copies of one another are joined (connected
   components); the group's first row in shard order stays, the others are removed.
3. **Balance** is the cluster stage's (pseudo/cluster_pool.py: `curate.cluster_cap`, the collapse
   warning).
How a copy is found (data/copies.py): each image gets a signature (a colour histogram and a 32-px
colour thumbnail). FAISS finds each image's `candidates` nearest by histogram (exact inner
product; on a GPU where faiss-gpu sees one); a candidate within `candidate_radius` gets the pixel
check (`copy_match`: gradient maps correlated over the crops, scales and rotations of the copy
ranges, then the colours compared at the best alignment): a structure score from `match_threshold`
and a colour difference up to `colour_threshold` make it a copy. Not the teacher embedding: a
metric-learning embedding puts every image of a class together by design, so it cannot tell a copy
of a test image from another photo of its class (measured on the demo, docs/SCALING.md), and a
check on pixels needs no teacher, so the pool is curated once, before pretrain.

  search.py       signatures, the exact FAISS index, counts summed over ranks
  references.py   the test sets' images (every set named), NoTestImages
  calibration.py  thresholds calibrated on edited copies of test images (calibration.json), PairCheck
  scan.py         each unlabeled shard scanned against the test images (resumable scan-%06d.npz)
  dedup.py        near-duplicate groups: coarse cells, search inside each, components on rank 0
  stage.py        run: the order above, the decision files, curate.json, decontaminated.tsv, TensorBoard

Outputs (<run>/curate/): `cur-%06d.npz` + `curate.json` (format: data/curation.py),
`decontaminated.tsv`, `calibration.json`, `duplicates.npy`, `scan-%06d.npz` + `scan.json`,
TensorBoard `tb/curate`.
Tests: tests/unit/test_curate.py, tests/integration/test_curate_multirank.py.
"""

from .calibration import choose_thresholds
from .dedup import cell_targets, duplicate_groups
from .references import NoTestImages, test_set_dirs
from .search import shard_signatures, unit_distances
from .stage import run

__all__ = [
    "NoTestImages",
    "cell_targets",
    "choose_thresholds",
    "duplicate_groups",
    "run",
    "shard_signatures",
    "test_set_dirs",
    "unit_distances",
]
