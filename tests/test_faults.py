"""Fault tests (issue 14): damaged checkpoints, two trainers, a full disk while taking the lock
or recording a roll-back, a failed write of process 0 among several, repeated skipped updates,
one-line user errors, unique inpaint names, PNM inputs, the schedule's length.
docs/reliability.md tabulates what these tests try.

Why one file past ~350 lines: docs/reliability.md tabulates these faults from this one file;
the checkpoint, lock and launch tests of the happy path are in their own modules.

Checkpoint damage is tried on a tiny pytree (no model); the training-level tests run
experiments/tiny.py for a few steps, in-process (launch.main included, so a failure's stderr
and exit status are those of the command line).
"""

import errno
import json
import logging
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from helpers import launch_in_process, load_experiment, tiny_run_config
from PIL import Image

from hvae import (
  api,
  checkpoint,
  checkpoint_sync,
  config_file,
  errors,
  lock,
  loop,
  preemption,
  rollback,
  writers,
)
from hvae.checkpoint import CORRUPT_DIR, Checkpointer
from hvae.data import folder, image_files
from hvae.errors import CheckpointUnavailableError, WorkdirLockedError
from hvae.metrics_file import read_metrics
from hvae.model.ladder import HVAE
from hvae.modes import evaluate, inpaint
from hvae.train import create_optimizer, create_train_state, learning_rate_schedule
from hvae.typed_config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A failed orbax read leaves tensorstore callbacks that hit a closed event loop, and unclosed
# tensorstore objects: noise of the damaged checkpoints these tests make, not failures.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# --- damaged checkpoints --------------------------------------------------------------------

def _state(value: float) -> dict:
  return {"w": jnp.full((2, 3), value), "b": jnp.arange(4.0) + value}


def _save_steps(directory, steps=(1, 2, 3)):
  """Steps 1..3, each evaluated; the newest has the lowest eval/bpd (so it is also the best)."""
  with Checkpointer(str(directory)) as ckpt:
    for step in steps:
      ckpt.save(step, _state(float(step)), data_state={"pos": step},
                metrics={"eval/bpd": 10.0 - step})


def _damage(step_dir: pathlib.Path, kind: str) -> None:
  """One corruption of a committed step directory, as a crash, a full disk or a user leaves it."""
  arrays = sorted((step_dir / "state" / "d").iterdir())  # the arrays' data files
  if kind == "truncated_array":
    for path in arrays:
      with open(path, "r+b") as f:
        f.truncate(10)
  elif kind == "deleted_array":
    for path in arrays:
      path.unlink()
  elif kind == "deleted_data_state":
    for path in sorted((step_dir / "data_state").rglob("*"), reverse=True):
      path.rmdir() if path.is_dir() else path.unlink()
    (step_dir / "data_state").rmdir()
  elif kind == "empty_step_dir":
    for path in sorted(step_dir.rglob("*"), reverse=True):
      path.rmdir() if path.is_dir() else path.unlink()
  elif kind == "bad_data_state_json":
    (step_dir / "data_state" / "metadata").write_text("{not json")  # orbax's JSON file
  elif kind == "bad_metrics_json":
    (step_dir / "metrics" / "metrics").write_text("{not json")
  else:
    raise ValueError(kind)


