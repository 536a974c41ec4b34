"""Which levels overfit: the `verdict/overfit/level_{l}` rule of DESIGN §7, on metrics rows.

A level overfits when its posterior starts to encode what is particular to the training examples:
held-out images then cost more nats at that level than training images do, and increasingly so,
while the training-split cost does not rise (if it rose too, the level is simply being used more,
and a growing gap is the expected side effect). Over the last `window` evaluations, level l is
flagged when

  * a gap signal grew by more than `gap_margin` nats (last minus first evaluation of the window)
    and ends positive: `gap/kl/level_l` (held-out minus train-split KL; computed from
    `eval/kl/level_l - eval_train/kl/level_l` when the gap itself is not logged), or the swap gap
    `eval/swap/level_l - eval_train/swap/level_l` when swaps are logged (either signal suffices);
  * and `eval_train/kl/level_l` rose by no more than `train_margin` nats over the same window.

Fewer than `window` evaluations, or a non-finite value (`null` in metrics.jsonl) in the window,
never flag. Pure Python: the report and the training loop both use it, neither needs a device.

Settings come from the optional config section `verdict` (`window`, `gap_margin`,
`train_margin`); `settings(config)` fills in the defaults below for keys it lacks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_WINDOW = 4  # evaluations the trend is measured over (first vs last of them)
DEFAULT_GAP_MARGIN = 2.0  # nats per image the gap must grow by
DEFAULT_TRAIN_MARGIN = 0.5  # nats per image eval_train/kl may rise by and still count as "not"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The verdict's knobs; see the module docstring."""

  window: int = DEFAULT_WINDOW
  gap_margin: float = DEFAULT_GAP_MARGIN
  train_margin: float = DEFAULT_TRAIN_MARGIN


@dataclasses.dataclass(frozen=True)
class LevelVerdict:
  """The verdict on one level and the sentence that explains it."""

  level: int
  flagged: bool
  why: str


def settings(config: Mapping[str, Any] | None) -> Settings:
  """The verdict settings of a config (ConfigDict or plain dict); defaults for missing keys.

  Args:
    config: the experiment config, or None.

  Returns:
    Settings, from `config["verdict"]` where present.
  """
  section = (config or {}).get("verdict", None) or {}
  s = Settings(window=int(section.get("window", DEFAULT_WINDOW)),
               gap_margin=float(section.get("gap_margin", DEFAULT_GAP_MARGIN)),
               train_margin=float(section.get("train_margin", DEFAULT_TRAIN_MARGIN)))
  if s.window < 2:
    raise ValueError(f"verdict.window: must be >= 2 evaluations, got {s.window}")
  return s


def _finite(value) -> bool:
  return value is not None and math.isfinite(value)


def _series(rows: Sequence[Mapping[str, Any]], level: int, signal: str) -> list[tuple]:
  """(step, gap, train_kl) at every evaluation logging the gap `signal` ("kl" or "swap").

  The gap is `gap/{signal}/level_l` where logged, else `eval/…` minus `eval_train/…`.
  """
  gap_name = f"gap/{signal}/level_{level}"
  held_name, train_name = f"eval/{signal}/level_{level}", f"eval_train/{signal}/level_{level}"
  out = []
  for row in rows:
    if gap_name in row:
      gap = row[gap_name]
    elif held_name in row and train_name in row:
      held, train = row[held_name], row[train_name]
      gap = held - train if _finite(held) and _finite(train) else None
    else:
      continue
    out.append((row["step"], gap, row.get(f"eval_train/kl/level_{level}")))
  return out


