"""Tests of hvae/split_report.py and the report's encoder/decoder section (no model trained)."""

import json
import pathlib

from hvae import report, split_report


def _split_row(step: int) -> dict:
  """The metrics of hvae/amortisation.py for a 1-level run, level 1 overfitting in its encoder."""
  row = {"step": step, "gap/refine/bpd": 0.5, "gap/refine/encoder_bpd": 0.3,
         "gap/refine/decoder_bpd": 0.2, "gap/refine/decoder_bpd/recon": 0.15,
         "gap/refine/decoder_bpd/level_1": 0.05, "gap/refine/encoder_bpd/level_1": 0.25,
         "gap/refine/encoder/level_1": 40.0, "eval/mi_max": 4.16}
  for split, recovered in (("eval", 0.4), ("eval_train", 0.1)):
    row.update({f"{split}/refine/bpd_before": 5.0, f"{split}/refine/bpd_after": 5.0 - recovered,
                f"{split}/refine/recovered_bpd": recovered, f"{split}/refine/recovered": 100.0,
                f"{split}/refine/recovered/level_1": 80.0, f"{split}/refine/kl_after/level_1": 9.0,
                f"{split}/mi/level_1": 1.0 if split == "eval" else 4.1,
                f"{split}/marginal_kl/level_1": 2.0, f"{split}/mi_max": 4.16})
  return row


def _rows() -> list[dict]:
  """Four evaluations; level 1's KL gap grows while its train-split KL falls (flagged)."""
  return [{"step": 100 * (i + 1), "eval/bpd": 5.0, "eval_train/bpd": 4.5, "gap/bpd": 0.5,
           "eval/recon_bpd": 4.9, "eval_train/recon_bpd": 4.45,
           "eval/kl/level_1": 10.0 + 2 * i, "eval_train/kl/level_1": 10.0 - i,
           "gap/kl/level_1": 3.0 * i, "eval/kl_bpd/level_1": 0.1,
           "eval_train/kl_bpd/level_1": 0.05} for i in range(4)]


def test_markdown_is_empty_without_a_split_and_shows_each_part_with_one():
  assert split_report.markdown({"eval/bpd": 5.0}, 1) == []
  text = "\n".join(split_report.markdown(_split_row(400), 1))
  assert "| **encoder** (recovered held-out − training split) | +0.3000 | 60 % |" in text
  assert "| **decoder/prior** (the gap after refinement) | +0.2000 | 40 % |" in text
  assert "1.00 / 4.10" in text  # I(n; z_1) held-out / training split
  assert "| encoder part on the fitted noise (optimistic; for comparison) | — | — |" in text


def test_report_uses_the_split_of_mode_eval_when_training_did_not_log_one(tmp_path):
  workdir = pathlib.Path(tmp_path) / "run"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"model": {"kind": "hvae", "num_levels": 1}}))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
  (workdir / "eval" / "metrics.jsonl").write_text(json.dumps(_split_row(300)) + "\n")
  md = (pathlib.Path(report.write_report(str(workdir))) / "report.md").read_text()
  assert "## Encoder or decoder: the held-out gap split by refinement (`--mode=eval" in md
  assert "encoder-overfitting: encoder part +0.2500, decoder/prior part +0.0500" in md
  assert "50 % of the gap, material" in md
