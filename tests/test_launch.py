"""End-to-end tests of launch.py / hvae.loop on experiments/tiny.py (synthetic data).

One tiny trained workdir is shared by the file-layout tests; the resume test compares against
the suite's uninterrupted run (conftest's `tiny_straight`); the preemption test makes its own.
Every run is a few steps of a model with a few thousand parameters. A new process is started
only where one is the point (the real entry point's first run, a SIGTERM), with the suite's
compilation cache; command lines that fail or do nothing, and the resume after the SIGTERM, run
in this process.
"""

import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
  JAX_CACHE,
  ROOT,
  launch,
  launch_in_process,
  load_experiment,
  subprocess_env,
  tiny_run_config,
)

from hvae import config_file, loop
from hvae.writers import read_metrics

TINY = f"--config={ROOT / 'experiments' / 'tiny.py'}"


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  launch("--config=experiments/tiny.py", f"--workdir={workdir}", check=True)
  return workdir


def test_end_to_end_writes_every_file_of_the_contract(tiny_workdir):
  w = tiny_workdir
  for name in ("config.json", "run_info.json", "metrics.jsonl", "DONE"):
    assert (w / name).is_file(), name
  assert list(w.glob("events.out.tfevents*"))
  pngs = {p.name for p in (w / "images").glob("*.png")}
  for step in (3, 6):  # the fill-in grid and the per-level diagnostics of every evaluation
    for prefix in ("", "worst_", "resample_", "kl_heatmap_"):
      assert f"{prefix}step_{step}.png" in pngs
  assert {p.name for p in (w / "checkpoints").iterdir()} >= {"3", "6"}
  info = json.loads((w / "run_info.json").read_text())
  assert {"command", "git_commit", "git_dirty", "packages", "devices", "start_time"} <= set(info)


def test_config_json_loads_back_to_the_same_config(tiny_workdir):
  loaded = config_file.load_config(str(tiny_workdir / "config.json"))
  assert loaded.to_dict() == load_experiment("tiny").to_dict()  # tuples stay tuples
  assert loaded.is_locked  # a misspelt key is still an error after loading


def test_every_level_is_logged_on_both_evaluation_splits(tiny_workdir):
  rows = read_metrics(str(tiny_workdir))
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), "one metrics.jsonl row per logged step"
  names = set().union(*rows)
  for split in ("train", "eval", "eval_train"):
    for name in ("bpd", "recon_bpd"):
      assert f"{split}/{name}" in names
    for level in (1, 2):
      for kind in ("kl", "kl_bpd", "kl_per_dim"):
        assert f"{split}/{kind}/level_{level}" in names
  for level in (1, 2):
    assert f"gap/kl/level_{level}" in names
  for r in rows:
    for split in ("eval", "eval_train"):
      if f"{split}/bpd" in r:
        parts = r[f"{split}/recon_bpd"] + sum(r[f"{split}/kl_bpd/level_{l}"] for l in (1, 2))
        assert parts == pytest.approx(r[f"{split}/bpd"], rel=1e-5)


def test_running_again_on_a_finished_workdir_does_nothing(tiny_workdir, capsys, monkeypatch):
  before = (tiny_workdir / "metrics.jsonl").read_text()
  code, stderr = launch_in_process(capsys, monkeypatch, TINY, f"--workdir={tiny_workdir}")
  assert code == 0, stderr[-2000:]
  assert (tiny_workdir / "metrics.jsonl").read_text() == before


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_straight):
  """A run of 3 steps, raised to 6 and run again, trains steps 4-6 as the uninterrupted run of 6
  (conftest's `tiny_straight`, the same config) did."""
  loop.train_and_evaluate(tiny_run_config(3), str(tmp_path / "resumed"))
  assert (tmp_path / "resumed" / "DONE").exists()
  loop.train_and_evaluate(tiny_run_config(6), str(tmp_path / "resumed"))
  straight = tiny_straight[0]
  resumed = {r["step"]: r["train/loss"]
             for r in read_metrics(str(tmp_path / "resumed")) if "train/loss" in r}
  assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    np.testing.assert_allclose(resumed[step], straight[step], rtol=1e-5)


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes(tmp_path, caplog):
  workdir = tmp_path / "preempted"
  env = subprocess_env()
  args = [sys.executable, "launch.py", "--config=experiments/tiny.py", f"--workdir={workdir}",
          f"--jax_cache={JAX_CACHE}", "--config.train.num_steps=100000",
          "--config.train.log_every_steps=1",
          "--config.eval.every_steps=100000", "--config.train.checkpoint_every_steps=100000"]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline:
    rows = read_metrics(str(workdir)) if (workdir / "metrics.jsonl").exists() else []
    if any(r.get("step", 0) >= 3 for r in rows):
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps and not (workdir / "DONE").exists()
  stopped = max(steps)
  # The same command again (its config, in this process): it resumes from the saved step. Two
  # steps more; the cosine keeps the preempted run's length (optim.schedule_steps), so the step
  # compiled is the same wherever the signal landed (and found in the compilation cache).
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  config = load_experiment("tiny")
  config.train.num_steps, config.train.log_every_steps = stopped + 2, 1
  config.optim.schedule_steps = 100000
  loop.train_and_evaluate(config, str(workdir))
  assert f"Resumed from step {stopped}" in caplog.text
  assert (workdir / "DONE").exists()


@pytest.mark.parametrize("args,message,code", [
    # flag parsing (absl) exits 1; hvae's own user errors (hvae/errors.py) exit 2
    ([TINY, "--config.model.widht=3"], "widht", 1),
    ([TINY, "--config.loss.kl_weight=(1.0,2.0,3.0)"], "launch.py: error: loss.kl_weight", 2),
    ([f"--config={ROOT / 'experiments' / 'no_such_file.py'}"], "no_such_file", 1),
    ([TINY, "--config.model.num_levels=9"], "launch.py: error: model.num_levels", 2),
    ([TINY, "--sweep_index=2"],
     "launch.py: error: --sweep_index=2 is out of range: this sweep has 2 points", 2),
    ([TINY, "--config.data.source=folder", "--config.data.path=/no/such/folder"],
     "launch.py: error:", 2),
])
def test_bad_command_lines_fail_with_a_clear_message(tmp_path, capsys, monkeypatch, args,
                                                     message, code):
  code_, stderr = launch_in_process(capsys, monkeypatch, *args, f"--workdir={tmp_path / 'w'}")
  assert code_ == code, stderr[-2000:]
  assert message in stderr
  assert "Traceback" not in stderr  # a user's mistake is a message, not a stack trace
  assert not (tmp_path / "w" / "checkpoints").exists()  # failed before any training state
