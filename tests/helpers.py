"""Small factories shared by tests: tiny model and run configs, fake batches, running launch.py."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np

from hvae.typed_config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
# JAX's persistent compilation cache of the test suite (conftest.py) and of the launch.py runs it
# starts: every tiny model compiles once per machine, not once per run.
JAX_CACHE = os.environ.get("HVAE_TEST_JAX_CACHE", str(ROOT / ".jax_cache"))
# XLA:CPU's backend (LLVM) at optimisation level 0 in this process and every process the suite
# starts: the suite's cost is compiling tiny models, and level 0 compiles them ~40 % faster (the
# tiny train step: 7.4 -> 4.2 s of XLA) while running them ~1.6x slower (0.18 -> 0.30 s a step).
# The programs (HLO, fusion, layouts) are the ones a run compiles; only their machine code is less
# optimised. Set HVAE_TEST_XLA_OPT=3 to test with XLA's default.
XLA_OPT_FLAG = f"--xla_backend_optimization_level={os.environ.get('HVAE_TEST_XLA_OPT', '0')}"


# The few tests whose cost is running, not compiling (hundreds of steps, 2^24 likelihood terms),
# compile their functions at XLA's default level: `jax.jit(f, compiler_options=RUN_OPTIONS)`.
RUN_OPTIONS = {"xla_backend_optimization_level": 3}


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a process of the suite with `devices` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_OPT_FLAG}"


def subprocess_env(devices: int = 1, **extra: str) -> dict:
  """The environment of a process the suite starts: CPU only, `devices` CPU devices, the suite's
  XLA flags, TensorFlow's C++ logs off, every compile kept in the persistent cache (a launch.py
  run compiles ~50 programs under launch.py's 1 s threshold: ~5 s a run); `extra` added."""
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=xla_flags(devices), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              **extra)


def launch(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
  """Runs `python launch.py ARGS` on one CPU device with the suite's compilation cache.

  Args:
    *args: command-line arguments (a `--jax_cache=` among them overrides the suite's cache).
    timeout: seconds.
    check: raise AssertionError (with the end of stderr) on a non-zero exit status.
  """
  env = subprocess_env()  # one device: the multi-device path is covered in test_train
  argv = [sys.executable, "launch.py", f"--jax_cache={JAX_CACHE}", *args]
  proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(proc.stderr[-4000:])
  return proc


def launch_module():
  """launch.py as a module (it is a script, not part of the package), imported once."""
  if "launch" not in sys.modules:
    spec = importlib.util.spec_from_file_location("launch", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["launch"] = module
    spec.loader.exec_module(module)
  return sys.modules["launch"]


def launch_in_process(capsys, monkeypatch, *args: str, stdout: bool = False) -> tuple:
  """Runs launch.py's main in this process, flags parsed as on the command line: (exit status,
  stderr), and its stdout third with `stdout=True`. No interpreter start-up and no imports, and
  the functions it compiles are this process's: most of the cost of a short run."""
  from absl import flags

  launch = launch_module()
  argv = ["launch.py", *args, "--jax_cache="]  # the suite's own cache is already on
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads --config.a.b overrides there
  flags.FLAGS.unparse_flags()
  capsys.readouterr()
  try:
    launch.main(launch._parse_flags(argv))  # pylint: disable=protected-access
    code = 0
  except SystemExit as e:
    code = e.code
  finally:
    flags.FLAGS.unparse_flags()
    # ml_collections defines a flag per `--config.a.b=` override on parsing; a second run with
    # the same override in this process would define it again (DuplicateFlagError).
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
  out = capsys.readouterr()
  return (code, out.err, out.out) if stdout else (code, out.err)


def tiny_run_config(num_steps: int, **optim):
  """experiments/tiny.py for `num_steps` steps with a constant schedule (the history must not
  depend on where a run stopped), a metrics row every step, checkpoints every 3 steps and one
  evaluation, at the last step; `optim` overrides `config.optim` fields."""
  config = load_experiment("tiny")
  config.optim.schedule = "constant"
  config.train.num_steps = num_steps
  config.train.log_every_steps = 1
  config.eval.every_steps = 100
  for key, value in optim.items():
    config.optim[key] = value
  return config


def tiny_run_flags(num_steps: int) -> list[str]:
  """launch.py's flags for `tiny_run_config(num_steps)`."""
  return [f"--config={ROOT / 'experiments' / 'tiny.py'}", "--config.optim.schedule=constant",
          f"--config.train.num_steps={num_steps}", "--config.train.log_every_steps=1",
          "--config.eval.every_steps=100"]


def tiny_model_config(**overrides) -> ModelConfig:
  """A model small enough to compile in seconds on a CPU; per-level fields sized to L."""
  num_levels = overrides.pop("num_levels", 3)
  kw = dict(num_levels=num_levels, width=8, blocks_per_level=1, top_latent_dim=4,
            latent_channels=(2,) * num_levels, num_mixtures=2,
            dropout=(0.0,) * num_levels, sigma_floor=(0.0,) * num_levels)
  kw.update(overrides)
  return ModelConfig(**kw)


def centre_mask(batch: int) -> np.ndarray:
  """[B, 64, 64, 1] float32, 0 in the central 32x32 square."""
  m = np.ones((batch, 64, 64, 1), np.float32)
  m[:, 16:48, 16:48] = 0.0
  return m


def random_images(batch: int, seed: int = 0) -> np.ndarray:
  """[B, 64, 64, 3] smooth-ish random uint8 images."""
  rs = np.random.RandomState(seed)
  coarse = rs.randint(0, 256, (batch, 8, 8, 3)).astype(np.float32)
  img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  img += rs.normal(0, 8, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def load_experiment(name: str, arg: str | None = None):
  """Loads experiments/NAME.py's get_config(arg) without making `experiments` a package."""
  path = ROOT / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