def _warnings(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.parametrize("kind", ["truncated_array", "deleted_array", "deleted_data_state",
                                  "empty_step_dir", "bad_data_state_json"])
def test_training_restore_falls_back_past_a_damaged_latest_step(tmp_path, caplog, kind):
  directory = tmp_path / "checkpoints"
  _save_steps(directory)
  _damage(directory / "3", kind)
  with caplog.at_level(logging.WARNING), Checkpointer(str(directory)) as ckpt:
    restored, data_state, step = ckpt.restore(_state(0.0))
    assert (step, data_state, float(restored["w"][0, 0])) == (2, {"pos": 2}, 2.0)
    assert ckpt.all_steps() == [1, 2]
    # The moved step can be written again by the resumed run.
    assert ckpt.save(3, _state(30.0), data_state={"pos": 3})
  warned = _warnings(caplog)
  assert "step 3" in warned and "cannot be restored" in warned
  assert (directory / CORRUPT_DIR / "3").is_dir()  # moved aside, never deleted
  with Checkpointer(str(directory)) as ckpt:
    assert ckpt.all_steps() == [1, 2, 3]
    assert float(ckpt.restore(_state(0.0))[0]["w"][0, 0]) == 30.0


def test_unreadable_metrics_only_unrank_the_step(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _save_steps(directory)
  _damage(directory / "3", "bad_metrics_json")
  with caplog.at_level(logging.WARNING), Checkpointer(str(directory)) as ckpt:
    assert ckpt.best_step() == 2  # step 3's metrics cannot be read: not the best any more
    assert ckpt.restore(_state(0.0))[2] == 3  # its state is intact
  assert "Checkpoint step 3: its metrics cannot be read" in _warnings(caplog)
  assert not (directory / CORRUPT_DIR).exists()


def test_best_falls_back_to_the_next_best_and_a_reader_moves_nothing(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _save_steps(directory)
  _damage(directory / "3", "truncated_array")
  with caplog.at_level(logging.WARNING), Checkpointer(str(directory), read_only=True) as ckpt:
    _, data_state, step = ckpt.restore(_state(0.0), "best")
    assert (step, data_state) == (2, {"pos": 2})
    # A reader that needs only the state is not stopped by a damaged data_state/.
    _damage(directory / "2", "deleted_data_state")
    assert ckpt.restore(_state(0.0), "best", data_state=False)[2] == 2
  assert "left in place" in _warnings(caplog)
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]


def test_no_step_loads_is_one_line_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, steps=(1, 2))
  # A changed model config: every step fails, none is damaged, nothing may be moved.
  with Checkpointer(str(directory)) as ckpt:
    with pytest.raises(CheckpointUnavailableError) as info:
      ckpt.restore({"w": jnp.zeros((5, 5)), "b": jnp.zeros((4,))})
  message = str(info.value)
  assert "\n" not in message and "step 2:" in message and "step 1:" in message
  assert "use the run's own config" in message and "aside" in message
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
  # The only step damaged: the same error, the step stays where it is.
  _damage(directory / "2", "empty_step_dir")
  with Checkpointer(str(directory)) as ckpt:
    with pytest.raises(CheckpointUnavailableError, match="step 2"):
      ckpt.restore(_state(0.0), 2)  # an explicit step never falls back


def test_processes_agree_on_the_step_and_all_reach_the_barrier(tmp_path, caplog, monkeypatch):
  """Two processes (simulated): the other one cannot read step 3, which loads here. Every step's
  outcome is combined across processes, so this one skips step 3 too, restores step 2 like
  the other, and reaches the set-aside barrier."""
  directory = tmp_path / "checkpoints"
  _save_steps(directory)
  seen, barriers = [], []

  def on_every_process(ok):  # stands in for the allgather: the other process failed step 3
    seen.append(ok)
    return ok and len(seen) > 1

  monkeypatch.setattr(checkpoint, "_on_every_process", on_every_process)
  monkeypatch.setattr(checkpoint, "_barrier", barriers.append)
  with caplog.at_level(logging.WARNING), Checkpointer(str(directory)) as ckpt:
    restored, data_state, step = ckpt.restore(_state(0.0))
  assert (step, data_state, float(restored["w"][0, 0])) == (2, {"pos": 2}, 2.0)
  assert seen == [True, True]  # step 3 loaded here; only the agreement rejected it
  assert "another process could not restore it" in _warnings(caplog)
  assert barriers == ["hvae_checkpoint_set_aside"]
  assert (directory / CORRUPT_DIR / "3").is_dir()
  # With one process the agreement is this process's own outcome.
  monkeypatch.undo()
  assert checkpoint._on_every_process(True) and not checkpoint._on_every_process(False)


_tiny = tiny_run_config  # a constant schedule, a row every step, evaluated at the last step only


def test_training_resumes_from_the_newest_step_that_loads(tmp_path, caplog, tiny_straight):
  """A copy of the uninterrupted run (conftest's `tiny_straight`: checkpoints 3 and 6) with step
  6 damaged: the same command resumes from step 3 and trains steps 4-6 again."""
  workdir = tmp_path / "run"
  shutil.copytree(tiny_straight[2], workdir)
  loss = lambda: {r["step"]: r["train/loss"]  # noqa: E731
                  for r in read_metrics(str(workdir)) if "train/loss" in r}
  straight = tiny_straight[0]
  _damage(workdir / "checkpoints" / "6", "truncated_array")
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(_tiny(6), str(workdir))
  assert "Checkpoint step 6" in _warnings(caplog)
  assert (workdir / "checkpoints" / CORRUPT_DIR / "6").is_dir()
  assert (workdir / "checkpoints" / "6").is_dir() and (workdir / "DONE").exists()
  resumed = loss()
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # no step missing or repeated
  for step in (4, 5, 6):  # steps 4-6 were trained again, exactly as before: nothing lost
    np.testing.assert_allclose(resumed[step], straight[step], rtol=1e-5)
  # Readers follow the same rule: the best (step 6, evaluated) is damaged -> step 3.
  _damage(workdir / "checkpoints" / "6", "deleted_array")
  config = _tiny(6)
  model = HVAE(ModelConfig.from_config(config))
  assert api._restore_params(str(workdir), config, model, "best", ema=True)[1] == 3


# --- the workdir lock -----------------------------------------------------------------------

def _write_lock(workdir: pathlib.Path, pid: int, host: str | None = None) -> pathlib.Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / lock.LOCK_FILE
  path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                              "started": "earlier"}))
  return path


