"""Metrics to `metrics.jsonl` and TensorBoard event files in a run directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike, stage: str):
        from tensorboardX import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"stage": self.stage, "step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
