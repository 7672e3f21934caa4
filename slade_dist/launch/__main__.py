"""`python -m slade_dist.launch ...`: the same command line as launch/submit.py.
Tests: tests/unit/test_launch.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m slade_dist.launch"))
