"""Tests of hvae/verdict.py and hvae/report.py (`launch.py --mode=report`) on synthetic workdirs.

No model is trained here: each workdir is a config.json, a metrics.jsonl with the docs/design.md §7
names and a few PNGs, written by the helpers below. Level 2 of `_hvae_rows` overfits (its held-out
minus train-split KL grows while its train-split KL falls); levels 1 and 3 do not.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hvae import grids, report, verdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
L = 3


def _hvae_rows(num_evals: int = 6, every: int = 100) -> list[dict]:
  rows = []
  for e in range(1, num_evals + 1):
    step = e * every
    rows.append({"step": step - every // 2, "train/bpd": 5.0 - 0.1 * e, "train/loss": 5.0,
                 **{f"train/kl/level_{l}": 30.0 + l for l in range(1, L + 1)}})
    row = {"step": step, "eval/bpd": 5.5, "eval_train/bpd": 5.2, "gap/bpd": 0.3,
           "eval/recon_bpd": 5.0, "eval_train/recon_bpd": 4.8}
    for l in range(1, L + 1):
      if l == 2:  # overfits: train-split KL falls 40 -> 35, the gap grows 3 -> 10.5
        train, gap = 40.0 - e, 1.5 + 1.5 * e
      else:  # healthy: both rise together, the gap stays small
        train, gap = 20.0 + e, 1.0 + 0.1 * e
      row.update({f"eval_train/kl/level_{l}": train, f"eval/kl/level_{l}": train + gap,
                  f"gap/kl/level_{l}": gap, f"eval/kl_bpd/level_{l}": 0.01 * (train + gap),
                  f"eval/kl_per_dim/level_{l}": 0.1, f"eval/kl_p50/level_{l}": train,
                  f"eval/kl_p90/level_{l}": train + 5, f"eval/kl_p99/level_{l}": train + 9,
                  f"eval/kl_max/level_{l}": train + 12})
    rows.append(row)
  return rows


def _write_workdir(path: pathlib.Path, rows: list[dict], *, kind: str = "hvae",
                   done: bool = True, pngs=("step_300.png", "step_600.png", "worst_step_600.png",
                                            "resample_step_300.png")) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  config = {"model": {"kind": kind, "num_levels": L, "latent_channels": [8],
                      "top_latent_dim": 16},
            "data": {"image_size": 64}, "train": {"num_steps": 600}}
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  for i, name in enumerate(pngs):
    grids.save_png(path / "images" / name, np.full((8, 8, 3), 40 * i, np.uint8))
  if done:
    (path / "DONE").write_text("done\n")
  return path


# --- verdict -----------------------------------------------------------------------------------


def _flags(rows, s=None) -> dict[int, bool]:
  return {l: v.flagged for l, v in verdict.explain(rows, L, s).items()}


def test_only_the_level_whose_gap_grows_while_train_kl_falls_is_flagged():
  s = verdict.Settings(window=4, gap_margin=2.0, train_margin=0.5)
  assert _flags(_hvae_rows(), s) == {1: False, 2: True, 3: False}
  why = verdict.explain(_hvae_rows(), L)[2].why
  assert "gap/kl grew 6.0 → 10.5 nats over the last 4 evaluations" in why
  assert "eval_train/kl fell 37.0 → 34.0" in why


def test_a_growing_gap_with_a_rising_train_kl_is_not_overfitting():
  rows = _hvae_rows()
  for row in rows:
    if "eval_train/kl/level_2" in row:  # the level is just being used more
      row["eval_train/kl/level_2"] = 100.0 + row["step"] / 10
  v = verdict.explain(rows, L)[2]
  assert not v.flagged and "train-split rise" in v.why


def test_a_gap_that_grows_but_stays_negative_is_not_flagged():
  rows = _hvae_rows()
  for row in rows:
    if "gap/kl/level_2" in row:
      row["gap/kl/level_2"] -= 50.0
  assert not _flags(rows)[2]


def test_too_few_or_non_finite_evaluations_are_not_judged():
  v = verdict.explain(_hvae_rows(num_evals=3), L, verdict.Settings(window=4))[2]
  assert not v.flagged and "3 evaluation(s) logged, 4 needed" in v.why
  rows = _hvae_rows()
  rows[-1]["gap/kl/level_2"] = None  # a diverged evaluation is written as null
  v = verdict.explain(rows, L)[2]
  assert not v.flagged and "non-finite" in v.why


def test_the_swap_gap_alone_can_flag_a_level():
  rows = _hvae_rows()
  for row in rows:
    if "eval/bpd" in row:
      row["gap/kl/level_1"] = 1.0  # flat KL gap...
      row["eval_train/kl/level_1"] = 20.0  # ...and flat train-split KL
      row["eval_train/swap/level_1"] = 5.0
      row["eval/swap/level_1"] = 5.0 + row["step"] / 100  # ...but the swap gap grows 3 -> 6
  v = verdict.explain(rows, L)[1]
  assert v.flagged and "swap gap grew" in v.why


def test_the_gap_is_computed_when_only_the_splits_are_logged():
  rows = [{k: v for k, v in r.items() if not k.startswith("gap/")} for r in _hvae_rows()]
  assert _flags(rows) == {1: False, 2: True, 3: False}


def test_settings_come_from_the_config_with_defaults():
  assert verdict.settings({}) == verdict.Settings()
  s = verdict.settings({"verdict": {"window": 3, "gap_margin": 0.5}})
  assert (s.window, s.gap_margin, s.train_margin) == (3, 0.5, verdict.DEFAULT_TRAIN_MARGIN)
  with pytest.raises(ValueError, match="verdict.window"):
    verdict.settings({"verdict": {"window": 1}})
  assert verdict.verdict_metrics({1: False, 2: True}) == {
      "verdict/overfit/level_1": 0.0, "verdict/overfit/level_2": 1.0}


# --- report ------------------------------------------------------------------------------------


def test_report_writes_plots_latest_images_and_markdown(tmp_path):
  workdir = _write_workdir(tmp_path / "run", _hvae_rows())
  out = pathlib.Path(report.write_report(str(workdir)))
  assert out == workdir / "report"
  for name in ("bpd.png", "kl.png", "gap.png", "kl_quantiles.png", "report.md"):
    assert (out / name).stat().st_size > 0, name
  assert not (out / "swap.png").exists()  # not logged by this run
  assert sorted(os.listdir(out / "images")) == [
      "resample_step_300.png", "step_600.png", "worst_step_600.png"]
  md = (out / "report.md").read_text()
  assert "Overfitting levels: **level 2**" in md
  assert "`verdict/overfit/level_2` = 1 — level 2: gap/kl grew" in md
  assert "`verdict/overfit/level_1` = 0" in md
  assert "| level | resolution | kl | kl_bpd | kl_per_dim | train-split kl | gap | p50 |" in md
  assert "| 1 | 32×32×8 | 27.60 |" in md and "| 3 | vector (16) |" in md
  assert "last logged step 600 of 600, done" in md
  assert "![step_600.png](images/step_600.png)" in md


def test_report_splits_the_held_out_gap_into_likelihood_and_levels(tmp_path):
  # bpd = recon_bpd + sum of kl_bpd on each split, as the training loop logs them.
  kl = {"eval": (0.1, 0.3, 0.1), "eval_train": (0.05, 0.3, 0.05)}
  recon = {"eval": 5.0, "eval_train": 4.6}
  row = {"step": 100, "gap/bpd": 0.5}
  for split in ("eval", "eval_train"):
    row.update({f"{split}/bpd": recon[split] + sum(kl[split]),
                f"{split}/recon_bpd": recon[split]})
    row.update({f"{split}/kl_bpd/level_{l}": kl[split][l - 1] for l in range(1, L + 1)})
  run = report.load_run(str(_write_workdir(tmp_path / "run", [row], pngs=())))
  parts = report.gap_decomposition(run)
  assert [p[0] for p in parts] == ["recon", "level 1", "level 2", "level 3"]
  np.testing.assert_allclose([p[3] for p in parts], [0.4, 0.05, 0.0, 0.05], atol=1e-12)
  np.testing.assert_allclose(sum(p[3] for p in parts), row["eval/bpd"] - row["eval_train/bpd"])
  md = (pathlib.Path(report.write_report(run.workdir)) / "report.md").read_text()
  assert "| recon | 5.0000 | 4.6000 | +0.4000 | 80.0 % |" in md
  assert "account for +0.1000 bits/dim (20.0 %) of the gap" in md
  assert "| logged `bpd` | 5.5000 | 5.0000 | +0.5000 |  |" in md and "do not add up" not in md
  broken = dict(row, **{"eval/bpd": 5.7})  # a run whose parts miss 0.2 of the logged bpd
  run = report.load_run(str(_write_workdir(tmp_path / "broken", [broken], pngs=())))
  assert "The parts do not add up" in (
      pathlib.Path(report.write_report(run.workdir)) / "report.md").read_text()
  better = dict(row, **{"eval_train/recon_bpd": 5.4, "eval_train/bpd": 5.8})  # negative gap
  run = report.load_run(str(_write_workdir(tmp_path / "negative", [better], pngs=())))
  md = (pathlib.Path(report.write_report(run.workdir)) / "report.md").read_text()
  assert "| recon | 5.0000 | 5.4000 | -0.4000 | — |" in md  # no shares of a negative gap
  del row["eval_train/kl_bpd/level_2"]  # a part missing: no decomposition, no section
  run = report.load_run(str(_write_workdir(tmp_path / "partial", [row], pngs=())))
  assert report.gap_decomposition(run) is None
  assert "Where the held-out gap is" not in (
      pathlib.Path(report.write_report(run.workdir)) / "report.md").read_text()


def test_report_reads_a_run_in_progress_with_a_cut_short_last_line(tmp_path):
  workdir = _write_workdir(tmp_path / "run", _hvae_rows(), done=False, pngs=())
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 650, "train/bpd": 4.')  # a writer mid-append
  md = pathlib.Path(report.write_report(str(workdir)), "report.md").read_text()
  assert "in progress (no DONE)" in md and "**level 2**" in md
  assert "## Latest images" not in md


def test_report_of_a_deterministic_run_has_no_levels(tmp_path):
  rows = [{"step": 50, "train/bpd": 5.0}, {"step": 100, "eval/bpd": 5.5, "eval_train/bpd": 5.1,
                                          "gap/bpd": 0.4, "eval/recon_bpd": 5.5}]
  workdir = _write_workdir(tmp_path / "det", rows, kind="deterministic", pngs=("step_100.png",))
  out = pathlib.Path(report.write_report(str(workdir)))
  md = (out / "report.md").read_text()
  assert "No latent levels" in md and "| eval | 5.5000 | 5.5000 |" in md
  assert sorted(p.name for p in out.glob("*.png")) == ["bpd.png"]


def test_levels_are_inferred_from_metric_names_without_config_json(tmp_path):
  workdir = _write_workdir(tmp_path / "run", _hvae_rows(), pngs=())
  (workdir / "config.json").unlink()
  run = report.load_run(str(workdir))
  assert run.num_levels == L
  assert report.resolution(run, 1) == "32×32" and report.resolution(run, L) == "vector"


def test_several_workdirs_get_their_reports_and_a_comparison(tmp_path):
  a = _write_workdir(tmp_path / "a", _hvae_rows())
  b = _write_workdir(tmp_path / "b", _hvae_rows(num_evals=2), done=False)
  out = report.main([str(a), str(b)])
  assert out == [str(a / "report"), str(b / "report"), str(a / "report" / "compare")]
  compare = a / "report" / "compare"
  for name in ("compare.md", "compare_bpd.png", "compare_kl.png", "compare_gap.png",
               "0_step_600.png", "1_step_600.png"):
    assert (compare / name).is_file(), name
  md = (compare / "compare.md").read_text()
  assert "| a | hvae | 3 |" in md and "| b | hvae | 3 |" in md
  with pytest.raises(FileNotFoundError, match="no such workdir"):
    report.main([str(a), str(tmp_path / "missing")])


def _python(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)


def test_report_imports_neither_jax_nor_tensorflow():
  proc = _python("-c", "import sys; import hvae.report; "
                 "print(sorted({'jax', 'tensorflow', 'clu'} & set(sys.modules)))")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"


def test_launch_report_mode_imports_neither_jax_nor_grain(tmp_path):
  workdir = _write_workdir(tmp_path / "run", _hvae_rows(), pngs=())
  code = ("import runpy, sys\n"
          f"sys.argv = ['launch.py', '--mode=report', '--workdir={workdir}']\n"
          "try:\n  runpy.run_path('launch.py', run_name='__main__')\n"
          "except SystemExit as e:\n  assert not e.code, e.code\n"
          "print(sorted(m for m in ('jax', 'grain', 'tensorflow') if m in sys.modules))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
  assert (workdir / "report" / "report.md").exists()


def test_launch_report_mode_on_two_workdirs(tmp_path):
  a = _write_workdir(tmp_path / "a", _hvae_rows())
  b = _write_workdir(tmp_path / "b", _hvae_rows())
  proc = _python("launch.py", "--mode=report", f"--workdir={a}", f"--workdir={b}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "**level 2**" in (b / "report" / "report.md").read_text()
  assert (a / "report" / "compare" / "compare.md").is_file()
  proc = _python("launch.py", "--mode=train", f"--workdir={a}", f"--workdir={b}")
  assert proc.returncode != 0 and "one --workdir" in proc.stderr


def test_report_title_names_the_experiment_and_the_workdir(tmp_path, monkeypatch):
  workdir = _write_workdir(tmp_path / "runs" / "quickstart_det", _hvae_rows())
  monkeypatch.chdir(tmp_path)
  run = report.load_run("runs/quickstart_det")
  assert report.title(run) == "runs/quickstart_det"  # no run_info.json: the path alone
  (workdir / "run_info.json").write_text(json.dumps({"command": [
      "launch.py", "--config=experiments/quickstart.py:deterministic",
      "--workdir=runs/quickstart_det", "--config.train.num_steps=20"]}))
  assert report.title(run) == "experiments/quickstart.py:deterministic — runs/quickstart_det"
  md = (pathlib.Path(report.write_report("runs/quickstart_det")) / "report.md").read_text()
  assert md.startswith(
      "# Report: experiments/quickstart.py:deterministic — runs/quickstart_det\n")
  assert "Overrides: `--config.train.num_steps=20`" in md
  (workdir / "run_info.json").write_text("{not json")
  assert report.command_of(str(workdir)) == (None, [])
