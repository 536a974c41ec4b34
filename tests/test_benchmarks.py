"""The "how long will my run take" figures: benchmarks/train_step.py, benchmarks/eval_cost.py,
the step-time line every training run logs (hvae/eta.py) and launch.py's compilation cache.

On experiments/tiny.py with a few steps: the figures are checked for presence and sanity
(positive, finite), never against times (the machine may be busy).
"""

import logging
import math
import os

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from helpers import launch_module, load_experiment

from benchmarks import eval_cost, train_step
from hvae import eta, loop, sweep


def _positive(result: dict, keys) -> None:
  for key in keys:
    value = result[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_train_step_benchmark_gives_every_figure_and_an_eta():
  config = load_experiment("tiny")
  result = train_step.measure(config, steps=2, matmul_size=256, matmul_repeats=3)
  _positive(result, ["num_params", "batch_size", "num_devices", "compile_s", "first_step_s",
                     "second_step_s", "median_step_s", "steps_per_s", "images_per_s",
                     "median_step_cpu_s",
                     "flops_per_step", "achieved_flops_per_s", "matmul_flops_per_s",
                     "matmul_fraction", "host_peak_rss_mib", "num_steps", "eta_steps_s",
                     "forward_s_per_image", "eval_forwards", "eval_s", "num_evaluations",
                     "eta_total_s", "eval_share"])
  assert result["batch_size"] == 8 and result["num_steps"] == 6
  assert 0 < result["lower_s"] < result["compile_s"]  # tracing is a part of the compile time
  assert result["images_per_s"] == pytest.approx(8 / result["median_step_s"])
  assert result["eta_steps_s"] == pytest.approx(6 * result["median_step_s"])
  assert result["num_evaluations"] == 2  # steps 3 and 6
  assert result["eval_forwards"] == eval_cost.evaluation_forwards(config)["total"]
  assert result["eta_total_s"] == pytest.approx(result["eta_steps_s"] + 2 * result["eval_s"])
  assert 0 < result["eval_share"] < 1
  # The lowered step's FLOPs (the global batch's, used for the rate) and the compiled step's
  # (one device's share of it) agree on the CPU.
  assert result["compiled_flops_per_step"] * result["num_devices"] == pytest.approx(
      result["flops_per_step"], rel=0.2)
  assert result["matmul_fraction"] == pytest.approx(
      result["achieved_flops_per_s"] / result["num_devices"] / result["matmul_flops_per_s"])
  assert result["xla_memory_mib"] is None or result["xla_memory_mib"] > 0
  table = dict(train_step.rows(result, "experiments/tiny.py", steps=2, matmul_repeats=3))
  assert table["global batch"] == 8
  assert "ETA of train.num_steps = 6 steps (steps only)" in table
  assert "float32 256^3 matmul FLOP/s (this machine, median of 3)" in table
  assert table["model.compute_dtype"] == "float32"
  assert result["page_faults_per_step"] >= 0
  assert train_step.matmul_flops_per_sec(64, 1, "bfloat16") > 0
  assert table["evaluations in the run (every eval.every_steps, and the last step)"] == 2
  assert table["ETA with the evaluations (estimate)"].endswith(" s")


def test_eval_cost_benchmark_counts_passes_per_example():
  config = load_experiment("tiny")
  result = eval_cost.measure(config, repeats=1)
  assert (result["batch_size"], result["iw_samples"], result["num_levels"]) == (8, 4, 2)
  _positive(result, [f"{p}_{q}" for p in ("iw", "iw_previous", "swap")
                     for q in ("compile_s", "s", "s_per_example", "forwards", "flop_forwards")]
            + ["forward_s", "forward_flops", "iw_per_k", "iw_previous_per_k", "eval_forwards",
               "eval_estimate_s"])
  # FLOPs, not times: the previous implementation is K forward passes; the shared trunk less.
  assert result["iw_previous_flop_forwards"] == pytest.approx(4, rel=0.1)
  assert result["iw_flop_forwards"] < 0.8 * result["iw_previous_flop_forwards"]
  table = dict(eval_cost.rows(result, "experiments/tiny.py"))
  assert table["evaluation batch B"] == 8
  assert any(k.startswith("IW bound K=4 (trunk shared") for k in table)


def test_evaluation_forwards_counts_each_part_of_an_evaluation():
  config = load_experiment("tiny")  # 2 levels, 8 examples per split at batch 8, N = 2
  parts = eval_cost.evaluation_forwards(config)
  assert parts == {"passes": 16.0, "swap": 2 * 8 * 3.0, "grid": 2 * 3.0,
                   "diagnostics": 3 * 2 + 2 * 2 * 4.0, "refine": 0.0, "total": 92.0}
  config.eval.diagnostics_every = 2
  config.eval.refine_steps, config.eval.refine_examples = 5, 4
  parts = eval_cost.evaluation_forwards(config)
  assert parts["diagnostics"] == 11.0 and parts["refine"] == 2 * 4 * 5 * 3.0


@pytest.mark.parametrize("seconds, text", [
    (0.4, "0 s"), (42.2, "42 s"), (89, "89 s"), (510, "8.5 min"), (3 * 3600 + 720, "3.2 h"),
    (2.1 * 86400, "2.1 days"), (float("nan"), "unknown"), (-1, "0 s")])
def test_format_duration(seconds, text):
  assert eta.format_duration(seconds) == text


@pytest.mark.parametrize("num_steps, every, start, count", [
    (1000, 250, 0, 4), (1000, 300, 0, 4), (6, 3, 0, 2), (6, 3, 3, 1), (6, 3, 6, 0),
    (7, 3, 4, 2), (5, 1, 0, 5)])
def test_num_evaluations_counts_every_period_and_the_last_step(num_steps, every, start, count):
  assert eta.num_evaluations(num_steps, every, start) == count


def test_eta_line():
  assert (eta.eta_line(0.51, 16, 1000, 4)
          == "step time 0.51 s (31.4 images/s); 1000 steps ≈ 8.5 min, plus 4 evaluations")
  assert (eta.eta_line(2.0, 8, 750, 1, resumed=True)
          == "step time 2 s (4 images/s); 750 steps to go ≈ 25.0 min, plus 1 evaluation")
  assert eta.eta_line(0.5, 8, 10) == "step time 0.5 s (16 images/s); 10 steps ≈ 5 s"


def test_step_timer_logs_once_at_the_second_step(caplog):
  config = load_experiment("tiny")
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  timer = eta.StepTimer(config, start=3)
  outputs = {"loss": jnp.ones(())}
  for step in range(3, 7):  # the loop's calls: before a step (steps done), after it
    timer.before_step(step, outputs if step > 3 else None)
    timer.after_step(step + 1, outputs)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step time ")]
  assert len(lines) == 1 and timer.step_seconds is not None and timer.step_seconds > 0
  assert "; 3 steps to go ≈ " in lines[0] and lines[0].endswith(", plus 1 evaluation")


def test_training_run_logs_its_step_time_and_eta(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  config = load_experiment("tiny")
  config.train.num_steps = 3  # one evaluation, at step 3
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  loop.train_and_evaluate(config, str(tmp_path / "run"))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step time ")]
  assert len(lines) == 1, caplog.text[-2000:]
  assert " images/s); 3 steps ≈ " in lines[0] and lines[0].endswith(", plus 1 evaluation")


def test_launch_uses_the_compilation_cache_unless_the_flag_is_empty(tmp_path, monkeypatch):
  launch = launch_module()
  assert flags.FLAGS["jax_cache"].default == os.path.expanduser("~/.cache/hvae/jax")
  updates = {}
  monkeypatch.setattr(launch, "_maybe_initialize_distributed", lambda: None)
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.update({name: value}))
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["launch.py", f"--jax_cache={tmp_path}"])
    launch._setup_jax()  # pylint: disable=protected-access
    assert updates == {"jax_compilation_cache_dir": str(tmp_path),
                       "jax_persistent_cache_min_compile_time_secs": 1.0}
    updates.clear()
    # JAX's own environment variable (the suite sets it to 0) is left to decide the threshold.
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    launch._setup_jax()  # pylint: disable=protected-access
    assert updates == {"jax_compilation_cache_dir": str(tmp_path)}
    updates.clear()
    flags.FLAGS(["launch.py", "--jax_cache="])
    launch._setup_jax()  # pylint: disable=protected-access
    assert updates == {}
  finally:
    flags.FLAGS.unparse_flags()


