#!/usr/bin/env python
"""slade_dist launcher: `python launch/submit.py --stage STAGE --config FILE [k=v ...]` (launch/README.md).
Everything it does lives in the package slade_dist.launch. Tests: tests/unit/test_launch.py.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # a clone used without `pip install -e .`, from any directory
    sys.path.insert(0, str(REPO_ROOT))

from slade_dist.launch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
