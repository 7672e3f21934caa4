"""The launcher: slade_dist stages as Slurm jobs through submitit, or as local / in-process runs.

The only part of slade_dist that imports submitit; it never builds a model. What each module owns:
docs/ARCHITECTURE.md (the `launch/` row); how to use it: launch/README.md. Nothing is imported
here, so a task unpickling StageJob loads only what it needs.
Tests: tests/unit/test_launch.py, tests/integration/test_launch_local.py, tests/integration/test_slurm.py.
"""
