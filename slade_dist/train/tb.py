"""Rank-0 TensorBoard writer keyed by optimizer step.

Owns: one SummaryWriter per training stage under RunLayout.tb_dir(...), written by rank 0 only
(every other rank gets a no-op writer), scalars keyed by step, the resolved config as text.
After a resume the writer is opened with `purge_step = resumed step + 1`, so TensorBoard (and
EventAccumulator) drop the events the killed run wrote past its last checkpoint: every step is
seen once. DeepSpeed's own monitor is not used (it keys by samples and opens a file per engine).
Tests: tests/unit/test_engine.py (read back with EventAccumulator), tests/integration/test_resume.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from .. import dist


class TBWriter:
    """Scalars/text for rank 0; a silent no-op on other ranks or when disabled."""

    def __init__(self, log_dir: str | os.PathLike[str] | None, *, resume_step: int = 0, enabled: bool | None = None):
        self.log_dir = Path(log_dir) if log_dir else None
        on = dist.is_main() if enabled is None else enabled
        self._w = None
        if on and self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step only matters after a resume: it hides the killed run's steps > checkpoint
            self._w = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1 if resume_step > 0 else None)

    @property
    def active(self) -> bool:
        return self._w is not None

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        if self._w is None:
            return
        for tag, v in values.items():
            if v is None:
                continue
            self._w.add_scalar(tag, float(v), step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        if self._w is not None:
            # markdown code block keeps YAML indentation readable in the Text tab
            self._w.add_text(tag, "```\n" + body + "\n```", step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
