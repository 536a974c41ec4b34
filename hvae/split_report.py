"""The encoder/decoder split of the held-out gap as Markdown (pure Python, no JAX).

Reads the metrics of hvae/amortisation.py and hvae/memorisation.py from one row (a training
evaluation's metrics.jsonl row, or `--mode=eval --refine_steps=S`'s results) and writes the
tables of `report.md` and of `--mode=eval`'s `split.md`; what each figure means is in
docs/overfitting.md ("Encoder or decoder").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hvae.metric_names import name as metric

KEY = "gap/refine/encoder_bpd"  # a row holding it holds the whole split


def _num(row: Mapping[str, Any], name: str, digits: int = 4, sign: bool = False) -> str:
  v = row.get(name)
  if not isinstance(v, int | float) or not math.isfinite(v):
    return "—"
  return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _share(part, gap) -> str:
  ok = all(isinstance(v, int | float) and math.isfinite(v) for v in (part, gap))
  return f"{100 * part / gap:.0f} %" if ok and gap > 0 else "—"


def _table(header, rows) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(row: Mapping[str, Any], num_levels: int, title: str = "") -> list[str]:
  """The split's tables (lines of Markdown), or [] when `row` holds no split.

  Args:
    row: metrics by name (`eval/refine/...`, `eval_train/refine/...`, `gap/refine/...`, and
      `{split}/mi/level_l`, `{split}/mi_max` when logged).
    num_levels: L.
    title: a heading line (default: none).
  """
  if KEY not in row:
    return []
  lines = [title, ""] if title else []
  gap = row.get("gap/refine/bpd")
  splits = (("held-out", "eval"), ("training split", "eval_train"))
  lines += _table(
      ["split", "bpd (encoder)", "bpd (refined)", "recovered (bpd)", "recovered (nats/image)",
       "recovered, fitted noise (bpd)"],
      [[name, _num(row, f"{s}/refine/bpd_before"), _num(row, f"{s}/refine/bpd_after"),
        _num(row, f"{s}/refine/recovered_bpd"), _num(row, f"{s}/refine/recovered", 2),
        _num(row, f"{s}/refine/recovered_bpd_fit")] for name, s in splits]) + [""]
  enc, dec = row.get("gap/refine/encoder_bpd"), row.get("gap/refine/decoder_bpd")
  lines += _table(["part of the held-out gap", "bits/dim", "share"], [
      ["held-out gap on these examples", _num(row, "gap/refine/bpd", sign=True), ""],
      ["**encoder** (recovered held-out − training split)",
       _num(row, "gap/refine/encoder_bpd", sign=True), _share(enc, gap)],
      ["**decoder/prior** (the gap after refinement)",
       _num(row, "gap/refine/decoder_bpd", sign=True), _share(dec, gap)],
      ["  of which the likelihood", _num(row, "gap/refine/decoder_bpd/recon", sign=True),
       _share(row.get("gap/refine/decoder_bpd/recon"), gap)]]
      + [[f"  of which level {l}'s KL", _num(row, metric("gap/refine/decoder_bpd", level=l),
                                             sign=True),
          _share(row.get(metric("gap/refine/decoder_bpd", level=l)), gap)]
         for l in range(1, num_levels + 1)]
      + [["encoder part on the fitted noise (optimistic; for comparison)",
          _num(row, "gap/refine/encoder_bpd_fit", sign=True),
          _share(row.get("gap/refine/encoder_bpd_fit"), gap)]]) + [""]
  has_mi = "eval/mi_max" in row
  header = ["level", "recovered alone held-out (nats)", "… training split (nats)",
            "encoder part (bpd)", "decoder/prior part (bpd)", "KL after, held-out / train"]
  if has_mi:
    header += [f"I(n; z_l) held-out / train (log N = {_num(row, 'eval/mi_max', 2)})",
               "marginal KL held-out / train"]
  rows = []
  for l in range(1, num_levels + 1):
    r = [str(l), _num(row, metric("eval/refine/recovered", level=l), 2),
         _num(row, metric("eval_train/refine/recovered", level=l), 2),
         _num(row, metric("gap/refine/encoder_bpd", level=l), sign=True),
         _num(row, metric("gap/refine/decoder_bpd", level=l), sign=True),
         f"{_num(row, metric('eval/refine/kl_after', level=l), 2)} / "
         f"{_num(row, metric('eval_train/refine/kl_after', level=l), 2)}"]
    if has_mi:
      r += [f"{_num(row, metric('eval/mi', level=l), 2)} / "
            f"{_num(row, metric('eval_train/mi', level=l), 2)}",
            f"{_num(row, metric('eval/marginal_kl', level=l), 2)} / "
            f"{_num(row, metric('eval_train/marginal_kl', level=l), 2)}"]
    rows.append(r)
  lines += _table(header, rows) + [""]
  lines += ["Encoder part: what refining the posterior per example (decoder and prior frozen) "
            "wins back on held-out examples minus on training-split ones; decoder/prior part: "
            "the gap left after refinement (the likelihood's and each level's KL, exactly). "
            "Per level, the encoder part refines that level alone (the parts need not add up "
            "to the joint one). Every bpd is scored on the evaluation's own noise, which the "
            "refinement did not fit ('fitted noise': on the draws it did). I(n; z_l) <= log N; "
            "near log N on the training split only = the level tells training examples apart "
            "(memorises). docs/overfitting.md 'Encoder or decoder'.", ""]
  return lines
