"""Tests for hvae/checkpoint.py: round trips, retention (latest N + best), atomicity on kill."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import subprocess_env

from hvae.checkpoint import Checkpointer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class _State:
  params: dict
  step: jnp.ndarray
  rng: jnp.ndarray


def _state(value: float) -> _State:
  return _State(
      params={"enc": {"w": jnp.full((2, 3), value)}, "dec": {"b": np.arange(4, dtype=np.int32)}},
      step=jnp.asarray(int(value), jnp.int32),
      rng=jax.random.key(int(value)))


def _value(state: _State) -> float:
  return float(state.params["enc"]["w"][0, 0])


def test_round_trip(tmp_path):
  state = _state(7.0)
  data_state = {"epoch": np.int64(2), "index": 17, "order": np.array([3, 1, 2]), "name": "train"}
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    assert ckpt.save(10, state, data_state=data_state, metrics={"eval/bpd": np.float32(3.5)})
    ckpt.wait()
  # A fresh Checkpointer (as after a restart) must find everything on disk.
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    target = jax.tree.map(jnp.zeros_like, state)
    restored, restored_data, step = ckpt.restore(target)
  assert step == 10
  assert isinstance(restored, _State)
  np.testing.assert_array_equal(restored.params["enc"]["w"], state.params["enc"]["w"])
  np.testing.assert_array_equal(restored.params["dec"]["b"], state.params["dec"]["b"])
  assert int(restored.step) == 7
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
  # numpy scalars/arrays come back as their JSON equivalents.
  assert restored_data == {"epoch": 2, "index": 17, "order": [3, 1, 2], "name": "train"}


def test_restore_into_abstract_target_and_no_data_state(tmp_path):
  state = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones((4,), jnp.bfloat16)}}
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, data_state, step = ckpt.restore(abstract, step=3)
  assert (step, data_state) == (3, None)
  assert restored["b"]["c"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(restored["a"], state["a"])


def test_keeps_latest_and_best(tmp_path):
  # Step 2 is the best; steps 3 and 5 have no evaluation and must not evict it.
  bpds = {1: 5.0, 2: 1.0, 3: None, 4: 4.0, 5: None}
  with Checkpointer(str(tmp_path), keep=2) as ckpt:
    for step, bpd in bpds.items():
      metrics = None if bpd is None else {"eval/bpd": bpd, "eval/recon_bpd": bpd / 2}
      ckpt.save(step, _state(float(step)), data_state={"step": step}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]
    assert (ckpt.latest_step(), ckpt.best_step()) == (5, 2)
  with Checkpointer(str(tmp_path), keep=2) as ckpt:
    assert (ckpt.latest_step(), ckpt.best_step()) == (5, 2)
    restored, data_state, step = ckpt.restore(_state(0.0), "best")
    assert (step, _value(restored), data_state) == (2, 2.0, {"step": 2})
    restored, _, step = ckpt.restore(_state(0.0), "latest")
    assert (step, _value(restored)) == (5, 5.0)


def test_nan_metric_is_never_best(tmp_path):
  with Checkpointer(str(tmp_path), keep=1) as ckpt:
    ckpt.save(1, _state(1.0), metrics={"eval/bpd": 3.0})
    ckpt.save(2, _state(2.0), metrics={"eval/bpd": float("nan")})
    ckpt.wait()
    assert ckpt.best_step() == 1
    assert ckpt.all_steps() == [1, 2]


def test_best_without_metrics_and_missing_step_errors(tmp_path):
  with Checkpointer(str(tmp_path), keep=3) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
      ckpt.restore(_state(0.0))
    for step in (4, 8):
      ckpt.save(step, _state(float(step)))
    ckpt.wait()
    assert ckpt.best_step() is None
    with pytest.raises(FileNotFoundError, match=r"eval/bpd.*available steps: \[4, 8\]"):
      ckpt.restore(_state(0.0), "best")
    with pytest.raises(FileNotFoundError, match=r"step 5 .*available steps: \[4, 8\]"):
      ckpt.restore(_state(0.0), 5)
    # Saving a step that already exists is a logged no-op, not an error.
    assert not ckpt.save(8, _state(0.0))


def test_leftover_tmp_dir_is_ignored(tmp_path):
  """A half-written step directory, named the way orbax names it, is never restored."""
  directory = tmp_path / "ckpt"
  with Checkpointer(str(directory)) as ckpt:
    ckpt.save(1, _state(1.0), data_state={"pos": 1})
  partial = directory / "2.orbax-checkpoint-tmp"
  shutil.copytree(directory / "1", partial)
  os.remove(partial / "commit_success.txt")
  for root, _, files in os.walk(partial / "state"):
    for name in files:
      open(os.path.join(root, name), "wb").close()  # truncated: as if killed mid-write
  with Checkpointer(str(directory)) as ckpt:
    assert ckpt.all_steps() == [1]
    restored, data_state, step = ckpt.restore(_state(0.0))
    assert (step, _value(restored), data_state) == (1, 1.0, {"pos": 1})
    with pytest.raises(FileNotFoundError, match=r"available steps: \[1\]"):
      ckpt.restore(_state(0.0), 2)
    # The re-run can save that step again; the leftover is cleaned up.
    assert ckpt.save(2, _state(2.0))
  assert sorted(os.listdir(directory)) == ["1", "2"]


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import numpy as np
    from hvae.checkpoint import Checkpointer

    directory = sys.argv[1]
    big = np.zeros((32, 1024, 1024), np.float32)  # 128 MiB: the write takes a while
    ckpt = Checkpointer(directory)
    ckpt.save(1, {"w": np.full((4,), 1.0, np.float32), "big": big}, data_state={"pos": 1})
    ckpt.wait()

    def kill_when_writing():
      while not os.path.exists(os.path.join(directory, "2.orbax-checkpoint-tmp")):
        time.sleep(0.0005)
      os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_when_writing, daemon=True).start()
    ckpt.save(2, {"w": np.full((4,), 2.0, np.float32), "big": big + 2}, data_state={"pos": 2})
    ckpt.wait()
    time.sleep(60)
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "ckpt")
  env = subprocess_env(PYTHONPATH=_REPO)
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, directory], env=env,
                        capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  # The kill landed mid-write: step 2 exists only as orbax's temporary directory.
  assert sorted(os.listdir(directory)) == ["1", "2.orbax-checkpoint-tmp"]
  target = {"w": np.zeros((4,), np.float32), "big": np.zeros((32, 1024, 1024), np.float32)}
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 1
    restored, data_state, step = ckpt.restore(target)
    assert (step, data_state) == (1, {"pos": 1})
    np.testing.assert_array_equal(restored["w"], 1.0)
