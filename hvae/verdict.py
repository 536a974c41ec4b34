"""Which levels overfit: the `verdict/overfit/level_{l}` rule of docs/design.md §7, on metrics rows.

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

**Which part, and does it matter.** A flagged level is then attributed (`attribute`) with the
newest figures that split the held-out gap: with the amortisation split logged
(hvae/amortisation.py, `eval.refine_steps` > 0 or `--mode=eval --refine_steps=S`), to the
**encoder** (`gap/refine/encoder_bpd/level_l`: what refining level l's posterior wins back on
held-out examples and not on training ones) or to the **decoder/prior**
(`gap/refine/decoder_bpd/level_l`: level l's KL gap left after refinement), whichever is
larger, with the memorisation signal I(n; z_l) of both splits (hvae/memorisation.py) when
logged; without it, to the level's **KL** part of the gap (`eval/kl_bpd/level_l -
eval_train/kl_bpd/level_l`). The console warns only when that part is **material**: at least
`material_share` (default 0.1) of the held-out gap in bits/dim (`gap/refine/bpd` on the refined
examples, else `gap/bpd`), and the gap is positive. A flagged level below that is logged, not
warned about: a trend of 0.002 bits/dim on a 1.4 bits/dim gap is real but not what to fix.

Settings come from the optional config section `verdict` (`window`, `gap_margin`,
`train_margin`, `material_share`); `settings(config)` fills in the defaults below for keys it
lacks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hvae.metric_names import EVAL, EVAL_TRAIN, GAP, VERDICT
from hvae.metric_names import name as metric

DEFAULT_WINDOW = 4  # evaluations the trend is measured over (first vs last of them)
DEFAULT_GAP_MARGIN = 2.0  # nats per image the gap must grow by
DEFAULT_TRAIN_MARGIN = 0.5  # nats per image eval_train/kl may rise by and still count as "not"
DEFAULT_MATERIAL_SHARE = 0.1  # the flagged part's share of the held-out gap that warrants a warning
ENCODER, DECODER, KL = "encoder", "decoder/prior", "KL"  # the parts a level's gap is put down to


@dataclasses.dataclass(frozen=True)
class Settings:
  """The verdict's knobs; see the module docstring."""

  window: int = DEFAULT_WINDOW
  gap_margin: float = DEFAULT_GAP_MARGIN
  train_margin: float = DEFAULT_TRAIN_MARGIN
  material_share: float = DEFAULT_MATERIAL_SHARE


@dataclasses.dataclass(frozen=True)
class LevelVerdict:
  """The verdict on one level and the sentence that explains it.

  `part` (ENCODER, DECODER or KL; "" when nothing splits the gap yet), `part_bpd` and `gap_bpd`
  are the attribution of `attribute`; `material` is True for a flagged level whose part is at
  least `material_share` of a positive gap: the only case the console warns about.
  """

  level: int
  flagged: bool
  why: str
  part: str = ""
  part_bpd: float | None = None
  gap_bpd: float | None = None
  material: bool = False


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
               train_margin=float(section.get("train_margin", DEFAULT_TRAIN_MARGIN)),
               material_share=float(section.get("material_share", DEFAULT_MATERIAL_SHARE)))
  if s.window < 2:
    raise ValueError(f"verdict.window: must be >= 2 evaluations, got {s.window}")
  return s


def _finite(value) -> bool:
  return value is not None and math.isfinite(value)


def _series(rows: Sequence[Mapping[str, Any]], level: int, signal: str) -> list[tuple]:
  """(step, gap, train_kl) at every evaluation logging the gap `signal` ("kl" or "swap").

  The gap is `gap/{signal}/level_l` where logged, else `eval/…` minus `eval_train/…`.
  """
  gap_name, held_name, train_name = (metric(split, signal, level=level)
                                     for split in (GAP, EVAL, EVAL_TRAIN))
  out = []
  for row in rows:
    if gap_name in row:
      gap = row[gap_name]
    elif held_name in row and train_name in row:
      held, train = row[held_name], row[train_name]
      gap = held - train if _finite(held) and _finite(train) else None
    else:
      continue
    out.append((row["step"], gap, row.get(metric(EVAL_TRAIN, "kl", level=level))))
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


