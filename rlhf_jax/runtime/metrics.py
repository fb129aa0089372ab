"""Metrics to `metrics.jsonl` and TensorBoard event files in a run directory."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rlhf_jax.runtime.fsio import write_text_atomically


class MetricsWriter:
    """Appends to a run's metrics. A run resumed from step N first drops this stage's lines after N (written
    by the attempt that was cut off), so that every step is in metrics.jsonl once; TensorBoard purges them too.
    `resume_step` -1 drops every line of the stage (a stage that writes all its lines anew, step 0 included)."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, resume_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.enabled = _is_primary()  # with several processes, process 0 writes the run's metrics
        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            drop_lines_after(path, resume_step, stage)
        self._jsonl = open(path, "a")
        # TensorBoard's events written in this thread and flushed with each line, as metrics.jsonl is (tensorboardX's
        # SummaryWriter queues them for a thread of its own, and its flush does not wait for that queue: a run
        # killed after a checkpoint lost the steps before it, which its resume does not write again)
        (self.run_dir / "tensorboard").mkdir(exist_ok=True)
        # named by the second it opened, and a suffix that two writers of one second (a quick resume) do not share
        self._tb = EventsWriter(str(self.run_dir / "tensorboard" / "events"), f".{time.time_ns() % 10 ** 9:09d}")
        if resume_step is not None:  # TensorBoard hides the earlier attempt's events after the checkpoint
            self._tb.write_event(Event(wall_time=time.time(), step=resume_step + 1,
                                       session_log=SessionLog(status=SessionLog.START)))

    def write(self, step: int, metrics: dict, policy: str | None = None) -> None:
        """One line of `metrics` at `step`; `policy`: whose they are when one stage logs several (eval), named in
        the line and in the TensorBoard tags (`eval/<policy>/<key>`). A non-finite value is null in the line (JSON
        has no NaN) and NaN or inf in TensorBoard."""
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        values = {k: float(v) for k, v in metrics.items()}
        now = time.time()
        named = {} if policy is None else {"policy": policy}
        line = {"stage": self.stage, "step": step, "time": now, **named,
                **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
        self._jsonl.flush()
        prefix = self.stage if policy is None else f"{self.stage}/{policy}"
        for k, v in values.items():
            self._tb.write_event(Event(wall_time=now, step=step, summary=scalar(f"{prefix}/{k}", v)))
        self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_primary() -> bool:
    distributed = sys.modules.get("rlhf_jax.runtime.distributed")  # not loaded: one process
    return distributed is None or distributed.is_primary()


def drop_lines_after(path: Path, step: int, stage: str | None = None) -> None:
    """Rewrite a JSON-lines log without the lines past `step` (of `stage` only, when given): what an attempt cut
    off after its last checkpoint wrote, about to be written again. Written whole, then swapped in."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if not ((stage is None or row.get("stage") == stage) and row.get("step", 0) > step):
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))
