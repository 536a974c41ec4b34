"""Test set-up shared by every test module.

* 8 fake CPU devices (set before JAX starts) so the multi-device paths run on any machine, and
  XLA:CPU's backend at optimisation level 0 (`helpers.XLA_OPT_FLAG`: faster compiles).
* JAX's persistent compilation cache, so re-runs skip most XLA compiles.
* Tiny configs: every compile in the suite is of a model a few thousand parameters big.
* `tiny_straight`: one uninterrupted tiny training run per test process, which the resume and
  fault tests compare against or copy (never change).
* The longest files first: `pytest -n 2 --dist loadfile` hands whole files to the two workers in
  collection order, so a long file picked up last would keep one worker busy while the other
  has finished (xdist's own order, by number of tests, put test_multihost.py near the end).
"""

import logging
import os

from helpers import JAX_CACHE, XLA_OPT_FLAG, tiny_run_config, xla_flags  # no JAX import

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:  # flags given by the user
  os.environ["XLA_FLAGS"] += f" {XLA_OPT_FLAG}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every compile into the persistent cache, here and in every process the suite starts (launch.py
# keeps only those over 1 s unless this is set): the two workers and the launches share them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The files that take longest (about 100, 80 and 35-40 s of one worker on 2 idle cores), in
# that order; every other file follows in the usual (alphabetical) order.
LONGEST_FIRST = ("test_multihost.py", "test_faults_training.py", "test_objective.py",
                 "test_launch.py", "test_ladder.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


@pytest.fixture(scope="session")
def rng():
  return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def tiny_straight(tmp_path_factory):
  """The uninterrupted run of `tiny_run_config(6)`, trained in this process: ({step:
  train/loss}, the final eval/bpd, the workdir). A row every step (metrics.jsonl about 8 KB),
  checkpoints 3 and 6, step 6 evaluated. Tests read it or copy the workdir, never change it."""
  from hvae import loop
  from hvae.metrics_file import read_metrics

  workdir = tmp_path_factory.mktemp("tiny_straight")
  loop.train_and_evaluate(tiny_run_config(6), str(workdir))
  rows = read_metrics(str(workdir))
  steps = [r["step"] for r in rows]
  assert steps == [1, 2, 3, 4, 5, 6], f"missing or repeated steps: {steps}"
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  final = [r for r in rows if r["step"] == 6][0]
  return losses, final["eval/bpd"], workdir


@pytest.fixture(autouse=True)
def _absl_records_reach_caplog(caplog):
  """absl's logger may stop propagating once some test ran absl's app machinery in-process;
  its records then never reach `caplog`, whose handler sits on the root logger. Attaching the
  handler to the absl logger too keeps `caplog.text` complete, whatever ran before."""
  logger = logging.getLogger("absl")
  if logger.propagate:
    yield
    return
  logger.addHandler(caplog.handler)
  try:
    yield
  finally:
    logger.removeHandler(caplog.handler)
