"""Evaluation: retrieval metrics searched with FAISS (metrics.py), the eval stage (stage.py) and the
metrics table (report.py). Tests: tests/unit/test_{metrics,report}.py."""