def _newest(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Mapping[str, Any] | None:
  """The newest row holding every name in `names` with a finite value."""
  return next((r for r in reversed(rows) if all(_finite(r.get(n)) for n in names)), None)


def attribute(rows: Sequence[Mapping[str, Any]], level: int,
              split_row: Mapping[str, Any] | None = None) -> tuple[str, float, float, str] | None:
  """The part of the held-out gap level `level` is put down to (module docstring).

  Args:
    rows: metrics rows in step order.
    level: the level.
    split_row: figures of the amortisation split to use instead of the rows' (e.g. the
      metrics of `--mode=eval --refine_steps=S`, which go to WORKDIR/eval).

  Returns:
    (part: ENCODER, DECODER or KL, its bits/dim, the held-out gap in bits/dim, a sentence with
    the figures), or None when no row splits the gap.
  """
  enc = metric("gap/refine/encoder_bpd", level=level)
  dec = metric("gap/refine/decoder_bpd", level=level)
  names = (enc, dec, "gap/refine/bpd")
  row = split_row if split_row is not None and all(_finite(split_row.get(n)) for n in names) \
      else _newest(rows, names)
  if row is not None:
    part, value = (ENCODER, row[enc]) if row[enc] >= row[dec] else (DECODER, row[dec])
    gap = row["gap/refine/bpd"]
    text = (f"encoder part {row[enc]:+.4f}, decoder/prior part {row[dec]:+.4f} bits/dim of the "
            f"held-out gap {gap:+.4f} on the refined examples (step {row.get('step', '?')})")
    mi = [metric("eval_train/mi", level=level), metric("eval/mi", level=level), "eval/mi_max"]
    if all(_finite(row.get(n)) for n in mi):
      text += (f"; I(n; z_{level}) {row[mi[0]]:.2f} nats on the training split, "
               f"{row[mi[1]]:.2f} held-out (log N = {row[mi[2]]:.2f})")
    return part, value, gap, text
  held, train = metric("eval/kl_bpd", level=level), metric("eval_train/kl_bpd", level=level)
  row = _newest(rows, (held, train, "gap/bpd"))
  if row is None:
    return None
  value, gap = row[held] - row[train], row["gap/bpd"]
  return KL, value, gap, (f"its KL part {value:+.4f} bits/dim of the held-out gap {gap:+.4f} "
                          f"(step {row.get('step', '?')}; no refinement logged)")


def _with_part(v: LevelVerdict, rows, split_row, s: Settings) -> LevelVerdict:
  found = attribute(rows, v.level, split_row)
  if found is None:
    return v
  part, value, gap, text = found
  material = v.flagged and gap > 0 and value >= s.material_share * gap
  why = v.why
  if v.flagged:
    share = f"{100 * value / gap:.0f} %" if gap > 0 else "gap <= 0"
    why += (f" — {part}-overfitting: {text}; {share} of the gap, "
            f"{'material' if material else 'not material'} (threshold "
            f"{100 * s.material_share:g} %)")
  return dataclasses.replace(v, why=why, part=part, part_bpd=value, gap_bpd=gap,
                             material=material)


def explain(rows: Sequence[Mapping[str, Any]], num_levels: int,
            s: Settings | None = None,
            split_row: Mapping[str, Any] | None = None) -> dict[int, LevelVerdict]:
  """The verdict on every level, with a one-line reason each.

  Args:
    rows: metrics rows in step order (`hvae.metrics_file.read_metrics`);
      rows without evaluation metrics are ignored.
    num_levels: L; levels 1..L are judged.
    s: the settings (default: the module defaults).
    split_row: amortisation-split figures to attribute with (`attribute`); default: the rows'.

  Returns:
    level -> LevelVerdict. A level is flagged if the KL-gap or the swap-gap signal says so; the
    reason is the flagging signal's (or, if none flags, the KL gap's) sentence, and for a
    flagged level the part it is put down to and whether that part is material.
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
    out[level] = _with_part(next((v for v in verdicts if v.flagged), verdicts[0]), rows,
                            split_row, s)
  return out


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
           f"{s.train_margin:g} nats; a flagged level's part is material from "
           f"{100 * s.material_share:g} % of the held-out gap; rule in hvae/verdict.py).", ""]
  return lines + [f"- `verdict/overfit/level_{l}` = {int(v.flagged)} — {v.why}"
                  for l, v in verdicts.items()]


def verdict_metrics(flags: Mapping[int, bool]) -> dict[str, float]:
  """`verdict/overfit/level_{l}` scalars (1.0 flagged, 0.0 not) for a MetricWriter.

  Args:
    flags: level -> flagged (`LevelVerdict.flagged` of `explain`).

  Returns:
    docs/design.md §7 metric name -> 1.0 or 0.0.
  """
  return {metric(VERDICT, "overfit", level=l): float(bool(f)) for l, f in sorted(flags.items())}


def part_metrics(verdicts: Mapping[int, LevelVerdict]) -> dict[str, float]:
  """`verdict/material/level_l` for every level, and `verdict/encoder/level_l`,
  `verdict/decoder/level_l` (1.0 = flagged and put down to that part) where the amortisation
  split attributed it."""
  out = {}
  for l, v in sorted(verdicts.items()):
    out[metric("verdict/material", level=l)] = float(v.material)
    if v.part in (ENCODER, DECODER):
      out[metric("verdict/encoder", level=l)] = float(v.flagged and v.part == ENCODER)
      out[metric("verdict/decoder", level=l)] = float(v.flagged and v.part == DECODER)
  return out
