"""Sweeps (hvae/sweep_points.py, hvae/sweep.py, hvae/sweep_report.py): expansion, names,
selection, the sweep report, and a two-point sweep of experiments/tiny.py: point 0 through
launch.py's main, then the whole sweep again (point 0 skipped), then its report, all in this
process (the dry run and a bad index run launch.py in processes of their own)."""

import csv
import json
import logging
import os
import pathlib

import pytest
from helpers import ROOT, launch, launch_in_process, load_experiment

from hvae import report, sweep, sweep_points, sweep_report
from hvae.typed_config import ConfigError

_launch = launch  # launch.py in a new process, one device, the suite's compilation cache


def test_names_depend_only_on_the_overrides_not_on_their_order():
  a = {"seed": 1, "model.num_levels": 3, "model.posterior": "top_down"}
  b = dict(reversed(list(a.items())))
  assert sweep_points.point_name(a) == sweep_points.point_name(b) == "L3_post-top_down_seed1"
  assert sweep_points.group_name(a) == "L3_post-top_down"
  assert (sweep_points.point_name({"model.kind": "deterministic", "seed": 0})
          == "deterministic_seed0")
  assert sweep_points.point_name({"loss.kl_weight": (2.0, 1.0, 1.0)}) == "klw2,1,1"
  assert sweep_points.point_name({"seed": 2}) == "baseline_seed2"
  assert sweep_points.group_name({"seed": 2}) == sweep_points.point_name({}) == "baseline"
  assert sweep_points.point_name({"optim.learning_rate": 0.002, "model.context_skips": False}) \
      == "skips-off_lr0.002"
  long = sweep_points.point_name({f"a.k{i}": "x" * 20 for i in range(9)})
  assert len(long) <= sweep_points.MAX_NAME


def test_expand_rejects_clashing_points_and_bad_lists():
  with pytest.raises(sweep_points.SweepError, match="points 0 and 1 have the same name"):
    sweep_points.expand([{"seed": 0, "model.num_levels": 2}, {"model.num_levels": 2, "seed": 0}])
  with pytest.raises(sweep_points.SweepError, match="list of override dicts"):
    sweep_points.expand({"seed": 0})
  with pytest.raises(sweep_points.SweepError, match="point 1"):
    sweep_points.expand([{"seed": 0}, ["seed", 1]])


@pytest.mark.parametrize("experiment,arg,count", [
    ("ablate_levels", "cpu", 6), ("ablate_levels", None, 39), ("ablate_remedies", "cpu", 6),
    ("ablate_remedies", "cpu_dropout", 6), ("ablate_remedies", None, 21),
    ("ablate_remedies", "faces", 10), ("tiny", None, 2)])
def test_shipped_sweeps_expand_to_valid_configs(experiment, arg, count):
  filename = str(ROOT / "experiments" / f"{experiment}.py") + (f":{arg}" if arg else "")
  points = sweep_points.load_points(filename)
  assert len(points) == count
  assert [p.name for p in points] == [p.name for p in sweep_points.load_points(filename)]  # stable
  assert [p.index for p in points] == list(range(count))
  base = load_experiment(experiment, arg)
  base.lock()
  for p in points:
    c = sweep_points.point_config(base, p)  # applies and checks every override
    for key, value in p.overrides.items():
      node = c
      for part in key.split("."):
        node = node[part]
      assert node == value, (p.name, key)
  seeds = {}
  for p in points:
    seeds.setdefault(p.group, set()).add(p.overrides["seed"])
  two = (arg or "").startswith("cpu") or arg == "faces" or experiment == "tiny"
  assert all(len(s) == (2 if two else 3) for s in seeds.values())


def test_ablate_levels_cpu_points_are_pinned():
  names = [p.name for p in sweep_points.load_points(str(ROOT / "experiments/ablate_levels.py:cpu"))]
  assert names[:3] == ["L1_post-bottom_up_seed0", "L3_post-bottom_up_seed0",
                       "deterministic_L3_seed0"]
  assert names[3:] == [n.replace("seed0", "seed1") for n in names[:3]]


