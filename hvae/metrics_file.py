"""Reading metrics.jsonl: one JAX-free reader for the training loop, reports and sweeps.

Kept apart from `hvae.writers` (which imports clu and TensorFlow) so `--mode=report` needs
neither.
"""

from __future__ import annotations

import json
import os

from absl import logging

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