@pytest.fixture()
def sleeper():
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield proc.pid
  proc.kill()
  proc.wait()


def test_a_live_holder_keeps_the_workdir(tmp_path, sleeper):
  path = _write_lock(tmp_path / "w", sleeper)
  with pytest.raises(WorkdirLockedError) as info:
    loop.train_and_evaluate(_tiny(2), str(tmp_path / "w"))
  message = str(info.value)
  assert f"pid {sleeper} on host {socket.gethostname()}" in message and "\n" not in message
  assert not (tmp_path / "w" / "config.json").exists()  # refused before writing anything
  assert json.loads(path.read_text())["pid"] == sleeper  # the holder's lock is untouched


def test_a_stale_lock_is_taken_over_and_released_on_exit(tmp_path, caplog):
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()  # reaped: its pid is not alive
  path = _write_lock(tmp_path / "w", proc.pid)
  with caplog.at_level(logging.WARNING), lock.hold(str(tmp_path / "w")):
    assert json.loads(path.read_text())["pid"] == os.getpid()
    # A second holder in the same process (another open file) is refused too.
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
      with lock.hold(str(tmp_path / "w")):
        pass
  assert f"stale lock {path} of pid {proc.pid}" in _warnings(caplog)
  assert not path.exists()


def test_another_host_s_lock_is_taken_over_only_when_we_get_the_flock(tmp_path, caplog,
                                                                      monkeypatch):
  """A job restarted on a new node resumes: the old node's record is stale once its flock is
  gone. Where flock is not supported, the record alone decides and another host keeps it."""
  path = _write_lock(tmp_path / "w", 1, host="old-node")
  with caplog.at_level(logging.WARNING), lock.hold(str(tmp_path / "w")):
    assert json.loads(path.read_text())["host"] == socket.gethostname()
  assert f"stale lock {path} of pid 1 on host old-node" in _warnings(caplog)
  assert not path.exists()
  _write_lock(tmp_path / "w", 1, host="old-node")

  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(lock.fcntl, "flock", no_flock)
  with pytest.raises(WorkdirLockedError, match="pid 1 on host old-node"):
    with lock.hold(str(tmp_path / "w")):
      pass
  assert json.loads(path.read_text())["host"] == "old-node"  # untouched


_WRITE = os.write


def _fail_writes_to(monkeypatch, name: str, error: int, after: int = 0) -> None:
  """`os.write` to a file named `name` fails with `error` once the file holds `after` bytes (a
  write that crosses the mark is cut short there, as under RLIMIT_FSIZE); other writes go on."""
  real = _WRITE

  def write(fd, data):
    try:
      target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
      target = ""
    if os.path.basename(target) != name:
      return real(fd, data)
    size = os.fstat(fd).st_size
    if size < after:
      return real(fd, bytes(data[:after - size]))
    raise OSError(error, os.strerror(error))

  monkeypatch.setattr(os, "write", write)