def test_ablate_remedies_cpu_points_are_pinned():
  """docs/overfitting.md and docs/results.md name these directories."""
  for arg, remedy in (("cpu", "sigfloor"), ("cpu_dropout", "drop")):
    path = str(ROOT / f"experiments/ablate_remedies.py:{arg}")
    names = [p.name for p in sweep_points.load_points(path)]
    value = "0.1" if remedy == "sigfloor" else "0.3"
    assert names[:3] == ["baseline_seed0", f"{remedy}0,0,{value}_seed0", f"{remedy}{value}_seed0"]
    assert names[3:] == [n.replace("seed0", "seed1") for n in names[:3]]
  with pytest.raises(ValueError, match="unknown argument 'cpu_dropuot'"):
    sweep_points.load_points(str(ROOT / "experiments/ablate_remedies.py:cpu_dropuot"))


def test_overrides_are_applied_to_a_copy_and_bad_keys_are_errors():
  base = load_experiment("tiny")
  base.lock()
  c = sweep_points.apply_overrides(base, {"model.num_levels": 3, "loss.kl_weight": [2.0, 1.0, 1.0],
                                   "seed": 7})
  assert (c.model.num_levels, c.loss.kl_weight, c.seed) == (3, (2.0, 1.0, 1.0), 7)
  assert (base.model.num_levels, base.seed) == (2, 0) and c.is_locked
  with pytest.raises(ConfigError, match="model.widht: no such config key"):
    sweep_points.apply_overrides(base, {"model.widht": 3})
  with pytest.raises(ConfigError, match="modle.width: modle is not a config section"):
    sweep_points.apply_overrides(base, {"modle.width": 3})
  with pytest.raises(ConfigError, match="model.num_levels"):
    sweep_points.apply_overrides(base, {"model.num_levels": "three"})
  point = sweep_points.Point(4, "x", {"loss.kl_weight": (1.0, 1.0, 1.0)})  # tiny has L = 2
  with pytest.raises(ConfigError, match=r"sweep point 4 \(x\): loss.kl_weight"):
    sweep_points.point_config(base, point)


def test_sweep_index_picks_one_point_and_a_bad_index_names_the_range():
  points = sweep_points.expand([{"seed": s} for s in range(3)])
  assert sweep_points.select(points, 2) == [points[2]]
  assert sweep_points.select(points, None) == points
  for bad in (3, -1):
    with pytest.raises(sweep_points.SweepError, match=r"valid indices are 0\.\.2"):
      sweep_points.select(points, bad)


def test_dry_run_and_bad_index_through_launch_without_jax(tmp_path):
  proc = _launch("--config=experiments/tiny.py", "--sweep", "--dry_run",
                 f"--workdir={tmp_path / 's'}", timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert "2 point(s)" in lines[0]
  assert lines[1].split()[:2] == ["0", "baseline_seed0"] and "[not started]" in lines[1]
  assert str(tmp_path / "s" / "baseline_seed1") in lines[2] and '{"seed": 1}' in lines[2]
  proc = _launch("--config=experiments/tiny.py", "--sweep_index=5",
                 f"--workdir={tmp_path / 's'}", timeout=60)
  assert proc.returncode != 0
  assert "--sweep_index=5 is out of range" in proc.stderr
  assert "valid indices are 0..1" in proc.stderr
  assert not (tmp_path / "s").exists()  # nothing written before the check


def _fake_point(d: pathlib.Path, bpds, wall_times, iw=None, flops=1e9, levels=2):
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps(
      {"model": {"kind": "hvae", "num_levels": levels}, "train": {"num_steps": 30,
                                                                   "batch_size": 8}}))
  rows = [{"step": 10 * (i + 1), "eval/bpd": b, "eval_train/bpd": b - 0.1, "gap/bpd": 0.1,
           **{f"{k}/level_{l}": v for l in (1, 2) for k, v in (("eval/kl", l), ("gap/kl", 0.5))}}
          for i, b in enumerate(bpds)]
  rows += [{"step": 10 * (i + 1), "train/wall_time": w} for i, w in enumerate(wall_times)]
  rows.sort(key=lambda r: r["step"])
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "DONE").write_text("")
  if iw is not None:
    (d / "eval").mkdir()
    (d / "eval" / "results.json").write_text(json.dumps(
        {"checkpoint_step": 20, "metrics": {"eval/iw_bpd": iw}}))
  (d / sweep_points.FLOPS_FILE).write_text(json.dumps({"flops_per_step": flops}))


