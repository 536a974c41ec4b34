"""Several hosts, for real: 2 processes on 127.0.0.1 (launch.py --num_processes=2 --process_id=I
--coordinator_address=127.0.0.1:PORT), each with 2 fake CPU devices, train experiments/tiny.py
together, resume it, and evaluate it (--mode=eval); a 1-process, 4-device run of the same global
batch is the reference (in this process, on 4 of its 8 devices: no interpreter start-up).

Checked: the training loss of every step and the evaluations equal the reference's (rtol 1e-5);
only process 0 writes the workdir's files (metrics.jsonl, TensorBoard, images, config.json,
results.json; an audit hook lists every file process 1 opens for writing, and it writes only its
own checkpoint shards; only process 0 imports TensorFlow); both processes resume from the
checkpoint; the worst-examples grid, which needs images that live on both processes, is drawn;
--mode=eval scores every example once, in the split's order; a write that fails on process 0 (a
full disk) stops both processes with its one line. JAX's CPU collectives across processes are
gloo (its default on CPU).

About 1.5 minutes on 2 idle CPU cores for three launches of 2 processes each and the reference;
the fourth launch (a full disk, stopped at its first step) took 81 s of the file's 7 min 54 s on 2
cores loaded by other jobs.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from helpers import (
  JAX_CACHE,
  ROOT,
  launch_in_process,
  load_experiment,
  subprocess_env,
  tiny_run_config,
  tiny_run_flags,
)
from PIL import Image

from hvae import api, baselines, data, loop, quality
from hvae.mesh import make_mesh
from hvae.metrics_file import read_metrics

# Runs launch.py after installing an audit hook that records every path under
# $HVAE_TEST_WORKDIR this process opens for writing, renames, removes or creates. With
# $HVAE_TEST_FILE_SIZE, a file-size limit of that many bytes stands in for a full disk (SIGXFSZ
# ignored: a write past it fails with EFBIG), and JAX's compilation cache is read-only (an entry
# cut short by the limit would stay there), as in tests/test_faults_training.py.
_AUDITED = """
import atexit, json, os, resource, runpy, signal, sys
root, log, written = os.environ["HVAE_TEST_WORKDIR"], os.environ["HVAE_TEST_WRITES"], set()
limits = resource.getrlimit(resource.RLIMIT_FSIZE)
if os.environ.get("HVAE_TEST_FILE_SIZE"):
  from jax._src import compilation_cache
  assert hasattr(compilation_cache, "put_executable_and_time"), "JAX renamed its cache write"
  compilation_cache.put_executable_and_time = lambda *args, **kwargs: None
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["HVAE_TEST_FILE_SIZE"]), limits[1]))
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
  paths = ()
  if event == "open" and isinstance(args[0], str) and isinstance(args[2], int):
    paths = (args[0],) if args[2] & WRITE else ()
  elif event in ("os.rename", "os.replace"):
    paths = args[:2]
  elif event in ("os.remove", "os.mkdir", "os.rmdir"):
    paths = args[:1]
  for p in paths:
    if isinstance(p, str) and os.path.abspath(p).startswith(root + os.sep):
      written.add(os.path.relpath(os.path.abspath(p), root))
sys.addaudithook(hook)
def dump():
  resource.setrlimit(resource.RLIMIT_FSIZE, limits)  # the record is the test's, not the run's
  json.dump({"writes": sorted(written), "tensorflow": "tensorflow" in sys.modules}, open(log, "w"))
atexit.register(dump)
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flags(num_steps: int) -> list[str]:
  """`_config(num_steps)` as launch.py's flags."""
  return [*tiny_run_flags(num_steps), "--config.eval.every_steps=2",
          "--config.train.checkpoint_every_steps=2"]


def _config(num_steps: int):
  """tiny.py, a constant schedule, a row every step, evaluated and checkpointed every 2 steps."""
  config = tiny_run_config(num_steps)
  config.eval.every_steps = 2
  config.train.checkpoint_every_steps = 2
  return config