def test_every_process_raises_process_0_s_lock_refusal(tmp_path, monkeypatch, sleeper):
  """Process 0 takes the lock and broadcasts its outcome (simulated for two processes): a
  refusal, or a lock file it cannot write, is the same error on every process, never a hang in
  the next collective."""
  _write_lock(tmp_path / "w", sleeper)
  sent = []

  def broadcast(buffer, is_source=None):  # every process receives process 0's buffer
    sent.append(np.asarray(buffer))
    return sent[0]

  monkeypatch.setattr(preemption.multihost_utils, "broadcast_one_to_all", broadcast)
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def outcomes() -> list[Exception]:
    raised = []
    for index in (0, 1):
      monkeypatch.setattr(jax, "process_index", lambda index=index: index)
      with pytest.raises(Exception) as info:
        with lock.hold_job(str(tmp_path / "w")):
          pass
      raised.append(info.value)
    return raised

  refusals = outcomes()
  assert [type(e) for e in refusals] == [WorkdirLockedError] * 2
  assert str(refusals[0]) == str(refusals[1]) and f"pid {sleeper} on host" in str(refusals[0])
  assert not sent[1].any()  # process 1 sent nothing of its own
  # No refusal: process 0 holds the lock inside, and nobody raises.
  (tmp_path / "w" / lock.LOCK_FILE).unlink()
  sent.clear()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with lock.hold_job(str(tmp_path / "w")):
    assert json.loads((tmp_path / "w" / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (tmp_path / "w" / lock.LOCK_FILE).exists()
  # Process 0 cannot write the lock file: the same FileWriteError everywhere.
  sent.clear()
  _fail_writes_to(monkeypatch, lock.LOCK_FILE, errno.ENOSPC)
  failures = outcomes()
  assert [type(e) for e in failures] == [errors.FileWriteError] * 2
  assert str(failures[0]) == str(failures[1]) and "No space left" in str(failures[0])


def test_a_full_disk_while_taking_the_lock_is_one_line_and_leaves_nothing(tmp_path, capsys,
                                                                          monkeypatch):
  """The lock file cannot be written (ENOSPC, through launch.py; or cut short, then EFBIG, as
  under a file-size limit, while a stale lock is taken over): one line naming the file, exit
  status 2, and no lock file or other trace is left."""
  workdir = tmp_path / "w"
  _fail_writes_to(monkeypatch, lock.LOCK_FILE, errno.ENOSPC)
  code, stderr = _main(capsys, monkeypatch, f"--config={ROOT / 'experiments' / 'tiny.py'}",
                       f"--workdir={workdir}")
  assert code == 2, stderr[-3000:]
  assert _error_line(stderr) == (
      f"launch.py: error: {workdir / lock.LOCK_FILE} could not be written (OSError: [Errno 28] "
      "No space left on device): is the disk full, or a quota or file-size limit reached? The "
      "training did not start: free some space and run the same command again.")
  assert not workdir.exists()  # made for the run and removed again: nothing was written
  path = _write_lock(workdir, 1, host="old-node")  # a stale lock: taken over, then the write
  (workdir / "config.json").write_text("{}")
  _fail_writes_to(monkeypatch, lock.LOCK_FILE, errno.EFBIG, after=10)
  with pytest.raises(errors.FileWriteError, match=r"\[Errno 27\] File too large\): is the disk"):
    with lock.hold(str(workdir)):
      pass
  assert not path.exists() and (workdir / "config.json").read_text() == "{}"


def test_a_full_disk_while_recording_a_rollback_is_one_line_and_keeps_the_record(tmp_path):
  """rollbacks.json cannot be rewritten (RLIMIT_FSIZE just above its size): one line naming it;
  the old record stays whole (a resumed run keeps the learning rate it set), no temporary file."""
  entry = {"step": 4, "restored_step": 3, "learning_rate": 5e-4, "skipped": 2}
  rollback.record(str(tmp_path), entry)
  path = tmp_path / rollback.FILE
  before = path.read_bytes()
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
  resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 16, limits[1]))
  try:
    with pytest.raises(errors.FileWriteError) as info:
      rollback.record(str(tmp_path), dict(entry, step=8))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, old)
  assert str(info.value) == (f"{path} could not be written (OSError: [Errno 27] File too large): "
                             "is the disk full, or a quota or file-size limit reached?")
  assert path.read_bytes() == before and os.listdir(tmp_path) == [rollback.FILE]
  assert rollback.read(str(tmp_path)) == [entry]


def _two_processes(monkeypatch, sent: dict) -> tuple[dict, list]:
  """`preemption`'s collectives faked for two processes played in turn by this one (set
  `jax.process_index` to choose): the allgather returns the flags each process sent (`sent`
  holds the other's), the broadcast the buffer of the first source to call it.

  Returns:
    (`sent`, the list of broadcast buffers).
  """
  broadcast_from = []

  def allgather(flags):  # every process receives every process's flags
    sent[jax.process_index()] = np.asarray(flags)
    return np.stack([sent[0], sent[1]])

  def broadcast(buffer, is_source=None):
    if is_source:
      broadcast_from.append(np.asarray(buffer))
    return broadcast_from[0]  # the source runs first here

  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(preemption.multihost_utils, "broadcast_one_to_all", broadcast)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  return sent, broadcast_from