def test_sweep_report_tabulates_points_and_aggregates_seeds(tmp_path):
  points = sweep_points.expand([{"model.num_levels": 2, "seed": 0},
                                {"model.num_levels": 2, "seed": 1},
                                {"model.num_levels": 1, "seed": 0}])
  sweep_points.write_manifest(str(tmp_path), "experiments/x.py", points)
  _fake_point(tmp_path / points[0].name, [5.0, 4.0, 4.5], [10.0, 20.0, 5.0], iw=3.9)
  _fake_point(tmp_path / points[1].name, [5.0, 4.2, 4.7], [10.0, 20.0, 30.0], iw=4.1)
  assert sweep_report.is_sweep_dir(str(tmp_path))
  assert not sweep_report.is_sweep_dir(str(tmp_path / points[0].name))
  out = report.main([str(tmp_path)])[0]
  md = (pathlib.Path(out) / "sweep.md").read_text()
  for p in points:
    assert f"| {p.index} | {p.name} |" in md
  assert "| L2 | `model.num_levels=2` | 2 | 0, 1 | 4.6000 ± 0.1414 | 4.1000 ± 0.1414 | " \
         "4.0000 ± 0.1414 |" in md  # final, best and IW bpd: mean ± sample std
  assert "not started" in md  # point 2 never ran: still a row
  with open(pathlib.Path(out) / "sweep.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [p.name for p in points]
  assert float(rows[0]["eval/bpd_best"]) == 4.0 and rows[0]["eval/bpd_best_step"] == "20"
  assert float(rows[0]["wall_time_s"]) == 25.0  # 20 s, then a restart, then 5 s
  assert rows[0]["override:model.num_levels"] == "2"
  with open(pathlib.Path(out) / "sweep_groups.csv", newline="") as f:
    groups = {r["group"]: r for r in csv.DictReader(f)}
  assert groups["L2"]["n"] == "2" and float(groups["L2"]["eval/iw_bpd_mean"]) == 4.0
  assert {"sweep_bpd.png", "sweep_curves.png", "sweep_levels.png"} <= set(os.listdir(out))


def test_two_point_sweep_end_to_end_skips_the_finished_point(tmp_path, caplog, capsys,
                                                             monkeypatch):
  workdir = tmp_path / "sweep"
  tiny = ROOT / "experiments" / "tiny.py"
  code, stderr = launch_in_process(capsys, monkeypatch, f"--config={tiny}", f"--workdir={workdir}",
                                   "--sweep_index=0")
  assert code == 0, stderr[-4000:]
  first, second = workdir / "baseline_seed0", workdir / "baseline_seed1"
  for name in ("DONE", "config.json", "metrics.jsonl", sweep_points.FLOPS_FILE,
               "eval/results.json"):
    assert (first / name).is_file(), name
  assert not second.exists()
  manifest = json.loads((workdir / sweep_points.MANIFEST).read_text())
  assert [p["name"] for p in manifest["points"]] == [first.name, second.name]
  assert json.loads((first / "config.json").read_text())["seed"] == 0
  assert json.loads((first / sweep_points.FLOPS_FILE).read_text())["flops_per_step"] > 0
  before = (first / "metrics.jsonl").read_text()

  # The whole sweep (what `--sweep` runs), in this process: point 0 is skipped, point 1 trained.
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  sweep.main(str(tiny), load_experiment("tiny"), str(workdir))
  assert "baseline_seed0: done, skipped" in caplog.text
  assert (first / "metrics.jsonl").read_text() == before
  assert (second / "DONE").is_file() and (second / "eval" / "results.json").is_file()
  assert json.loads((second / "config.json").read_text())["seed"] == 1

  code, stderr = launch_in_process(capsys, monkeypatch, "--mode=report", f"--workdir={workdir}")
  assert code == 0, stderr[-4000:]
  md = (workdir / "report" / "sweep.md").read_text()
  assert f"| 0 | {first.name} |" in md and f"| 1 | {second.name} |" in md
  with open(workdir / "report" / "sweep.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["status"] for r in rows] == ["done", "done"]
  assert all(float(r["eval/iw_bpd"]) > 0 and float(r["flops_per_step"]) > 0 for r in rows)
