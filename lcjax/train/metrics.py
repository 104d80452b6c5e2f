"""Metrics sinks: JSON lines and TensorBoard event files (tensorboardX) in the run directory.

A run resumed from the checkpoint at step s re-runs steps s+1, s+2, ... that an interrupted run
may already have logged. So on opening, metrics.jsonl keeps only rows up to step s (rewritten
atomically; a half-written last line from a killed run is dropped), TensorBoard is told to
purge events past s (`purge_step`: TensorBoard discards earlier sessions' events at steps >= s+1,
the mechanism PyTorch's SummaryWriter uses for resume), and values already logged at step s are
not written again. Each (step, metric) then appears once.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

from tensorboardX import SummaryWriter

JSONL = "metrics.jsonl"


def _truncate_jsonl(path: str, resume_step: int) -> set:
    """Drop rows past `resume_step` (and unreadable lines); return the keys logged at it."""
    if not os.path.exists(path):
        return set()
    kept, logged = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if step <= resume_step:
                kept.append(json.dumps(row) + "\n")
                if step == resume_step:
                    logged.update(k for k in row if k != "step")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return logged


class MetricsWriter:
    """Append scalars per step to <run_dir>/metrics.jsonl and <run_dir>/tensorboard.

    `resume_step`: the step the run starts from; rows an earlier process logged past it are
    removed (see the module docstring). `enabled=False` (every process but the first of a
    multi-process run) writes nothing.
    """

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, JSONL)
        self._logged_at = resume_step
        self._already = set() if resume_step is None else _truncate_jsonl(path, resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        tb_dir = os.path.join(run_dir, "tensorboard")
        earlier = os.path.isdir(tb_dir) and any(n.startswith("events.") for n in os.listdir(tb_dir))
        purge = resume_step + 1 if resume_step is not None and earlier else None
        self._tb = SummaryWriter(tb_dir, purge_step=purge)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
        if step == self._logged_at:
            row = {k: v for k, v in row.items() if k not in self._already}
            if not row:
                return
        self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