def test_process_0_s_failed_write_stops_every_process_with_its_line(tmp_path, monkeypatch):
  """Two processes (simulated, the collectives faked in one process): process 0's write fails
  inside `held()`. The failure is held, and the next agreement (the stop-flag collective,
  carrying a failure flag) raises it on process 0 and the same one-line `FileWriteError` on
  process 1, which would otherwise go on and wait for process 0 in its next collective. Without
  a failure, the agreement is whether any process asks to stop."""
  path = str(tmp_path / "metrics.jsonl")
  sent, broadcast_from = _two_processes(monkeypatch, {1: np.asarray([0, 0, 1, 0])})  # no stop
  for code, no_space in ((errno.ENOSPC, True), (errno.EACCES, False)):
    broadcast_from.clear()
    raised = []
    for index in (0, 1):
      monkeypatch.setattr(jax, "process_index", lambda index=index: index)
      writes = preemption.HeldWrites()
      if index == 0:
        with writes.held(), writers.writing(path):
          raise OSError(code, os.strerror(code))  # held: process 0 goes on to the agreement
      with pytest.raises(errors.FileWriteError) as info:
        writes.agree()
      raised.append(info.value)
    assert str(raised[0]) == str(raised[1])
    assert str(raised[0]).startswith(f"{path} could not be written (")
    assert f"[Errno {code}] {os.strerror(code)})" in str(raised[0])
    assert raised[0].no_space == raised[1].no_space == no_space  # "free some space" or not
  # No failure: whether any process asks to stop (process 1 was sent SIGTERM).
  request = preemption.StopRequest("stopping")  # not entered: this process's flag stays False
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  sent[1] = np.asarray([1, 0, 1, 0])
  assert preemption.HeldWrites().agree(request) and request.agreed()
  sent[1] = np.asarray([0, 0, 1, 0])
  assert not preemption.HeldWrites().agree(request) and not request.agreed()
  # One process: a failed write is raised at once, and the agreement is free.
  monkeypatch.undo()
  with pytest.raises(errors.FileWriteError, match="No space left"):
    with preemption.HeldWrites().held(), writers.writing(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert not preemption.HeldWrites().agree(request)


class _KeyValueStore:
  """The job's key-value store (JAX's distributed client), shared by the processes a test plays
  in one process (threads)."""

  def __init__(self):
    self.data, self._lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self._lock:
      if key in self.data and not allow_overwrite:
        raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: {key}")
      self.data[key] = value

  def key_value_try_get(self, key):
    with self._lock:
      if key not in self.data:
        raise jax.errors.JaxRuntimeError(f"NOT_FOUND: {key}")
      return self.data[key]

  def key_value_dir_get(self, prefix):
    with self._lock:
      return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

  def key_value_delete(self, key):
    with self._lock:
      self.data.pop(key, None)


def _in_thread(fn) -> tuple[threading.Thread, list]:
  """`fn()` started in a thread; the list gets its outcome (None, or the exception raised)."""
  outcome = []

  def run():
    try:
      fn()
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except  (the outcome under test)
      outcome.append(e)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  return thread, outcome


def test_a_checkpoint_save_failing_on_one_process_fails_on_every_process(tmp_path,
                                                                        monkeypatch):
  """orbax's barriers of a save (`checkpoint_sync.SaveBarrier`, two processes played by threads
  on one key-value store): they pass when both arrive, and old arrivals are deleted. When
  process 1's files cannot be written, it posts why and goes on to the save's last barrier,
  while process 0 waits at the one after the writes; both stop waiting, with the same reason
  (with orbax's own barrier both waited 20 minutes). On one process, a failed background write
  posts its reason from orbax's thread (the hook `checkpoint._Manager` relies on)."""
  store = _KeyValueStore()
  barriers = [checkpoint_sync.SaveBarrier(store, process_index=i, process_count=2, instance="test")
              for i in (0, 1)]
  for key in ("a", "b", "a", "c"):  # orbax reuses some keys: each use is a round of its own
    runs = [_in_thread(lambda b=b, key=key: b(key=key, timeout_ms=600_000))
            for b in barriers]
    for thread, outcome in runs:
      thread.join(timeout=120)
      assert outcome == [None]
  assert len(store.data) == 4  # the arrivals at the last two barriers; older ones deleted
  # Process 0 has written its files and waits for process 1, whose write failed.
  thread, outcome = _in_thread(lambda: barriers[0](key="async_write_complete.2",
                                                   timeout_ms=600_000))
  reason = "ValueError: OUT_OF_RANGE: Error writing ...: File too large"
  assert barriers[1].fail(reason) == f"process 1: {reason}"
  with pytest.raises(checkpoint_sync.PeerSaveFailed, match="process 1: ValueError"):
    barriers[1](key="set_value_start", timeout_ms=600_000)  # orbax's last barrier
  thread.join(timeout=120)
  assert not thread.is_alive() and isinstance(outcome[0], checkpoint_sync.PeerSaveFailed)
  assert str(outcome[0]) == f"process 1: {reason}"
  assert barriers[0].fail("PeerSaveFailed: ...") == f"process 1: {reason}"  # the first stays
  # One process, a real save whose data file cannot be written (RLIMIT_FSIZE): the reason is
  # posted from orbax's finalize thread, before its last barrier, and the error names it.
  posted, fail = [], checkpoint_sync.SaveBarrier.fail

  def recorded(self, reason):  # which thread posts: True for the main thread
    posted.append(threading.current_thread() is threading.main_thread())
    return fail(self, reason)

  monkeypatch.setattr(checkpoint_sync.SaveBarrier, "fail", recorded)
  big = {"w": jnp.asarray(np.random.RandomState(0).normal(size=(512, 512)), jnp.float32)}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, big)
  ckpt.wait()
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
  try:
    ckpt.save(2, big)
    with pytest.raises(errors.CheckpointWriteError) as info:
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, old)
  assert posted[0] is False, posted  # orbax's thread posted first; the main thread then
  assert "File too large" in str(info.value) and "(step 1) is intact" in str(info.value)
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_a_stalled_save_is_not_called_a_full_disk(tmp_path):
  """A save whose barrier timed out (a process of the job stopped) is one line that asks about
  the other processes, not the disk; a failed write still asks about the disk."""
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))

  def failing(error):
    def call():
      raise error
    return call

  with pytest.raises(errors.CheckpointWriteError) as info:
    ckpt._finishing(failing(TimeoutError("Timed out after 1200 s at the barrier 'x'")), step=4)
  assert "did a process of the job stop or hang?" in str(info.value)
  assert "disk" not in str(info.value) and not info.value.no_space
  with pytest.raises(errors.CheckpointWriteError) as info:
    ckpt._finishing(failing(OSError(28, "No space left on device")), step=4)
  assert "is the disk full" in str(info.value) and info.value.no_space
  ckpt.close()


