"""Metrics sinks: JSON lines and TensorBoard event files (tensorboardX) in the run directory."""

from __future__ import annotations

import json
import os
from typing import Mapping

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Append scalars per step to <run_dir>/metrics.jsonl and <run_dir>/tensorboard.

    `enabled=False` (every process but the first of a multi-process run) writes nothing.
    """

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
