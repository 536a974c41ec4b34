"""Metric names (docs/design.md §7): the one place that builds them and parses them back.

A name is `SPLIT/QUANTITY`, per level `SPLIT/QUANTITY/level_L` (level 1 = finest), e.g.
`eval/kl/level_3`, `gap/bpd`, `eval/recon_bpd/g_given_r`, `verdict/overfit/level_2`. Code that
computes metrics without knowing its split builds the unprefixed `QUANTITY[/level_L]` and the
caller adds the split (`prefixed`). The reports read metrics.jsonl back through `parse` and
`levels`. Pure Python: the training loop, the reports and the console all use it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

TRAIN, EVAL_TRAIN, EVAL, GAP, VERDICT = "train", "eval_train", "eval", "gap", "verdict"
_LEVEL = re.compile(r"^level_(\d+)$")


def name(*parts: str, level: int | None = None) -> str:
  """Joins the parts with "/" and appends `level_L` for a per-level metric.

  name("eval", "kl", level=3) -> "eval/kl/level_3"; name("kl_bpd", level=1) -> "kl_bpd/level_1";
  name("gap", "bpd") -> "gap/bpd".
  """
  return "/".join(parts + (() if level is None else (f"level_{int(level)}",)))


def prefixed(split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
  """The metrics with `split/` in front of every name."""
  return {name(split, k): v for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class MetricName:
  """A parsed name: `split`/`quantity`[/level_`level`]."""

  split: str
  quantity: str  # may itself hold a "/", e.g. "recon_bpd/r"
  level: int | None = None


def parse(metric: str) -> MetricName | None:
  """The parts of a prefixed name; None for a name without a split (no "/").

  parse("eval/kl/level_3") -> MetricName("eval", "kl", 3);
  parse("eval/recon_bpd/r") -> MetricName("eval", "recon_bpd/r", None).
  """
  parts = metric.split("/")
  if len(parts) < 2:
    return None
  level = None
  if len(parts) > 2 and (m := _LEVEL.match(parts[-1])):
    level, parts = int(m.group(1)), parts[:-1]
  return MetricName(parts[0], "/".join(parts[1:]), level)


def levels(metrics: Iterable[str], split: str | None = None,
           quantity: str | None = None) -> list[int]:
  """The levels (sorted, unique) of the per-level names among `metrics`, optionally only those
  of one split and/or quantity."""
  found = set()
  for metric in metrics:
    p = parse(metric)
    if (p is not None and p.level is not None and split in (None, p.split)
        and quantity in (None, p.quantity)):
      found.add(p.level)
  return sorted(found)


def gaps(metrics: Mapping[str, float], quantity: str,
         levels: Iterable[int | None] = (None,)) -> dict[str, float]:
  """`gap/QUANTITY[/level_L]` = `eval/…` − `eval_train/…` for each of `levels` (None: the
  metric is not per level), from `metrics` holding both splits."""
  return {name(GAP, quantity, level=l): metrics[name(EVAL, quantity, level=l)]
          - metrics[name(EVAL_TRAIN, quantity, level=l)] for l in levels}
