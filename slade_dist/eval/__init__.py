"""Evaluation: retrieval metrics (metrics.py) and the eval stage (stage.py).
Tests: tests/unit/test_metrics.py."""
