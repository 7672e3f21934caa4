"""Evaluation: retrieval metrics (metrics.py) with their exact kNN (knn.py) and FAISS-exact k-means
(lloyd.py), the C kernels both use (_kernels.c, built by native.py), and the eval stage (stage.py).
Tests: tests/unit/test_{metrics,knn,lloyd,native,report}.py."""
