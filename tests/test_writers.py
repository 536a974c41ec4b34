"""Tests for hvae/writers.py: TensorBoard and metrics.jsonl agree; crash and resume handling."""

import glob
import json
import logging
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from hvae import atomic
from hvae.console import eval_summary
from hvae.writers import MetricWriter, periodic_actions, read_metrics


def _tensorboard_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of every scalar summary in workdir's event files."""
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    events = acc.Tensors(tag)
    if tensor_util.make_ndarray(events[0].tensor_proto).ndim == 0:
      out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events}
  return out


def test_scalars_land_in_tensorboard_and_jsonl(tmp_path):
  workdir = str(tmp_path)
  with MetricWriter(workdir, process_index=0) as writer:
    writer.write_scalars(1, {"train/loss": 2.5, "train/kl/level_1": np.float32(0.25)})
    writer.write_scalars(2, {"train/loss": jnp.asarray(1.5), "train/kl/level_1": 0.125})
    # Readers see rows before close (a run in progress).
    assert [row["step"] for row in read_metrics(workdir)] == [1, 2]
  rows = read_metrics(workdir)
  assert rows == [{"step": 1, "train/loss": 2.5, "train/kl/level_1": 0.25},
                  {"step": 2, "train/loss": 1.5, "train/kl/level_1": 0.125}]
  assert all(type(v) in (int, float) for row in rows for v in row.values())
  tb = _tensorboard_scalars(workdir)
  from_jsonl = {}
  for row in rows:
    for name, value in row.items():
      if name != "step":
        from_jsonl.setdefault(name, {})[row["step"]] = value
  assert tb == from_jsonl


def test_non_finite_written_as_null(tmp_path):
  with MetricWriter(str(tmp_path), process_index=0) as writer:
    writer.write_scalars(3, {"eval/bpd": float("nan"), "train/grad_norm": np.inf, "ok": 1.0})
  with open(tmp_path / "metrics.jsonl") as f:
    line = f.read()
  assert "NaN" not in line and "Infinity" not in line
  assert json.loads(line) == {"step": 3, "eval/bpd": None, "train/grad_norm": None, "ok": 1.0}
  assert math.isnan(_tensorboard_scalars(str(tmp_path))["eval/bpd"][3])


