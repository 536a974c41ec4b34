"""hvae's command line: train, evaluate, inpaint or report (DESIGN §7).

  python launch.py --config=experiments/quickstart.py
  python launch.py --config=experiments/celeba_l4.py --config.train.batch_size=256
  python launch.py --mode=train --workdir=runs/quickstart        # resume from config.json

`--workdir` defaults to runs/NAME for --config=experiments/NAME.py; running `train` again on the
same workdir resumes. Modes other than train may omit --config and read WORKDIR/config.json.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, experiments/NAME.py[:ARG].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/NAME).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "inpaint", "report"], "What to do.")
_CACHE = flags.DEFINE_string(
    "jax_cache", os.path.expanduser("~/.cache/hvae/jax"),
    "JAX persistent compilation cache ('' = off); re-runs skip most compilation.")


def _default_workdir() -> str:
  path = flags.FLAGS["config"].config_filename
  if not path:
    raise app.UsageError("--workdir is required when --config is not given")
  name = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
  return os.path.join("runs", name)


def _maybe_initialize_distributed() -> None:
  """Multi-host: join the job when the environment names a coordinator (or a TPU pod slice)."""
  import jax

  multi_host = (os.environ.get("JAX_COORDINATOR_ADDRESS")
                or int(os.environ.get("SLURM_NTASKS", "1")) > 1
                or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
                or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
  if multi_host:
    jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())


class _QuietLibraries:
  """Drops INFO lines of chatty libraries (orbax, XLA bridge) so progress lines stay readable."""

  _NOISY = ("orbax", "jax/_src", "tensorflow_datasets", "grain")

  def filter(self, record) -> bool:
    # record.levelno is a Python level (INFO = 20), not absl's (INFO = 0).
    return record.levelno > 20 or not any(n in record.pathname for n in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  import jax

  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  _maybe_initialize_distributed()
  workdir = _WORKDIR.value or _default_workdir()
  config = _CONFIG.value
  if config is None:
    from hvae import configs

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise app.UsageError(f"--config is not given and {path} does not exist")
    config = configs.load_config(path)

  if _MODE.value == "train":
    from hvae import loop

    loop.train_and_evaluate(config, workdir)
  else:
    raise app.UsageError(f"--mode={_MODE.value} is not implemented yet (see the open issues)")


if __name__ == "__main__":
  app.run(main)
