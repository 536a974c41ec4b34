"""Per-level statistics of the Gaussian heads of one checkpoint: where a KL spike comes from.

  python -m benchmarks.latent_stats --workdir=runs/faces_cpu --checkpoint=538 \
      [--split=train] [--num_examples=512] [--ema] [--tiny_sigma=0.01]

Runs the model (posterior side on, one noise draw per example) on the first `--num_examples`
examples of the run's split, with its raw parameters (what the train step sees; `--ema` for
the evaluation's), and prints per level: the KL per example (median, max), quantiles of the
prior's and posterior's sigma, the share of latent dimensions whose prior sigma is below
`--tiny_sigma` (and by channel), and the single dimension of largest KL with its sigma_p,
sigma_q and |mu_q - mu_p|. docs/results.md, "The anneal's spikes", used it to find a level-1
head whose sigma sat at its 1e-4 minimum with |mu_q - mu_p| = 2.1e4 (KL 2.2e16 nats on one
dimension) at the step before a loss spike.
"""

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402


def _define_flags() -> dict:
  """The command line (defined when run as a script only: the tests import this module in a
  process that has launch.py's flags)."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "The training run.", required=True),
      "checkpoint": flags.DEFINE_string("checkpoint", "latest", "best | latest | STEP."),
      "split": flags.DEFINE_enum("split", "train", ["train", "validation"],
                                 "Examples of this split."),
      "num_examples": flags.DEFINE_integer("num_examples", 512, "The first this many examples.",
                                           lower_bound=1),
      "batch_size": flags.DEFINE_integer("batch_size", 64, "Examples per model call.",
                                         lower_bound=1),
      "ema": flags.DEFINE_bool("ema", False,
                               "EMA parameters (evaluation's) instead of the raw ones."),
      "tiny_sigma": flags.DEFINE_float("tiny_sigma", 0.01,
                                       "A prior sigma below this counts as tiny."),
  }


QUANTILES = (0.0, 0.001, 0.01, 0.5)


@functools.cache
def _heads_fn(model):
  """The jitted pass returning each level's KL, sigmas and mean gap: compiled once per model."""
  import jax  # pylint: disable=g-import-not-at-top

  def heads(params, image, mask, rng):
    out = model.apply({"params": params}, image, mask, compute_posterior=True,
                      rngs={"sample": rng})
    return [dict(kl=lv.kl, sigma_p=lv.p.scale, sigma_q=lv.q.scale,
                 dmu=abs(lv.q.mean - lv.p.mean)) for lv in out.levels]

  return jax.jit(heads)


def level_stats(model, params, batches, *, seed: int = 0, tiny_sigma: float = 0.01) -> list[dict]:
  """Per level (level 1 first): KL per example, sigma quantiles, tiny-sigma share and the
  dimension of largest KL over `batches` ({"image", "mask", "weight"}; weight-0 rows dropped)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  heads = _heads_fn(model)
  parts = []
  for i, batch in enumerate(batches):
    keep = np.asarray(batch["weight"]) > 0
    got = jax.device_get(heads(params, batch["image"], batch["mask"],
                               jax.random.PRNGKey(seed + i)))
    parts.append([{k: np.asarray(v)[keep] for k, v in level.items()} for level in got])
  stats = []
  for l in range(len(parts[0])):
    shape = parts[0][l]["kl"].shape[1:]
    flat = {k: np.concatenate([p[l][k] for p in parts]).reshape(-1, int(np.prod(shape)))
            for k in parts[0][l]}  # [examples, dims], a dimension's channel = its index % C
    n, kl = flat["kl"].shape[0], flat["kl"]
    per_example = kl.sum(axis=1)
    example, dim = np.unravel_index(int(np.argmax(kl)), kl.shape)
    tiny = flat["sigma_p"] < tiny_sigma
    stats.append({
        "level": l + 1, "shape": tuple(shape), "num_examples": n,
        "kl_median": float(np.median(per_example)), "kl_max": float(per_example.max()),
        "sigma_p_quantiles": [float(q) for q in np.quantile(flat["sigma_p"], QUANTILES)],
        "sigma_q_quantiles": [float(q) for q in np.quantile(flat["sigma_q"], QUANTILES)],
        "tiny_share": float(tiny.mean()),
        "tiny_by_channel": np.bincount(np.nonzero(tiny)[1] % shape[-1],
                                       minlength=shape[-1]).tolist(),
        "worst": {"example": int(example),
                  "position": tuple(int(p) for p in np.unravel_index(dim, shape)),
                  "kl": float(kl[example, dim]),
                  "sigma_p": float(flat["sigma_p"][example, dim]),
                  "sigma_q": float(flat["sigma_q"][example, dim]),
                  "abs_dmu": float(flat["dmu"][example, dim])},
    })
  return stats


def format_stats(stats: list[dict], tiny_sigma: float) -> str:
  q = "/".join(f"{x:g}" for x in QUANTILES)
  lines = [f"| level | shape | KL per example: median / max (nats) | sigma_p quantiles {q} | "
           f"sigma_q quantiles {q} | dims with sigma_p < {tiny_sigma:g} (by channel) | "
           "largest-KL dim: KL, sigma_p, sigma_q, abs(mu_q - mu_p) (example, position) |",
           "|---|---|---|---|---|---|---|"]
  for s in stats:
    w = s["worst"]
    lines.append(
        f"| {s['level']} | {'x'.join(map(str, s['shape']))} | {s['kl_median']:.4g} / "
        f"{s['kl_max']:.4g} | {' '.join(f'{v:.3g}' for v in s['sigma_p_quantiles'])} | "
        f"{' '.join(f'{v:.3g}' for v in s['sigma_q_quantiles'])} | {100 * s['tiny_share']:.3f} % "
        f"{s['tiny_by_channel']} | {w['kl']:.3g}, {w['sigma_p']:.3g}, {w['sigma_q']:.3g}, "
        f"{w['abs_dmu']:.3g} ({w['example']}, {w['position']}) |")
  return "\n".join(lines)


def run(workdir: str, checkpoint: str = "latest", split: str = "train",
        num_examples: int = 512, batch_size: int = 64, ema: bool = False,
        tiny_sigma: float = 0.01) -> str:
  """The printed report: a header line and `format_stats`' table."""
  from hvae import api, data  # pylint: disable=g-import-not-at-top

  model = api.load(workdir, checkpoint, ema=ema)
  if model.model.config.kind == "deterministic":
    raise ValueError(f"{workdir}: a deterministic model has no latents to report")
  batches = data.eval_batches(model.config, split, num_examples, min(batch_size, num_examples),
                              process_index=0, process_count=1)
  stats = level_stats(model.model, model.params, batches, seed=int(model.config.seed),
                      tiny_sigma=tiny_sigma)
  return (f"{workdir} step {model.step} ({'EMA' if ema else 'raw'} parameters), "
          f"{stats[0]['num_examples']} {split} examples:\n\n" + format_stats(stats, tiny_sigma))


def main(argv, flag_values: dict):
  del argv
  print(run(**{name: flag.value for name, flag in flag_values.items()}))


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
