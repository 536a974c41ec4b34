"""Test set-up shared by every test module.

* 8 fake CPU devices (set before JAX starts) so the multi-device paths run on any machine.
* JAX's persistent compilation cache, so re-runs skip most XLA compiles.
* Tiny configs: every compile in the suite is of a model a few thousand parameters big.
"""

import logging
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import JAX_CACHE  # noqa: E402

jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def rng():
  return jax.random.PRNGKey(0)


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