def _run(workdir, args, *, processes: int, devices: int, tmp_path, file_size_0: int = 0,
         status: int = 0, timeout: float = 420) -> list[dict]:
  """launch.py in `processes` processes of `devices` CPU devices each, process 0 under a
  file-size limit of `file_size_0` bytes (0: none); each must exit with `status` within
  `timeout` seconds: [{stderr, writes}]."""
  port = _free_port()
  procs, logs, copies = [], [], []
  writes = [tmp_path / f"writes_{port}_{i}.json" for i in range(processes)]
  for i in range(processes):
    env = subprocess_env(devices, HVAE_TEST_WORKDIR=str(workdir),
                         HVAE_TEST_WRITES=str(writes[i]))
    if i == 0 and file_size_0:
      env["HVAE_TEST_FILE_SIZE"] = str(file_size_0)
    multi = ([f"--num_processes={processes}", f"--process_id={i}",
              f"--coordinator_address=127.0.0.1:{port}"] if processes > 1 else [])
    logs.append(open(tmp_path / f"stderr_{port}_{i}.txt", "w+"))
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _AUDITED, *args, *multi, f"--workdir={workdir}",
         f"--jax_cache={JAX_CACHE}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True))
    # Copied by this process: a file written by the launch would be under its file-size limit.
    copies.append(threading.Thread(target=shutil.copyfileobj, args=(procs[-1].stderr, logs[-1]),
                                   daemon=True))
    copies[-1].start()
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for copy in copies:
    copy.join(timeout=60)
  out = []
  for i, log in enumerate(logs):
    log.seek(0)
    stderr = log.read()
    log.close()
    assert codes[i] == status, f"process {i}: {stderr[-3000:]}"
    out.append({"stderr": stderr, **json.loads(writes[i].read_text())})
  return out


def _rows(workdir) -> dict[int, dict]:
  rows = read_metrics(str(workdir))
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"missing or repeated steps: {steps}"
  return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two processes train to step 2, resume to step 4 and evaluate; one process trains to 4 (this
  one, on 4 of its devices: the loop's mesh narrowed, the same global batch of 8)."""
  tmp = tmp_path_factory.mktemp("multihost")
  two, one = tmp / "two", tmp / "one"
  first = _run(two, _flags(2), processes=2, devices=2, tmp_path=tmp)
  resumed = _run(two, _flags(4), processes=2, devices=2, tmp_path=tmp)
  evaluated = _run(two, ["--mode=eval", "--checkpoint=latest"], processes=2, devices=2,
                   tmp_path=tmp)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, "make_mesh", lambda: make_mesh(jax.devices()[:4]))
    loop.train_and_evaluate(_config(4), str(one))
  return {"two": two, "one": one, "first": first, "resumed": resumed, "evaluated": evaluated}


def test_two_processes_train_as_one_with_the_same_global_batch(runs):
  two, one = _rows(runs["two"]), _rows(runs["one"])
  assert sorted(two) == sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s]["train/loss"] for s in range(1, 5)],
                             [one[s]["train/loss"] for s in range(1, 5)], rtol=1e-5)
  for step in (2, 4):  # the evaluations: passes gathered over both processes
    np.testing.assert_allclose(two[step]["eval/bpd"], one[step]["eval/bpd"], rtol=1e-5)
  info = json.loads((runs["two"] / "run_info.json").read_text())
  assert info["process_count"] == 2 and len(info["devices"]) == 4


def test_both_processes_resume_and_only_process_0_writes(runs):
  for log in runs["resumed"]:
    assert "Resumed from step 2." in log["stderr"]
  in_checkpoints = lambda p: p.split(os.sep)[0] == "checkpoints"  # noqa: E731
  for phase in ("first", "resumed"):
    # Process 1 writes only its own shards of the checkpoints (orbax: one set per process).
    other = runs[phase][1]["writes"]
    assert other and all(in_checkpoints(p) for p in other), (phase, other)
  assert runs["evaluated"][1]["writes"] == []  # evaluation: process 0 writes the results
  # Only the writer of TensorBoard's files imports TensorFlow (clu's writers and its progress
  # line import it): process 1 starts faster and lighter.
  for phase in ("first", "resumed", "evaluated"):
    assert not runs[phase][1]["tensorflow"], phase
  written = set(runs["first"][0]["writes"]) | set(runs["resumed"][0]["writes"])
  assert {"config.json", "metrics.jsonl", "images/step_2.png", "images/step_4.png",
          "images/worst_step_2.png"} <= written
  evaluated = set(runs["evaluated"][0]["writes"])
  assert {"eval/results.json", "eval/metrics.jsonl"} <= evaluated
  assert not any(in_checkpoints(p) for p in evaluated)  # a reader
  events = [p.name for p in runs["two"].glob("events.out.tfevents.*")]
  assert len(events) == 2  # one per launch of process 0, none of process 1


