"""Reading a run's logged metrics without JAX: metrics.jsonl rows, and `Run` for the reports.

`read_metrics` is the one reader of metrics.jsonl (the training loop, reports and sweeps);
`load_run` adds the run's config.json and level count for hvae/report.py and
hvae/sweep_report.py. Kept apart from `hvae.writers` (which imports clu and TensorFlow) so
`--mode=report` needs neither.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging

from hvae import metric_names

METRICS_FILE = "metrics.jsonl"


def parse_lines(text: str, path: str) -> tuple[list[dict], str]:
  """Parses metrics.jsonl text.

  Args:
    text: the file's contents.
    path: the file's path, for log messages.

  Returns:
    (rows, good_text): the parsed rows and the text of exactly the lines that parsed, each
    ending in a newline (what a repaired file should contain).
  """
  rows, good = [], []
  lines = text.split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if not isinstance(row, dict) or "step" not in row:
      # The last line is expected to be cut short by a crash mid-write; anything else is news.
      last = i == len(lines) - 1
      (logging.info if last else logging.warning)(
          "Skipping unreadable line %d of %s: %.80r", i + 1, path, line)
      continue
    rows.append(row)
    good.append(line + "\n")
  return rows, "".join(good)


def read_metrics(workdir: str) -> list[dict]:
  """Reads WORKDIR/metrics.jsonl.

  Args:
    workdir: the run's working directory.

  Returns:
    One dict per logged step, in file order: {"step": int, name: float or None (non-finite)}.
    Unreadable lines (a last line truncated by a crash) are skipped. [] if there is no file.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    rows, _ = parse_lines(f.read(), path)
  return rows


def finite(v) -> bool:
  """A logged number that is not NaN or inf (`null` in metrics.jsonl reads as None)."""
  return isinstance(v, int | float) and math.isfinite(v)


@dataclasses.dataclass
class Run:
  """What the reports know about one workdir."""

  workdir: str
  name: str
  config: dict  # config.json as plain dicts and lists ({} when missing)
  rows: list[dict]
  num_levels: int  # 0 for a deterministic run
  done: bool

  def last(self, name: str) -> tuple[int | None, Any]:
    """(step, value) of the newest row holding `name`; (None, None) when never logged."""
    for row in reversed(self.rows):
      if name in row:
        return row["step"], row[name]
    return None, None

  def series(self, name: str) -> tuple[list[int], list[float]]:
    """Steps and values (non-finite as NaN) of every row holding `name`."""
    pairs = [(r["step"], math.nan if r[name] is None else r[name]) for r in self.rows if name in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]

  def has(self, name: str) -> bool:
    return any(name in r for r in self.rows)


def load_run(workdir: str, name: str | None = None) -> Run:
  """Reads a workdir's config.json and metrics.jsonl (either may be missing).

  Args:
    workdir: the run's directory.
    name: a display name (default: the directory's base name).

  Returns:
    The Run. Its level count comes from config.json (0 for model.kind = deterministic), else from
    the largest level among the logged metric names.
  """
  config, path = {}, os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  rows = read_metrics(workdir)
  model = config.get("model", {})
  if model.get("kind") == "deterministic":
    num_levels = 0
  elif "num_levels" in model:
    num_levels = int(model["num_levels"])
  else:
    num_levels = max(metric_names.levels(k for r in rows for k in r), default=0)
  name = name or os.path.basename(os.path.normpath(workdir))
  return Run(workdir, name, config, rows, num_levels, os.path.exists(os.path.join(workdir, "DONE")))
