"""`--mode=eval`: the likelihood and sample quality of a trained run (see docs/evaluation.md).

  python launch.py --mode=eval --workdir=runs/quickstart [--checkpoint=best|latest|STEP]
      [--split=validation|test] [--mask=centre|boxes|freeform] [--num_samples=N]
      [--temperature=TAU or TAU_1,...,TAU_L]

Over the first `eval.num_examples` examples of the split (evaluation masks, deterministic):
* `{split}/iw_bpd`, `{split}/iw_ess`: the importance-weighted bound with K = `eval.iw_samples`
  and its effective sample size, next to the ELBO (`bpd`, `recon_bpd`, per-level `kl`);
* N = `eval.num_samples` fill-ins per context at the chosen temperature: `psnr_best`,
  `psnr_mean`, `psnr_rank` (the fill-in with the highest IW bound, K = `RANK_SAMPLES`, with the
  fill-in as the image), `psnr_of_mean`, `ssim`, `ssim_best`, `l1`, `l1_best`, `diversity`,
  `seam` (hvae/quality.py).
The prefix is `eval/` for the validation split, `test/` for the test split, `eval_train/` for
the training split. Written to WORKDIR/eval/results.json (with K, N, mask, split, checkpoint
step), to TensorBoard and metrics.jsonl in WORKDIR/eval (at the checkpoint's step), and as the
image grid WORKDIR/eval/grid.png.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from hvae import api, data, evaluation, images, objective, quality
from hvae.data import masks as masks_lib
from hvae.train import latent_dims
from hvae.writers import MetricWriter

RANK_SAMPLES = 8  # K of the IW bound that scores each fill-in for reranking (at most eval K)
PREFIXES = {"validation": "eval", "test": "test", "train": "eval_train"}


def parse_temperature(text: str | float | Sequence[float]) -> float | tuple[float, ...]:
  """"0.8" -> 0.8 (every level); "0.5,0.8,1" -> a per-level tuple (level 1 = finest first)."""
  if isinstance(text, int | float):
    return float(text)
  if not isinstance(text, str):
    return tuple(float(t) for t in text)
  try:
    values = tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise ValueError(f"--temperature: {text!r} is not a number or a comma-separated list") from None
  if not values or any(v < 0 for v in values):
    raise ValueError(f"--temperature: {text!r} must be one or more non-negative numbers")
  return values[0] if len(values) == 1 else values


def _summarize(rows: dict[str, np.ndarray], prefix: str, dims: tuple[int, ...]) -> dict[str, float]:
  """Dataset figures: the ELBO part exactly as during training (`evaluation.summarize`), plus
  the IW bound (bits/dim as sum(nats) / (sum(D) ln 2)) and the sample-quality means."""
  m = evaluation.summarize({k: rows[k] for k in ("recon", "kl", "num_dims")}, dims)
  to_bpd = 1.0 / (rows["num_dims"].sum() * objective.LN2)
  m["iw_bpd"] = -rows["iw_log_px"].sum() * to_bpd
  m["iw_ess"] = rows["iw_ess"].mean()
  for name in ("psnr_best", "psnr_mean", "psnr_rank", "psnr_of_mean", "ssim", "ssim_best", "l1",
               "l1_best", "diversity", "seam"):
    m[name] = rows[name].mean()
  return {f"{prefix}/{k}": float(v) for k, v in m.items()}


def _grid(fills: np.ndarray, scores: np.ndarray, image: np.ndarray, mask: np.ndarray,
          num_rows: int) -> np.ndarray:
  """context | truth | fill-ins, most likely first | mean, for the first `num_rows` examples."""
  order = np.argsort(-scores, axis=0)  # [N, B], best first per example
  ranked = np.take_along_axis(fills, order[..., None, None, None], axis=0)
  rows = evaluation.fill_in_grid_rows(ranked[:, :num_rows], image[:num_rows], mask[:num_rows])
  labels = (["context", "truth"] + [f"rank {i + 1}" for i in range(fills.shape[0])] + ["mean"])
  return images.make_grid(rows, labels=labels, scale=2)


def run(workdir: str, config: ml_collections.ConfigDict | None = None, *,
        checkpoint: str | int = "best", split: str = "validation", mask: str | None = None,
        ema: bool = True, temperature: float | Sequence[float] | str = 1.0,
        num_samples: int | None = None, iw_samples: int | None = None) -> dict:
  """Evaluates a trained run and writes WORKDIR/eval/{results.json, grid.png} and TensorBoard.

  Args:
    workdir: the run directory.
    config: the experiment config (default WORKDIR/config.json); its `eval` section sets
      num_examples, batch_size, num_samples (N), iw_samples (K) and num_grid_examples.
    checkpoint: "best", "latest" or a step.
    split: validation (default), test (only read when asked for) or train.
    mask: centre | boxes | freeform, overriding config.data.eval_mask.
    ema: evaluate the EMA parameters (default) or the raw ones.
    temperature: tau of the fill-ins, global or per level (or a string for parse_temperature).
    num_samples: N, overriding eval.num_samples.
    iw_samples: K, overriding eval.iw_samples.

  Returns:
    The results dict written to results.json.
  """
  t0 = time.perf_counter()
  if split not in PREFIXES:
    raise ValueError(f"--split: {split!r} is not one of {', '.join(PREFIXES)}")
  temperature = parse_temperature(temperature)
  model = api.load(workdir, checkpoint, ema, config=config)
  cfg = copy.deepcopy(model.config)
  if mask:
    masks_lib.get_maker(mask)  # fails with the valid names
    cfg.data.eval_mask = mask
  e = cfg.eval
  k = int(iw_samples or e.iw_samples)
  n = int(num_samples or e.num_samples)
  rank_k = min(RANK_SAMPLES, k)
  prefix = PREFIXES[split]
  batches = data.eval_batches(cfg, split, int(e.num_examples), int(e.batch_size))
  rng = jax.random.PRNGKey(cfg.seed)
  logging.info("eval: %s step %d, %s split, %d examples, mask %s, K=%d, N=%d", workdir,
               model.step, split, int(sum(b["weight"].sum() for b in batches)),
               cfg.data.eval_mask, k, n)

  rows, grid = {}, None
  for i, batch in enumerate(batches):
    keys = jax.random.split(jax.random.fold_in(rng, i), 3)
    image, mask_b = batch["image"], batch["mask"]
    figures = model.evaluate(image, mask_b, k=k, seed=keys[0])
    fills = model.fill_in(image, mask_b, n=n, temperature=temperature, seed=keys[1])
    flat = fills.reshape((-1,) + fills.shape[2:])
    scores = model.score(flat, np.tile(mask_b, (n, 1, 1, 1)), k=rank_k,
                         seed=keys[2]).reshape(n, -1)
    figures.update(quality.sample_metrics(fills, image, mask_b, scores))
    figures["index"] = batch["index"]
    keep = batch["weight"] > 0
    for name, value in figures.items():
      rows.setdefault(name, []).append(np.asarray(value)[keep])
    if grid is None:
      grid = _grid(fills, scores, image, mask_b, min(int(e.num_grid_examples), int(keep.sum())))
    logging.info("eval: batch %d/%d done (%.1fs)", i + 1, len(batches), time.perf_counter() - t0)
  rows = {name: np.concatenate(v) for name, v in rows.items()}
  metrics = _summarize(rows, prefix, latent_dims(model.model.config))

  results = {
      "workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint),
      "checkpoint_step": model.step, "ema": ema, "split": split, "mask": cfg.data.eval_mask,
      "iw_samples": k, "num_samples": n, "rank_samples": rank_k,
      "temperature": temperature, "num_examples": int(rows["index"].size), "seed": cfg.seed,
      "psnr_cap_db": quality.PSNR_CAP, "metrics": metrics,
      "per_example": {name: v.tolist() for name, v in rows.items() if v.ndim == 1},
      "wall_time_s": time.perf_counter() - t0,
  }
  out_dir = os.path.join(workdir, "eval")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    images.save_png(os.path.join(out_dir, "grid.png"), grid)
  with MetricWriter(out_dir) as writer:
    writer.write_scalars(model.step, metrics)
    writer.write_images(model.step, {f"{prefix}/fill_ins": grid})
  logging.info("eval: %s", "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
  logging.info("eval: wrote %s (%.1fs)", out_dir, time.perf_counter() - t0)
  return results
