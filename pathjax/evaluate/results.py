"""What every evaluation task returns, and how it is written to an output directory.

`TaskResult.write(out_dir)` writes `metrics.json` (task, model, data, metrics, skipped
images, warnings), `predictions.csv` (one row per example) and the task's PNG plots.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Callable


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
    return _clean(value.item())
  return value


@dataclasses.dataclass
class TaskResult:
  task: str
  metrics: dict[str, Any]                       # flat floats, or nested tables
  predictions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  plots: dict[str, Callable[[str], str]] = dataclasses.field(default_factory=dict)  # file -> writer(path)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  summary: str = ""                             # printable table

  def scalars(self, prefix: str = "") -> dict[str, float]:
    """Flat float metrics (nested dicts joined with '/'), for training logs."""
    out = {}

    def walk(d, p):
      for k, v in d.items():
        if isinstance(v, dict):
          walk(v, f"{p}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
          out[f"{p}{k}"] = float(v)
    walk(self.metrics, prefix)
    return out

  def write(self, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    path = os.path.join(out_dir, "metrics.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(_clean({"task": self.task, "metrics": self.metrics, **self.info}), f, indent=2)
    written["metrics"] = path
    if self.predictions:
      path = os.path.join(out_dir, "predictions.csv")
      fields = list(dict.fromkeys(k for row in self.predictions for k in row))
      with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in self.predictions:
          writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
      written["predictions"] = path
    for name, fn in self.plots.items():
      written[name] = fn(os.path.join(out_dir, name))
    return written


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """A plain text table; floats with 4 decimals."""
  def fmt(v):
    if isinstance(v, float):
      if not math.isfinite(v):
        return "nan"
      return str(int(v)) if v.is_integer() and abs(v) >= 2 else f"{v:.4f}"
    return str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
  line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