def test_a_failed_checkpoint_save_of_one_process_stops_every_process_with_its_line(
    monkeypatch):
  """Two processes (the collectives faked in one process): process 1's save failed and is held;
  the next agreement raises on process 1 and broadcasts its line to process 0, which raises a
  `CheckpointWriteError` too (not a `FileWriteError`: no "newest checkpoint" is added to it)."""
  line = ("Checkpoint step 6 could not be written to /w/checkpoints (process 1: ValueError: ... "
          "File too large): is the disk full, or a quota or file-size limit reached? Nothing of "
          "it is used; the previous checkpoint (step 3) is intact: free some space and run the "
          "same command to resume from it.")
  _two_processes(monkeypatch, {0: np.asarray([0, 0, 1, 0])})  # process 0: nothing failed
  raised = []
  for index in (1, 0):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    writes = preemption.HeldWrites()
    if index == 1:
      with writes.held():
        raise errors.CheckpointWriteError(line)  # held: process 1 goes on to the agreement
    with pytest.raises(errors.CheckpointWriteError) as info:
      writes.agree()
    raised.append(info.value)
  assert [str(e) for e in raised] == [line, line]
  assert not isinstance(raised[1], errors.FileWriteError)


def test_the_lock_is_released_on_errors_and_sigterm(tmp_path):
  path = tmp_path / lock.LOCK_FILE
  with pytest.raises(RuntimeError, match="boom"):
    with lock.hold(str(tmp_path)):
      raise RuntimeError("boom")
  assert not path.exists()
  if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
    pytest.skip("a SIGTERM handler is installed by the test runner")
  with pytest.raises(SystemExit):
    with lock.hold(str(tmp_path)):
      assert path.exists()
      os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode
  assert not path.exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- launch.py: one line, exit status 2 -----------------------------------------------------

_main = launch_in_process  # launch.py's main in this process: (exit status, stderr)


def _error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("launch.py: error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("case", ["report_missing", "report_empty", "eval_missing_input",
                                  "inpaint_missing_input", "eval_no_checkpoints",
                                  "eval_missing_workdir"])
def test_user_facing_failures_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
  run = tmp_path / "run"  # a run's config.json, no checkpoint
  run.mkdir()
  config_file.save_config(load_experiment("tiny"), str(run / "config.json"))
  empty = tmp_path / "empty"
  empty.mkdir()
  args, expected = {
      "report_missing": (["--mode=report", f"--workdir={tmp_path / 'nope'}"],
                         "no such workdir"),
      "report_empty": (["--mode=report", f"--workdir={empty}"], "not a training run"),
      "eval_missing_input": (["--mode=eval", f"--workdir={run}", f"--input={tmp_path / 'x'}"],
                             f"--input: {tmp_path / 'x'} does not exist"),
      "inpaint_missing_input": (["--mode=inpaint", f"--workdir={run}",
                                 f"--input={tmp_path / 'x.png'}"], "does not exist"),
      "eval_no_checkpoints": (["--mode=eval", f"--workdir={run}"], "has no checkpoints"),
      "eval_missing_workdir": (["--mode=eval", f"--workdir={tmp_path / 'nope'}"],
                               "does not exist"),
  }[case]
  code, stderr = _main(capsys, monkeypatch, *args)
  assert code == 2, stderr[-3000:]
  line = _error_line(stderr)
  assert expected in line
  assert "deterministic" not in stderr
  assert not (empty / "report").exists()


def test_second_trainer_refuses_through_launch(tmp_path, capsys, monkeypatch, sleeper):
  _write_lock(tmp_path / "w", sleeper)
  code, stderr = _main(capsys, monkeypatch, f"--config={ROOT / 'experiments' / 'tiny.py'}",
                       f"--workdir={tmp_path / 'w'}")
  assert code == 2
  assert f"pid {sleeper} on host" in _error_line(stderr)


