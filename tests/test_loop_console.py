"""The training loop's console: one short line per evaluation, clu's progress line (steps/s,
ETA), every metric in the files and the config in TensorBoard's hparams tab.

A few steps of experiments/tiny.py on a folder of six generated PNGs (so the held-out split is
smaller than `eval.num_worst`, which the worst-examples grid must survive).
"""

import logging

import numpy as np
from helpers import load_experiment
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from hvae import loop
from hvae.writers import read_metrics


def test_tiny_folder_run_prints_summaries_and_keeps_every_metric_in_files(tmp_path, monkeypatch,
                                                                           caplog):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (72, 80, 3), np.uint8)).save(photos / f"P{i}_0001.png")
  config = load_experiment("tiny")
  config.data.source = "folder"
  config.data.path = str(photos)
  config.data.validation_fraction = 0.2
  config.train.num_steps = 3  # one evaluation, at step 3
  workdir = tmp_path / "run"
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")  # absl's own level
  loop.train_and_evaluate(config, str(workdir))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval step ")]
  assert [line.split(":")[0] for line in lines] == ["eval step 3"]
  for line in lines:
    assert "bpd " in line and "train-split " in line and "gap " in line
    assert "held-out KL L1 " in line and " L2 " in line and "verdict: " in line
  assert "kl_p99" not in caplog.text and "active_units" not in caplog.text  # files only
  # clu's ReportProgress at the logging step and at the last: steps/s, share done, ETA.
  progress = [r.getMessage() for r in caplog.records if "ETA: " in r.getMessage()]
  assert [line.split("% ")[1].split(",")[0] for line in progress] == ["(2/3)", "(3/3)"]
  assert all(" steps/s" in line for line in progress)
  assert "preparing 6 images" in caplog.text and "folder source: done in" in caplog.text
  rows = [r for r in read_metrics(str(workdir)) if "eval/bpd" in r]
  assert len(rows) == 1 and "eval/kl_p99/level_1" in rows[-1] and "gap/kl/level_2" in rows[-1]
  names = {p.name for p in (workdir / "images").glob("*.png")}
  assert {"worst_step_3.png", "resample_step_3.png"} <= names
  assert not list(photos.glob(".*"))  # nothing written into the photo folder
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  events.Reload()
  assert "_hparams_/session_start_info" in events.Tags()["tensors"]  # writer.write_hparams