def test_step_flops_fall_back_to_a_cpu_lowering_where_the_backend_cannot_cost(monkeypatch):
  """jax 0.11's GPU backend cannot cost lowered HLO and its compiled count misses cuDNN's
  convolutions (measured: 3.2e10 of 6.4e12 FLOPs for celeba_l4): the step is then lowered for
  one CPU device, whose lowered program and FLOPs are the same."""
  config = load_experiment("tiny")
  expected = sweep.train_step_flops(config)
  assert expected["source"] == "lowered HLO, global batch" and expected["flops_per_step"] > 0
  real, calls = eta.xla_flops, []

  def gpu_like(stage):  # the first (default-backend) lowering cannot be costed
    calls.append(stage)
    return None if len(calls) == 1 else real(stage)

  monkeypatch.setattr(eta, "xla_flops", gpu_like)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  got = sweep.train_step_flops(config)
  assert got["source"] == "lowered HLO for the CPU, global batch"
  assert got["flops_per_step"] == expected["flops_per_step"]


def test_held_out_photos_are_the_validation_persons_in_name_order(tmp_path):
  """benchmarks/held_out_photos.py on a folder of 10 persons x 4 photos (and one file that does
  not decode) split by person: the held-out files are exactly those of the prepared build's
  validation split; the links point at held-out photos only (no person of the chosen has a
  training photo), at most 3 a person, in name order, at most --count; a second run into the
  filled folder and a missing photo folder are one-line errors."""
  import tensorflow_datasets as tfds
  from PIL import Image

  from benchmarks import held_out_photos
  from hvae import config_file
  from hvae.data import folder
  from hvae.errors import ConfigError, DataUnavailableError

  photos = tmp_path / "photos"
  photos.mkdir()
  for person in range(10):
    for i in range(1, 5):
      Image.new("L", (64, 64), 10 * person + i).save(photos / f"Person_{person}_{i:04d}.png")
  (photos / "Broken_0001.png").write_bytes(b"not a png")
  config = load_experiment("faces_cpu")
  config.data.path, config.data.validation_fraction = str(photos), 0.5
  config.data.data_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  workdir.mkdir()
  config_file.save_config(config, str(workdir / "config.json"))
  _, held_out = folder.held_out_files(config)
  records = tfds.builder_from_directory(folder.prepare(config).directory).as_data_source(
      "validation")
  paths = [records[i]["path"] for i in range(len(records))]
  assert held_out == sorted(p.decode() if isinstance(p, bytes) else p for p in paths)
  person = lambda rel: rel.rsplit("_", 1)[0]
  trained = {person(rel) for rel in os.listdir(photos)} - {person(rel) for rel in held_out}
  assert held_out and trained and "Broken" not in {person(rel) for rel in held_out}
  chosen = held_out_photos.write(str(workdir), str(tmp_path / "out"), count=7, per_group=3)
  assert chosen == sorted(chosen) and len(chosen) == min(7, 3 * len(held_out) // 4)
  assert all(rel in held_out and person(rel) not in trained for rel in chosen)
  assert max(sum(person(r) == person(rel) for r in chosen) for rel in chosen) <= 3
  out = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert out == sorted(chosen + [".held_out.txt"])
  assert all(os.path.realpath(tmp_path / "out" / rel) == str(photos / rel) for rel in chosen)
  with pytest.raises(ConfigError, match="not an empty folder"):
    held_out_photos.write(str(workdir), str(tmp_path / "out"))
  with pytest.raises(DataUnavailableError):
    held_out_photos.write(str(workdir), str(tmp_path / "out2"), data_path=str(tmp_path / "no"))


def test_latent_stats_name_the_largest_kl_dimension_with_its_gaussians(tiny_straight):
  """benchmarks/latent_stats.py on the tiny run: every level reported, quantiles ordered, and
  the largest-KL dimension's KL is the closed form of its sigma_p, sigma_q and |mu_q - mu_p|
  (so the three figures printed beside it are that dimension's)."""
  from benchmarks import latent_stats
  from hvae import api, data

  model = api.load(str(tiny_straight[2]), "latest", ema=False)
  batches = data.eval_batches(model.config, "train", 8, 8, process_index=0, process_count=1)
  stats = latent_stats.level_stats(model.model, model.params, batches)
  assert [s["level"] for s in stats] == [1, 2] and stats[0]["num_examples"] == 8
  for s in stats:
    assert s["sigma_p_quantiles"] == sorted(s["sigma_p_quantiles"]) and 0 <= s["tiny_share"] <= 1
    w = s["worst"]
    closed = (math.log(w["sigma_p"] / w["sigma_q"])
              + (w["sigma_q"] ** 2 + w["abs_dmu"] ** 2) / (2 * w["sigma_p"] ** 2) - 0.5)
    assert w["kl"] == pytest.approx(closed, rel=1e-3, abs=1e-5)
    assert 0 < s["kl_median"] <= s["kl_max"]
  out = latent_stats.run(str(tiny_straight[2]), num_examples=8, batch_size=8)
  assert "step 6 (raw parameters), 8 train examples" in out and out.count("\n| ") == 3