@pytest.mark.parametrize("case", ["eval_box_without_input", "inpaint_bad_box", "inpaint_box_out",
                                  "inpaint_unknown_mask", "inpaint_unreadable_mask",
                                  "eval_bad_checkpoint"])
def test_bad_mask_and_checkpoint_flags_are_usage_errors_before_loading(tmp_path, capsys,
                                                                      monkeypatch, case):
  """launch.py checks --mask and --checkpoint before anything is loaded (the run here has no
  checkpoint, so getting past the check would fail differently); absl prints a UsageError as
  the message, no traceback."""
  run = tmp_path / "run"
  run.mkdir()
  config_file.save_config(load_experiment("tiny"), str(run / "config.json"))
  Image.fromarray(_photo(0)).save(tmp_path / "photo.png")
  (tmp_path / "mask.png").write_text("not an image")
  inpaint_args = ["--mode=inpaint", f"--workdir={run}", f"--input={tmp_path / 'photo.png'}"]
  args, expected = {
      "eval_box_without_input": (["--mode=eval", f"--workdir={run}", "--mask=box:0,0,8,8"],
                                 "apply only with --input"),
      "inpaint_bad_box": (inpaint_args + ["--mask=box:1,2"], "is not box:X,Y,W,H"),
      "inpaint_box_out": (inpaint_args + ["--mask=box:60,0,8,8"], "must lie inside"),
      "inpaint_unknown_mask": (inpaint_args + ["--mask=circle"], "is not one of centre"),
      "inpaint_unreadable_mask": (inpaint_args + [f"--mask={tmp_path / 'mask.png'}"],
                                  "cannot read the mask image"),
      "eval_bad_checkpoint": (["--mode=eval", f"--workdir={run}", "--checkpoint=abc"],
                              "--checkpoint: 'abc' is not best, latest or a step number"),
  }[case]
  with pytest.raises(app.UsageError, match=re.escape(expected)):
    _main(capsys, monkeypatch, *args)


@pytest.mark.parametrize("override,expected", [
    ("--config.eval.pixels=median", "eval.pixels: 'median' is not one of sample, mean"),
    # (one override per field: absl defines a flag per overridden field once a process)
    ("--config.eval.temperature=0.5,1,1,1,1,1,1,1,1", "eval.temperature: per-level tuple"),
])
def test_bad_eval_fill_in_fields_fail_before_training(tmp_path, capsys, monkeypatch, override,
                                                      expected):
  """eval.pixels and eval.temperature are first used at the first evaluation: `validate`
  checks them, so a mistake is one line before anything is written, not a late traceback."""
  code, stderr = _main(capsys, monkeypatch, f"--config={ROOT / 'experiments' / 'tiny.py'}",
                       f"--workdir={tmp_path / 'w'}", override)
  assert code == 2, stderr[-3000:]
  assert expected in _error_line(stderr)
  assert not (tmp_path / "w").exists()
  config = _tiny(2)
  config.eval.temperature = "hot"
  with pytest.raises(errors.ConfigError, match="eval.temperature: 'hot' is not a number"):
    loop.validate(config)
  config.eval.pixels = "mean"
  config.eval.temperature = ",".join(["0.8"] * config.model.num_levels)  # one per level: fine
  loop.validate(config)


def test_api_level_user_errors_are_one_line_error_types(tmp_path):
  """The same mistakes made through the Python API raise the one-line error types of
  hvae/errors.py (launch.py prints them as one line, exit 2), not a plain ValueError."""
  src = tmp_path / "in"
  src.mkdir()
  (src / "notes.txt").write_text("not an image")
  with pytest.raises(errors.MissingPathError, match="no readable image"):
    inpaint.load_inputs(str(src))
  with pytest.raises(errors.MissingPathError, match="no readable image"):
    evaluate.input_batches(str(src), None, load_experiment("tiny"), 4)
  with pytest.raises(errors.ConfigError, match="box:X,Y,W,H"):
    inpaint.make_masks("box:1,2", 1, 0)
  with pytest.raises(errors.ConfigError, match="is not one of"):
    inpaint.make_masks("circle", 1, 0)
  with pytest.raises(errors.ConfigError, match="only with --input"):
    evaluate.check_mask("box:0,0,8,8")
  evaluate.check_mask("freeform")  # a split's mask: fine
  _save_steps(tmp_path / "checkpoints", steps=(1,))
  with Checkpointer(str(tmp_path / "checkpoints"), read_only=True) as ckpt:
    with pytest.raises(errors.ConfigError, match="--checkpoint: 'abc'"):
      ckpt.restore(_state(0.0), "abc")
  assert {errors.ConfigError, errors.MissingPathError} <= set(errors.USER_ERRORS)


