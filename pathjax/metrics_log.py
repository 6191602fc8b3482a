"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard (WORKDIR/tb) and a progress line.

Only process 0 writes; other processes get a logger that does nothing. metrics.jsonl is
append-only: a resumed run appends a marker line `{"event": "resume", "step": S, ...}` and
`read_metrics` drops the records past S written before it (a crash between checkpoints), so
the file reads as one run, every step once, while nothing written is ever lost
(`read_metrics(workdir, raw=True)` returns every line).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

TIMING_KEYS = ("steps_per_sec", "examples_per_sec", "elapsed_sec")


RESUME_EVENT = "resume"


def read_metrics(workdir: str, *, raw: bool = False) -> list[dict]:
  """The metrics records as one run (see the module docstring); `raw`: every line as written.

  A last line cut short by a kill is skipped.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON") from None
  if raw:
    return records
  out: list[dict] = []
  for record in records:
    if record.get("event") == RESUME_EVENT:
      out = [r for r in out if r.get("step", 0) <= record["step"]]
    elif "event" not in record:
      out.append(record)
  return out


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without torch when torch is not loaded yet.

  tensorboardX imports torch (seconds) only to accept torch tensors; we log Python floats.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX
  try:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  except ImportError:
    return None
  finally:
    if blocked:
      sys.modules.pop("torch", None)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsLogger:
  def __init__(self, workdir: str, total_steps: int, batch_size: int, *, enabled: bool = True,
               tensorboard: bool = True, stream=None):
    self.workdir = workdir
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self._writer = None
    self._last_time = None
    self._last_step = None
    self._start = time.time()
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
      writer_class = _summary_writer_class()
      self._writer = writer_class(os.path.join(workdir, "tb")) if writer_class else None

  def mark_resume(self, step: int) -> None:
    """Appends a resume marker: records past `step` already in the file (written after the
    checkpoint a crashed run resumes from) stop counting; the file is never rewritten."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, "rb+") as f:  # a line cut short by a kill gets its newline
      f.seek(0, os.SEEK_END)
      if f.tell():
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          f.write(b"\n")
    with open(self.path, "a") as f:
      f.write(json.dumps({"event": RESUME_EVENT, "step": int(step), "time": time.time()}) + "\n")

  def start(self, step: int) -> None:
    """Starts the steps/s clock at `step` (after a restore, or 0)."""
    self._last_time, self._last_step = time.time(), step

  def log(self, step: int, metrics: Mapping[str, float], *, progress: bool = True) -> dict:
    """Writes one record for `step` (timing added); returns it."""
    now = time.time()
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in metrics.items()})
    if self._last_step is not None and step > self._last_step:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      record["steps_per_sec"] = rate
      record["examples_per_sec"] = rate * self.batch_size
    record["elapsed_sec"] = now - self._start
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return record
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._writer is not None:
      for key, value in record.items():
        if key != "step":
          self._writer.add_scalar(key, value, step)
      self._writer.flush()
    if progress:
      self.stream.write(self.progress_line(record) + "\n")
      self.stream.flush()
    return record

  def progress_line(self, record: Mapping[str, float]) -> str:
    step = record["step"]
    parts = [f"step {step}/{self.total_steps}"]
    for key in ("loss", "learning_rate", "grad_norm"):
      if key in record:
        parts.append(f"{key} {record[key]:.4g}")
    extra = [k for k in record if "/" in k]  # evaluation metrics ("name/metric")
    parts += [f"{k} {record[k]:.4g}" for k in extra]
    rate = record.get("steps_per_sec")
    if rate:
      parts.append(f"{rate:.2f} steps/s")
      parts.append(f"ETA {_format_duration((self.total_steps - step) / rate)}")
    return " | ".join(parts)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