def _judge(level: int, signal: str, series: list[tuple], s: Settings) -> LevelVerdict | None:
  """The verdict from one gap signal; None when there is not enough of it to judge."""
  name = {"kl": "gap/kl", "swap": "swap gap"}[signal]
  if len(series) < s.window:
    return None
  window = series[-s.window:]
  (step0, gap0, train0), (step1, gap1, train1) = window[0], window[-1]
  if not all(_finite(v) for _, gap, train in window for v in (gap, train)):
    return LevelVerdict(level, False, f"level {level}: non-finite {name} or eval_train/kl in the "
                        f"last {s.window} evaluations (steps {step0}..{step1}); not judged")
  grew, rose = gap1 - gap0, train1 - train0
  flagged = grew > s.gap_margin and gap1 > 0 and rose <= s.train_margin
  trend = "grew" if grew > 0 else "fell" if grew < 0 else "stayed at"
  train_trend = "rose" if rose > 0 else "fell" if rose < 0 else "stayed at"
  why = (f"level {level}: {name} {trend} {gap0:.1f} → {gap1:.1f} nats over the last {s.window} "
         f"evaluations (steps {step0}..{step1}) while eval_train/kl {train_trend} "
         f"{train0:.1f} → {train1:.1f}")
  if not flagged:
    reasons = []
    if grew <= s.gap_margin:
      reasons.append(f"gap growth {grew:+.1f} <= margin {s.gap_margin:g}")
    elif gap1 <= 0:
      reasons.append("gap ends <= 0")
    if rose > s.train_margin:
      reasons.append(f"train-split rise {rose:+.1f} > margin {s.train_margin:g}")
    why += f" — not flagged ({'; '.join(reasons)})"
  return LevelVerdict(level, flagged, why)


def explain(rows: Sequence[Mapping[str, Any]], num_levels: int,
            s: Settings | None = None) -> dict[int, LevelVerdict]:
  """The verdict on every level, with a one-line reason each.

  Args:
    rows: metrics rows in step order (`hvae.metrics_file.read_metrics`);
      rows without evaluation metrics are ignored.
    num_levels: L; levels 1..L are judged.
    s: the settings (default: the module defaults).

  Returns:
    level -> LevelVerdict. A level is flagged if the KL-gap or the swap-gap signal says so; the
    reason is the flagging signal's (or, if none flags, the KL gap's) sentence.
  """
  s = s or Settings()
  out = {}
  for level in range(1, num_levels + 1):
    verdicts = [v for sig in ("kl", "swap")
                if (v := _judge(level, sig, _series(rows, level, sig), s)) is not None]
    if not verdicts:
      n = len(_series(rows, level, "kl"))
      out[level] = LevelVerdict(level, False, f"level {level}: {n} evaluation(s) logged, "
                                f"{s.window} needed; not judged")
      continue
    out[level] = next((v for v in verdicts if v.flagged), verdicts[0])
  return out


def overfit_levels(rows: Sequence[Mapping[str, Any]], num_levels: int,
                   k: int = DEFAULT_WINDOW, gap_margin: float = DEFAULT_GAP_MARGIN,
                   train_margin: float = DEFAULT_TRAIN_MARGIN) -> dict[int, bool]:
  """Which levels overfit (see the module docstring for the rule).

  Args:
    rows: metrics rows in step order.
    num_levels: L.
    k: the window, in evaluations.
    gap_margin: nats per image a gap signal must grow by over the window.
    train_margin: nats per image eval_train/kl may rise by over the window.

  Returns:
    level (1..L) -> True when flagged.
  """
  s = Settings(window=k, gap_margin=gap_margin, train_margin=train_margin)
  return {l: v.flagged for l, v in explain(rows, num_levels, s).items()}


def markdown(verdicts: Mapping[int, LevelVerdict], s: Settings) -> list[str]:
  """The verdict in Markdown: the flagged levels, then one `verdict/overfit/level_l` line each.

  Args:
    verdicts: level -> LevelVerdict, as from `explain`.
    s: the settings they were judged with.

  Returns:
    Lines of Markdown (no trailing blank line).
  """
  flagged = [l for l, v in verdicts.items() if v.flagged]
  lines = ["Overfitting levels: " + (", ".join(f"**level {l}**" for l in flagged) or "none")
           + f" (window {s.window} evaluations, gap margin {s.gap_margin:g} nats, train margin "
           f"{s.train_margin:g} nats; rule in hvae/verdict.py).", ""]
  return lines + [f"- `verdict/overfit/level_{l}` = {int(v.flagged)} — {v.why}"
                  for l, v in verdicts.items()]


def verdict_metrics(flags: Mapping[int, bool]) -> dict[str, float]:
  """`verdict/overfit/level_{l}` scalars (1.0 flagged, 0.0 not) for a MetricWriter.

  Args:
    flags: level -> flagged, as from `overfit_levels`.

  Returns:
    DESIGN §7 metric name -> 1.0 or 0.0.
  """
  return {f"verdict/overfit/level_{l}": float(bool(f)) for l, f in sorted(flags.items())}