def test_repeated_skips_stop_at_once_with_a_checkpoint_and_one_line(tmp_path, capsys,
                                                                   monkeypatch):
  workdir = tmp_path / "skipping"
  code, stderr = _main(capsys, monkeypatch, f"--config={ROOT / 'experiments' / 'tiny.py'}",
                       f"--workdir={workdir}", "--config.optim.skip_threshold=1e-9",
                       "--config.optim.max_consecutive_skips=2",
                       "--config.train.log_every_steps=100",  # not a logging step: per step
                       "--config.train.checkpoint_every_steps=100")
  assert code == 2, stderr[-3000:]
  line = _error_line(stderr)
  # Steps 1 and 2 skipped; step 2's count is read one step late, after step 3 is dispatched.
  assert "updates in a row were skipped (steps" in line and "stopped at step 3" in line
  assert "gradient norm was" in line and "optim.learning_rate" in line
  assert "optim.skip_threshold / optim.grad_clip" in line
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3"]
  rows = read_metrics(str(workdir))
  assert [r["step"] for r in rows] == [3] and rows[0]["train/skipped"] == 3.0
  assert not (workdir / "DONE").exists() and not (workdir / lock.LOCK_FILE).exists()
  # The checkpoint holds the last good state: no update was applied, params are the initial.
  config = config_file.load_config(str(workdir / "config.json"))
  model = HVAE(ModelConfig.from_config(config))
  params, step = api._restore_params(str(workdir), config, model, "latest", ema=False)
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)[0]  # as hvae.loop draws it
  init = create_train_state(model, create_optimizer(config), init_rng).params
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, params, init)


# --- inputs: unique names, every format Pillow decodes --------------------------------------

def _photo(seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (70, 80, 3), dtype=np.uint8)


def test_inpaint_names_keep_the_extension_and_never_collide(tmp_path, caplog):
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  Image.fromarray(_photo(0)).save(src / "a.jpg")
  Image.fromarray(_photo(1)).save(src / "a.png")
  Image.fromarray(_photo(2)).save(src / "sub" / "a.png")
  Image.fromarray(_photo(3)).save(src / "sub__a.png")  # the name "sub/a.png" maps to
  names = [name for name, _ in inpaint.list_inputs(str(src))]
  assert names == ["a.jpg", "a.png", "sub__a.png", "sub__a.png~2"]
  assert len(set(names)) == len(names)
  assert inpaint.list_inputs(str(src / "a.jpg")) == [("a.jpg", str(src / "a.jpg"))]


def test_pnm_files_are_read_by_the_folder_source_and_inpaint(tmp_path):
  src = tmp_path / "faces"
  src.mkdir()
  grey = _photo(4)[..., 0]
  Image.fromarray(grey).save(src / "g.pgm")
  Image.fromarray(_photo(5)).save(src / "c.ppm")
  Image.fromarray(grey > 127).save(src / "b.pbm")
  Image.fromarray(_photo(6)).save(src / "n.pnm")
  Image.fromarray(grey.astype(np.uint16) * 257).save(src / "deep.pgm")  # 16-bit
  (src / "notes.txt").write_text("not an image")
  assert {".pgm", ".ppm", ".pbm", ".pnm"} <= set(folder.EXTENSIONS)
  found, ignored = folder.scan(str(src))
  assert [rel for rel, _, _ in found] == ["b.pbm", "c.ppm", "deep.pgm", "g.pgm", "n.pnm"]
  assert ignored == ["notes.txt"]
  for name, path in inpaint.list_inputs(str(src)):
    if name != "notes.txt":
      image = inpaint.load_image(path)
      assert image is not None and image.shape == (64, 64, 3), name
  # 8-bit and 16-bit grey decode to the same picture.
  np.testing.assert_array_equal(np.asarray(image_files.decode_file(src / "g.pgm")),
                                np.asarray(image_files.decode_file(src / "deep.pgm")))


# --- the schedule's length ------------------------------------------------------------------

def test_schedule_steps_fixes_the_cosine_length():
  def schedule(num_steps, schedule_steps):
    config = load_experiment("tiny")
    config.optim.schedule = "cosine"
    config.train.num_steps = num_steps
    config.optim.schedule_steps = schedule_steps
    return learning_rate_schedule(config)

  steps = np.arange(0, 101)
  short, longer = schedule(100, 0), schedule(200, 0)
  assert float(short(100)) == 0.0 and float(longer(100)) > 0.0  # num_steps changes the history
  kept = schedule(200, 100)  # ... unless the schedule keeps its length
  np.testing.assert_array_equal(np.asarray([kept(s) for s in steps]),
                                np.asarray([short(s) for s in steps]))
  staged = schedule(100, 200)  # the first stage of a 200-step run
  np.testing.assert_array_equal(np.asarray([staged(s) for s in steps]),
                                np.asarray([longer(s) for s in steps]))
  with pytest.raises(ValueError, match="optim.schedule_steps"):
    schedule(100, -1)