def test_the_worst_examples_grid_gathers_images_from_both_processes(runs):
  """The worst examples' images live on the process that holds them; every process receives
  them, and the grid equals one process's (its fill-in columns up to sampling noise)."""
  two = np.asarray(Image.open(runs["two"] / "images" / "worst_step_2.png"))
  one = np.asarray(Image.open(runs["one"] / "images" / "worst_step_2.png"))
  assert two.shape == one.shape
  assert np.mean(np.abs(two.astype(int) - one.astype(int))) < 1.0


def test_eval_mode_scores_every_example_once_in_order(runs):
  results = json.loads((runs["two"] / "eval" / "results.json").read_text())
  config = load_experiment("tiny")
  n = config.eval.num_examples
  assert results["num_examples"] == n and results["per_example"]["index"] == list(range(n))
  # Deterministic figures equal one process's: a classical fill-in, and the model's mode.
  (batch,) = data.eval_batches(config, "validation", n, n, process_index=0, process_count=1)
  image, mask = batch["image"], batch["mask"]
  figures = quality.batch_figures(baselines.fill_batch("biharmonic", image, mask), image, mask)
  np.testing.assert_allclose(results["per_example"]["biharmonic/psnr"], figures["psnr"],
                             rtol=1e-6)
  model = api.load(str(runs["two"]), "latest")
  mode = quality.batch_figures(model.mode(image, mask), image, mask)
  np.testing.assert_allclose(results["per_example"]["mode/psnr"], mode["psnr"], rtol=1e-3)


def _error_line(stderr: str) -> str:
  """The one `launch.py: error:` line of a failed command; no traceback."""
  lines = [line for line in stderr.splitlines() if line.startswith("launch.py: error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


def test_a_failed_write_of_process_0_stops_both_processes_with_its_line(runs, tmp_path):
  """A copy of the two-process run resumed to step 6, process 0 under a file-size limit of the
  size of metrics.jsonl: the lock, config.json, run_info.json and the new event file fit, step 5's
  row cannot be appended (sizes decide it, not timing; no checkpoint is due before that row).
  Process 0 holds its failure until the agreement after the row, which broadcasts it: both
  processes exit with status 2 and the same line, within 240 s (below JAX's 300 s shutdown
  timeout, which is how long process 0 would wait at exit for a process 1 left in a collective;
  orbax's barriers wait 20 minutes), with no traceback. Nothing is lost past step 4."""
  workdir = tmp_path / "full"
  shutil.copytree(runs["two"], workdir)
  metrics = workdir / "metrics.jsonl"
  before = metrics.read_bytes()
  assert len(before) > (workdir / "config.json").stat().st_size + 2048  # premise
  out = _run(workdir, _flags(6), processes=2, devices=2, tmp_path=tmp_path,
             file_size_0=len(before), status=2, timeout=240)
  lines = [_error_line(log["stderr"]) for log in out]
  assert lines[0] == lines[1] == (
      f"launch.py: error: {metrics} could not be written (OSError: [Errno 27] File too large): "
      "is the disk full, or a quota or file-size limit reached? The newest checkpoint (step 4) "
      "is intact: free some space and run the same command to resume from it."), lines
  assert metrics.read_bytes() == before and not (workdir / "train.lock").exists()
  assert api.load(str(workdir), "latest").step == 4  # what the rerun resumes from


def test_a_job_that_cannot_be_joined_is_one_line(tmp_path):
  """The issue's case: JAX only infers the count and id on clusters it detects. A process of its
  own: JAX must join a job before it computes anything, and this one has computed."""
  proc = subprocess.run([sys.executable, "launch.py", "--mode=eval", f"--workdir={tmp_path}",
                         "--jax_cache="], cwd=ROOT,
                        env=dict(os.environ, JAX_COORDINATOR_ADDRESS="127.0.0.1:1"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _error_line(proc.stderr)
  assert "Number of processes must be defined" in line
  assert "--num_processes, --process_id and --coordinator_address" in line


def test_a_process_id_out_of_range_is_one_line(tmp_path, capsys, monkeypatch):
  """Checked before JAX is asked to join, so in this process."""
  code, stderr = launch_in_process(
      capsys, monkeypatch, "--mode=eval", f"--workdir={tmp_path}", "--num_processes=2",
      "--process_id=2", "--coordinator_address=127.0.0.1:1")
  assert code == 2, stderr[-3000:]
  assert "--process_id=2 must be below --num_processes=2" in _error_line(stderr)
