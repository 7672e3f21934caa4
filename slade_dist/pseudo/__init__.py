"""Pseudo labels: embed (teacher inference over the unlabeled shards), kmeans/ (distributed k-means,
a package: kmeans/__init__.py lists its pieces) and cluster (k-means -> one pseudo-label file per
unlabeled shard). See slade_dist/pseudo/README.md.
Tests: tests/unit/test_kmeans_*.py, test_cluster.py, test_embed.py, tests/integration/test_pseudo_multirank.py.
"""