def test_truncated_last_line_is_skipped_and_repaired(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a')
  assert read_metrics(str(tmp_path)) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
  # Appending after the partial line must not glue the next row onto it.
  with MetricWriter(str(tmp_path), process_index=0) as writer:
    writer.write_scalars(3, {"a": 3.0})
  assert [row["step"] for row in read_metrics(str(tmp_path))] == [1, 2, 3]
  assert path.read_text().count("\n") == 3


def test_resume_step_drops_later_rows(tmp_path):
  with MetricWriter(str(tmp_path), process_index=0) as writer:
    for step in range(1, 6):
      writer.write_scalars(step * 10, {"a": float(step)})
  # The crashed run logged up to step 50 but its last checkpoint was step 30.
  with MetricWriter(str(tmp_path), process_index=0, resume_step=30) as writer:
    assert [row["step"] for row in read_metrics(str(tmp_path))] == [10, 20, 30]
    writer.write_scalars(40, {"a": 40.0})
  rows = read_metrics(str(tmp_path))
  assert [row["step"] for row in rows] == [10, 20, 30, 40]
  assert rows[-1]["a"] == 40.0
  assert not glob.glob(str(tmp_path / "metrics.jsonl.tmp*"))


def test_replace_step_rewrites_that_step_s_row(tmp_path):
  """A re-run of an evaluation at the same checkpoint step replaces its row, keeps the others."""
  for value in (1.0, 2.0):
    for step in (500, 1000):  # e.g. eval of the best (500), then of the latest (1000)
      with MetricWriter(str(tmp_path), process_index=0, replace_step=step) as writer:
        writer.write_scalars(step, {"eval/bpd": value + step})
  rows = read_metrics(str(tmp_path))
  assert [(row["step"], row["eval/bpd"]) for row in rows] == [(500, 502.0), (1000, 1002.0)]
  image = np.zeros((8, 8, 3), np.uint8)
  image[..., 0] = 255
  with MetricWriter(str(tmp_path), process_index=0) as writer:
    writer.write_images(5, {"samples": image, "grid": np.stack([image, image]).astype(float)})
    writer.write_hparams({"seed": 0, "optim": {"learning_rate": 1e-3, "name": "adamw"},
                          "model": {"latent_channels": (2, 4)}})
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(1, {"step": 1.0})
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  acc.Reload()
  assert {"samples", "grid"} <= set(acc.Tags()["tensors"])
  assert acc.Tensors("samples")[0].step == 5
  assert "_hparams_/session_start_info" in acc.Tags()["tensors"]


def test_non_zero_process_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricWriter(str(workdir), process_index=1) as writer:
    writer.write_scalars(1, {"a": 1.0})
    writer.write_images(1, {"x": np.zeros((4, 4, 3), np.uint8)})
    writer.write_hparams({"seed": 0})
  assert not os.path.exists(workdir)
  assert read_metrics(str(workdir)) == []


def test_metrics_go_to_files_not_the_console(tmp_path, caplog):
  caplog.set_level(logging.DEBUG)
  with MetricWriter(str(tmp_path), process_index=0) as writer:
    writer.write_scalars(7, {"train/loss": 2.5, "eval/kl_p99/level_1": 3.0})
    writer.write_images(7, {"fill_ins": np.zeros((4, 4, 3), np.uint8)})
  assert "train/loss" not in caplog.text and "kl_p99" not in caplog.text
  assert "Got images" not in caplog.text
  assert read_metrics(str(tmp_path)) == [
      {"step": 7, "train/loss": 2.5, "eval/kl_p99/level_1": 3.0}]
  assert set(_tensorboard_scalars(str(tmp_path))) == {"train/loss", "eval/kl_p99/level_1"}


def test_eval_summary_is_one_short_line():
  metrics = {"eval/bpd": 6.13912, "eval_train/bpd": 5.30111, "gap/bpd": 0.83801,
             "eval/kl/level_1": 12.3456, "eval/kl/level_2": 4.5678, "eval/kl/level_3": 0.78,
             "eval_train/kl/level_1": 11.0, "eval/kl_p99/level_1": 40.0,
             "eval/active_units/level_1": 1, "gap/kl/level_1": 1.3, "eval/wall_time": 5.2}
  line = eval_summary(500, metrics, [3], 5.21)
  assert line == ("eval step 500: bpd 6.139 (train-split 5.301, gap 0.838)  held-out KL L1 12.3 "
                  "L2 4.57 L3 0.78  verdict: level 3 overfits  (5.2 s)")
  assert "\n" not in line and len(line) < 150
  assert "verdict: levels 1, 3 overfit" in eval_summary(1, metrics, [3, 1])
  assert "verdict: no level overfits" in eval_summary(1, metrics, [])
  deterministic = eval_summary(9, {"eval/bpd": float("nan"), "eval_train/bpd": 5.0})
  assert deterministic == "eval step 9: bpd nan (train-split 5.000)"


def test_atomic_json_writes_replace_the_file_and_leave_no_temporary(tmp_path):
  path = tmp_path / "results.json"
  path.write_text("old")
  atomic.write_json(str(path), {"a": math.nan, "b": [1.0, math.inf]}, strict=True)
  assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None]}
  atomic.write_json(str(path), {"b": 1, "a": (2,)}, indent=2, sort_keys=True)
  assert path.read_text() == json.dumps({"a": [2], "b": 1}, indent=2, sort_keys=True)
  with pytest.raises(TypeError):  # a value JSON cannot encode: the old file stays whole
    atomic.write_json(str(path), {"x": object()})
  assert json.loads(path.read_text()) == {"a": [2], "b": 1}
  assert os.listdir(tmp_path) == ["results.json"]


def test_periodic_actions_report_progress_and_trace_a_few_steps(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  actions = periodic_actions(20, 5, 0, profile_dir=str(tmp_path))
  assert len(actions) == 2  # ReportProgress, Profile
  x = jnp.ones(4)
  for step in range(1, 21):
    x = x * 1.0001  # something for the trace to hold
    for action in actions:
      action(step)
  x.block_until_ready()
  assert "(20/20)" in caplog.text and "ETA" in caplog.text
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
  # A run too short to reach the traced steps gets no trace, and says so.
  assert len(periodic_actions(8, 5, 0, profile_dir=str(tmp_path / "short"))) == 1
  assert "before steps 5..10 can be traced" in caplog.text
  # A process other than 0 reports nothing (process 0's line would repeat) and times as well.
  caplog.clear()
  (silent,) = periodic_actions(20, 5, 0, primary=False)
  with silent.timed("eval", wait_jax_async_dispatch=False):
    for step in range(1, 21):
      silent(step)
  assert "ETA" not in caplog.text
