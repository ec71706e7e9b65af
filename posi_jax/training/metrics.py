"""A training run's metrics, one home for both trainers (SFT, PPO): every row is appended to RUN/metrics.jsonl and its
scalars (and logged sample rewrites, as text) go to TensorBoard event files next to it (`training/tb_events.py`: the
records written directly, no torch, TensorFlow or protobuf library), so `tensorboard --logdir runs/` shows every run. `read_metrics` reads the JSONL
back (for `python -m posi_jax.report`).

Resuming keeps the rows up to the checkpoint and drops the later ones (they are redone); TensorBoard is told the same
with a purge step, so its curves have no doubled segment either.
"""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

from posi_jax.errors import PosiError
from posi_jax.training.tb_events import EventFileWriter

METRICS_FILE = "metrics.jsonl"


def is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsWriter:
    """Rows keyed by `step_key` ("step" for SFT, "iteration" for PPO). `resume_step`: None for a fresh run (an old
    metrics.jsonl and old event files are replaced), else the checkpoint's step (rows after it are dropped). `enabled=False` (processes
    other than 0 of a multi-host run) writes nothing."""

    def __init__(self, run_dir: str | Path, step_key: str, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.step_key, self.enabled = step_key, enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the crash being resumed from
                    continue
                if isinstance(row, dict) and row.get(step_key, 0) <= resume_step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept), encoding="utf-8")
        if not resume_step:  # a fresh start: an earlier attempt's curves would show next to this run's
            for old in self.path.parent.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step: TensorBoard discards this run's earlier events from that step on (they are being redone); a
        # unique file suffix: a resumed run starting within the same second must not overwrite the earlier file
        self._tb = EventFileWriter(self.path.parent, purge_step=(resume_step + 1) if resume_step else None,
                                   suffix=f".{uuid.uuid4().hex[:8]}")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self._tb is None:
            return
        step = int(row.get(self.step_key, 0))
        for key, value in row.items():
            if key != self.step_key and is_scalar(value):
                self._tb.add_scalar(key, float(value), step)
        if row.get("samples"):
            lines = ["| original | rewritten |", "|---|---|"] + [
                f"| {_cell(s.get('original', ''))} | {_cell(s.get('rewritten', ''))} |" for s in row["samples"]]
            self._tb.add_text("samples", "\n".join(lines), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def read_metrics(run_dir: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """The rows of RUN/metrics.jsonl (non-finite numbers come back as NaN); errors name the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        if missing_ok:
            return []
        raise PosiError(f"{path}: not found (not a training run folder, or no step finished yet)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PosiError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise PosiError(f"{path}: line {number} is not a JSON object")
        rows.append({k: (math.nan if is_scalar(v) and not math.isfinite(v) else v) for k, v in row.items()})
    return rows
