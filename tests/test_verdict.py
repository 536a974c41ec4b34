"""Tests of hvae/verdict.py's attribution: which part of the gap a flagged level is put down to,
and whether it is material enough to warn about."""

from hvae import verdict


def _rows(level_kl_bpd_gap: float, gap_bpd: float, split: dict | None = None) -> list[dict]:
  """Four evaluations in which level 1's KL gap grows by 3 nats each time (train KL falls)."""
  rows = []
  for i in range(4):
    rows.append({"step": 100 * (i + 1), "eval/bpd": 5.0, "gap/bpd": gap_bpd,
                 "eval/kl/level_1": 10.0 + 2 * i, "eval_train/kl/level_1": 10.0 - i,
                 "eval/kl_bpd/level_1": 0.1 + level_kl_bpd_gap,
                 "eval_train/kl_bpd/level_1": 0.1})
  rows[-1].update(split or {})
  return rows


def test_a_tiny_share_of_the_gap_is_flagged_but_not_material():
  v = verdict.explain(_rows(0.002, 1.4), 1)[1]
  assert v.flagged and not v.material and v.part == verdict.KL
  assert "not material" in v.why and "0 % of the gap" in v.why


def test_a_large_kl_share_is_material():
  v = verdict.explain(_rows(0.5, 1.0), 1)[1]
  assert v.flagged and v.material and v.part_bpd == 0.5 and v.gap_bpd == 1.0


def test_refinement_figures_name_the_encoder_or_the_decoder():
  split = {"gap/refine/bpd": 1.0, "gap/refine/encoder_bpd/level_1": 0.3,
           "gap/refine/decoder_bpd/level_1": 0.05, "eval/mi/level_1": 1.1,
           "eval_train/mi/level_1": 4.0, "eval/mi_max": 4.16}
  v = verdict.explain(_rows(0.002, 1.4, split), 1)[1]
  assert v.part == verdict.ENCODER and v.material
  assert "encoder-overfitting" in v.why and "I(n; z_1) 4.00 nats on the training split" in v.why
  metrics = verdict.part_metrics({1: v})
  assert metrics == {"verdict/material/level_1": 1.0, "verdict/encoder/level_1": 1.0,
                     "verdict/decoder/level_1": 0.0}
  decoder = dict(split, **{"gap/refine/encoder_bpd/level_1": 0.01})
  v = verdict.explain(_rows(0.002, 1.4), 1, split_row=decoder)[1]  # --mode=eval's figures
  assert v.part == verdict.DECODER and not v.material  # 0.05 of 1.0 < 10 %
  s = verdict.Settings(material_share=0.04)
  assert verdict.explain(_rows(0.002, 1.4), 1, s, split_row=decoder)[1].material


def test_settings_read_material_share():
  assert verdict.settings({"verdict": {"material_share": 0.25}}).material_share == 0.25
  assert verdict.settings({}).material_share == verdict.DEFAULT_MATERIAL_SHARE
