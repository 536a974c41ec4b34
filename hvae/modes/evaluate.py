"""`--mode=eval`: the likelihood and fill-in quality of a trained run (see docs/evaluation.md).

Why one file past ~350 lines: `--mode=eval` is one command whose methods table, sample
figures, IW bound and amortisation split must be computed on the same examples and written
together; `--mode=inpaint` (hvae/modes/inpaint.py) reuses its table.

  python launch.py --mode=eval --workdir=runs/quickstart [--checkpoint=best|latest|STEP]
      [--split=validation|test|train | --input=IMAGE_OR_FOLDER] [--mask=...] [--num_samples=N]
      [--temperature=TAU or TAU_1,...,TAU_L] [--baselines=biharmonic,ring_mean|none]

Over the first `eval.num_examples` examples of the split (evaluation masks, deterministic), or
over exactly the images of --input (complete images, cropped/resized as `--mode=inpaint` does,
masks from --mask, default `data.eval_mask`):
* `{prefix}/iw_bpd`, `{prefix}/iw_ess`: the importance-weighted bound with K = `eval.iw_samples`
  and its effective sample size, next to the ELBO (`bpd`, `recon_bpd`, per-level `kl`);
* a table of fill-in *methods* x figures (hvae/quality.py: psnr, ssim, l1, hf_ratio, seam):
  the model's `mode`, `mean` (the likelihood's mean averaged over N latent draws), `sample`
  (single samples, averaged over N), `best_of_N` (oracle), `ranked` (the sample with the
  highest IW bound, K = `RANK_SAMPLES`, with the fill-in as the image), `mean_of_samples`, and
  the classical baselines (hvae/baselines.py); each method is paired with the reference
  baseline (the first of --baselines, `biharmonic` by default): mean PSNR/SSIM difference, its
  standard error and the examples it wins. Names `{prefix}/{method}/{figure}`,
  `{prefix}/{method}/{psnr|ssim}_vs_{reference}[_stderr|_wins]`;
* the figures of earlier versions, over the N samples: `psnr_best`, `psnr_mean`, `psnr_rank`,
  `psnr_of_mean`, `ssim`, `ssim_best`, `l1`, `l1_best`, `diversity`, `seam`.
The prefix is `eval/` for the validation split and for --input, `test/` for the test split,
`eval_train/` for the training split. Written to OUT/results.json, OUT/table.md (the methods
table, also printed), TensorBoard and metrics.jsonl in OUT (at the checkpoint's step; a re-run
replaces that step's row) and the grid OUT/grid.png; OUT is WORKDIR/eval,
WORKDIR/eval/INPUT_NAME with --input, or --output.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from hvae import (
  amortisation,
  api,
  atomic,
  baselines,
  data,
  evaluation,
  grids,
  metric_names,
  preemption,
  quality,
  sampling,
  split_report,
)
from hvae.data import masks as masks_lib
from hvae.errors import ConfigError
from hvae.mesh import allgather_rows, make_mesh
from hvae.train import latent_dims
from hvae.writers import MetricWriter, writing

RANK_SAMPLES = 8  # K of the IW bound that scores each fill-in for reranking (at most eval K)
PREFIXES = {"validation": "eval", "test": "test", "train": "eval_train"}
MODEL_FILLS = ("samples", "mode", "mean")  # what the model is asked for (`--fill` of inpaint)
PAIRED = ("psnr", "ssim")  # figures compared with the reference baseline, example by example
LEGACY = ("psnr_best", "psnr_mean", "psnr_rank", "psnr_of_mean", "ssim", "ssim_best", "l1",
          "l1_best", "diversity", "seam")  # sample figures of earlier versions, kept by name
SWEEP_TEMPERATURES = (0.0, 0.5, 0.7, 0.85, 1.0)

parse_temperature = sampling.parse_temperature  # re-exported: modes and tests import it here


def resolve_temperature(value, config) -> float | tuple[float, ...]:
  """--temperature when given (a number, "TAU_1,...,TAU_L" or a tuple), else the run's default."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return sampling.default_temperature(config)
  return parse_temperature(value)


def model_fills(model: api.Inpainter, image: np.ndarray, mask: np.ndarray, *, num_samples: int,
                temperature, rng: jax.Array, rank_samples: int | None = None,
                fills: Sequence[str] = MODEL_FILLS,
                baseline_names: Sequence[str] = (),
                pixels: str | None = None, interrupt=None) -> dict[str, np.ndarray]:
  """Every fill-in of one batch: the model's and the baselines'.

  Args:
    model: the loaded run.
    image: [B, 64, 64, 3] uint8 images.
    mask: [B, 64, 64, 1], 1 = given.
    num_samples: N, samples and latent draws of `mean`.
    temperature: tau of the samples and of `mean`.
    rng: PRNG key.
    rank_samples: K of the IW bound that scores each sample (None: not scored).
    fills: which of "samples", "mode", "mean" to draw.
    baseline_names: classical fill-ins (hvae.baselines) to add.
    pixels: pixels of the samples, "sample" | "mean" (None: the run's default).
    interrupt: asked between the ranking's IW chunks (`hvae.preemption`).

  Returns:
    uint8 composites: "samples" [N, B, ...] (with "scores" [N, B], nats, when ranked), "mode" and
    "mean" [B, ...], and one [B, ...] per baseline.
  """
  keys = jax.random.split(rng, 3)
  out = {}
  if "samples" in fills:
    out["samples"] = model.fill_in(image, mask, n=num_samples, temperature=temperature,
                                   seed=keys[0], pixels=pixels)
    if rank_samples:
      flat = out["samples"].reshape((-1,) + out["samples"].shape[2:])
      out["scores"] = model.score(flat, np.tile(mask, (num_samples, 1, 1, 1)), k=rank_samples,
                                  seed=keys[1], interrupt=interrupt).reshape(num_samples, -1)
  if "mode" in fills:
    out["mode"] = model.mode(image, mask)
  if "mean" in fills:
    out["mean"] = model.mean(image, mask, n=num_samples, temperature=temperature, seed=keys[2])
  for name in baseline_names:
    out[name] = baselines.fill_batch(name, image, mask)
  return out


def method_figures(outputs: dict[str, np.ndarray], truth: np.ndarray,
                   mask: np.ndarray) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
  """Per-example figures of every method of `model_fills`' outputs, against the truth.

  Returns:
    ({method: {figure: [B]}} in table order: mode, mean, sample, best_of_N, ranked,
    mean_of_samples, baselines; and the legacy sample figures {name: [B]} (empty without
    samples)).
  """
  methods, legacy = {}, {}
  for name in ("mode", "mean"):
    if name in outputs:
      methods[name] = quality.batch_figures(outputs[name], truth, mask)
  if "samples" in outputs:
    scores = outputs.get("scores")
    per = quality.per_sample_figures(outputs["samples"], truth, mask)
    methods.update(quality.sample_methods(outputs["samples"], truth, mask, scores, per))
    legacy = quality.sample_metrics(outputs["samples"], truth, mask, scores, per)
  for name in baselines.BASELINES:
    if name in outputs:
      methods[name] = quality.batch_figures(outputs[name], truth, mask)
  return methods, legacy


def methods_summary(per_example: dict[str, dict[str, np.ndarray]],
                    reference: str | None) -> dict[str, dict[str, float]]:
  """{method: {figure: mean over examples, psnr_vs_REF, psnr_vs_REF_stderr, ..._wins, ...}},
  and the samples' `spread_ratio` (`hvae.quality.coverage`).

  Args:
    per_example: {method: {figure: [n]}} over the same n examples.
    reference: the method every other one is paired with (None: no paired figures).
  """
  table = {}
  for method, figs in per_example.items():
    row = {k: float(np.mean(v)) for k, v in figs.items()}
    if "sample_spread" in figs:  # a ratio of means, not a mean of ratios (quality.coverage)
      row["spread_ratio"] = quality.spread_ratio(figs["sample_spread"], figs["truth_spread"])
    if reference in per_example and method != reference:
      for fig in PAIRED:
        p = quality.paired(figs[fig], per_example[reference][fig],
                           quality.HIGHER_IS_BETTER[fig])
        name = f"{fig}_vs_{reference}"
        row[name], row[f"{name}_stderr"], row[f"{name}_wins"] = p["diff"], p["stderr"], p["wins"]
    table[method] = row
  return table


def _paired_cell(row: dict, name: str, n: int, digits: int) -> str:
  if name not in row:
    return "—"
  se = row[f"{name}_stderr"]
  se = "" if not math.isfinite(se) else f" ± {se:.{digits}f}"
  return f"{row[name]:+.{digits}f}{se} ({row[f'{name}_wins']}/{n})"


def format_table(table: dict[str, dict[str, float]], reference: str | None, num_examples: int,
                 title: str = "") -> str:
  """The methods table as markdown (a title line, the table, a legend)."""
  head = ["method", "PSNR (dB)", "SSIM", "L1", "hf_ratio", "seam"]
  paired = reference is not None and any(f"psnr_vs_{reference}" in r for r in table.values())
  if paired:
    head += [f"ΔPSNR vs {reference}", f"ΔSSIM vs {reference}"]
  lines = ([title, ""] if title else []) + ["| " + " | ".join(head) + " |",
                                             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
                                             + "|"]
  for method, row in table.items():
    cells = [method, f"{row['psnr']:.2f}", f"{row['ssim']:.4f}", f"{row['l1']:.2f}",
             f"{row['hf_ratio']:.3f}", f"{row['seam']:.2f}"]
    if paired:
      cells += [_paired_cell(row, f"psnr_vs_{reference}", num_examples, 2),
                _paired_cell(row, f"ssim_vs_{reference}", num_examples, 4)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Means over {num_examples} example(s), on the hole (SSIM: its box grown by 4 px). "
            "L1 and seam in grey levels (lower is better); hf_ratio: the fill-in's mean "
            "|Laplacian| on the hole over the truth's (1 = as detailed as the truth, < 1 "
            "smoother). best_of_N is an oracle (it picks the sample closest to the truth)."]
  if paired:
    lines.append(f"Δ vs {reference}: mean paired difference ± its standard error (examples "
                 f"where the method is strictly better / all).")
  if "spread_ratio" in table.get("sample", {}):
    lines.append(coverage_line(table["sample"]))
  return "\n".join(lines) + "\n"


def coverage_line(sample: dict[str, float]) -> str:
  """One sentence on how the N samples lie around the truth (`hvae.quality.coverage`)."""
  return (f"Coverage of the truth by the samples: spread ratio {sample['spread_ratio']:.3f}, "
          f"truth's rank {sample['truth_rank']:.3f}, truth farthest out on "
          f"{100 * sample['truth_outside']:.1f} % of the examples (if the truth were one more "
          "sample: 1, 0.5 and 100/(N+1) %; a ratio below 1 with the truth outside more often: "
          "the samples vary less than, or otherwise than, the truth differs from them).")


def _summarize(rows: dict[str, np.ndarray], prefix: str, dims: tuple[int, ...],
               table: dict[str, dict[str, float]]) -> dict[str, float]:
  """Dataset figures: the ELBO and the IW bound exactly as during training
  (`evaluation.summarize`), the legacy sample means and the table."""
  m = evaluation.summarize(rows, dims) if "iw_log_px" in rows else {}
  for name in LEGACY:
    if name in rows:
      m[name] = rows[name].mean()
  for method, row in table.items():
    m.update(metric_names.prefixed(method, row))
  return {k: float(v) for k, v in metric_names.prefixed(prefix, m).items()}


def fill_grid(outputs: dict[str, np.ndarray], image: np.ndarray, mask: np.ndarray,
              num_rows: int, reference: str | None, truth_label: str = "truth") -> np.ndarray:
  """context | truth | reference baseline | mode | mean | samples (most likely first), labelled;
  columns of fill-ins not in `outputs` are left out."""
  cols, labels = [grids.hole_overlay(image, mask), image], ["context", truth_label]
  for name in (reference, "mode", "mean"):
    if name is not None and name in outputs:
      cols.append(outputs[name])
      labels.append(name)
  if "samples" in outputs:
    samples = outputs["samples"]
    if "scores" in outputs:
      order = np.argsort(-outputs["scores"], axis=0, kind="stable")  # [N, B], best first
      samples = np.take_along_axis(samples, order[..., None, None, None], axis=0)
    cols += list(samples)
    word = "rank" if "scores" in outputs else "sample"
    labels += [f"{word} {i + 1}" for i in range(samples.shape[0])]
  rows = [np.stack([np.asarray(c[b]) for c in cols]) for b in range(num_rows)]
  return grids.make_grid(rows, labels=labels, scale=2)


def input_name(path: str) -> str:
  """The folder's or file's name without extension: WORKDIR/eval/NAME for --input=PATH."""
  base = os.path.basename(os.path.normpath(os.path.abspath(path)))
  return (os.path.splitext(base)[0] if os.path.isfile(path) else base) or "input"


def check_mask(mask: str | None, input_path: str | None = None) -> None:
  """A --mask value checked: an evaluation mask (centre, boxes, freeform) for a split; with
  --input also box:X,Y,W,H or a mask image (`inpaint.check_mask`).

  Raises:
    ConfigError: a value that does not apply; the message names the valid ones.
  """
  from hvae.modes import inpaint  # inpaint imports this module

  if not mask:
    return
  if input_path:
    inpaint.check_mask(mask)
  elif mask not in masks_lib.MASKS:
    raise ConfigError(f"--mask: {mask!r} is not one of {', '.join(masks_lib.MASKS)} (box:X,Y,W,H "
                      "and mask images apply only with --input)")


def input_batches(input_path: str, mask: str | None, config: ml_collections.ConfigDict,
                  batch_size: int) -> list[dict]:
  """Batches like `data.eval_batches` (image, mask, weight, index, plus name) of the images at
  `input_path`, loaded as `--mode=inpaint` loads them; the last batch padded with weight 0."""
  from hvae.modes import inpaint  # inpaint imports this module

  entries, pixels = inpaint.load_inputs(input_path, config.data.get("small_images", "upscale"))
  masks = inpaint.make_masks(mask or config.data.eval_mask, len(pixels), int(config.seed))
  names = np.array([name for name, _ in entries])
  batches = []
  for idx, real in inpaint.padded_batches(len(pixels), min(batch_size, len(pixels))):
    weight = (np.arange(len(idx)) < real).astype(np.float32)
    batches.append({"image": pixels[idx], "mask": masks[idx], "weight": weight,
                    "index": idx.astype(np.int32), "name": names[idx]})
  return batches


def run(workdir: str, config: ml_collections.ConfigDict | None = None, *,
        checkpoint: str | int = "best", split: str = "validation", mask: str | None = None,
        ema: bool = True, temperature: float | Sequence[float] | str | None = None,
        num_samples: int | None = None, iw_samples: int | None = None,
        input_path: str | None = None, output: str | None = None,
        baseline_names: str | Sequence[str] = baselines.DEFAULT, likelihood: bool = True,
        model: api.Inpainter | None = None, pixels: str | None = None,
        rank: bool = True, refine_steps: int | None = None, interrupt=None) -> dict:
  """Evaluates a trained run and writes OUT/{results.json, table.md, grid.png} and TensorBoard.

  Args:
    workdir: the run directory.
    config: the experiment config (default WORKDIR/config.json); its `eval` section sets
      num_examples, batch_size, num_samples (N), iw_samples (K), num_grid_examples and the
      default temperature.
    checkpoint: "best", "latest" or a step.
    split: validation (default), test (only read when asked for) or train; not with input_path.
    mask: centre | boxes | freeform (with input_path also box:X,Y,W,H or a mask image),
      overriding config.data.eval_mask.
    ema: evaluate the EMA parameters (default) or the raw ones.
    temperature: tau of the fill-ins, global or per level (or a string for parse_temperature);
      None = eval.temperature, else `sampling.DEFAULT_TEMPERATURE`.
    num_samples: N, overriding eval.num_samples.
    iw_samples: K, overriding eval.iw_samples.
    input_path: score exactly these complete images (a file or a folder) instead of the split.
    output: the output folder (default WORKDIR/eval, WORKDIR/eval/INPUT_NAME with input_path).
    baseline_names: "biharmonic,ring_mean" (default), "none", or a sequence of names; the first
      is the reference of the paired figures.
    likelihood: compute the IW bound and the ELBO (False: fill-in figures only).
    model: an already loaded run (then workdir, config, checkpoint and ema are not read).
    pixels: pixels of the samples: "sample" (from p(x | z)) or "mean" (E[x | z]); None =
      eval.pixels, else `sampling.DEFAULT_PIXELS`.
    rank: score every sample with the IW bound for the `ranked` method (K = min(8, K) passes
      per sample: the costliest part of the table).
    refine_steps: S of the encoder/decoder split of the gap (hvae/amortisation.py), overriding
      eval.refine_steps; > 0 adds its figures on the first eval.refine_examples examples of the
      validation and training splits (whatever `split`) and writes OUT/split.md. Not with
      input_path.
    interrupt: a stop request (`hvae.preemption.StopRequest.agreed`; launch.py passes one),
      asked before every batch, between the IW bound's chunks and before every refinement
      step: when it says True, `hvae.preemption.Interrupted` is raised and nothing is written.

  Returns:
    The results dict written to results.json.

  Raises:
    hvae.preemption.Interrupted: `interrupt()` said True (before anything was written).
  """
  t0 = time.perf_counter()
  if split not in PREFIXES:
    raise ConfigError(f"--split: {split!r} is not one of {', '.join(PREFIXES)}")
  if input_path and split != "validation":
    raise ConfigError("--split does not apply with --input (the images given are scored)")
  names = baselines.parse(baseline_names)
  reference = names[0] if names else None
  check_mask(mask, input_path)  # a bad --mask fails before the model is loaded
  model = model or api.load(workdir, checkpoint, ema, config=config)
  cfg = copy.deepcopy(config if config is not None else model.config)
  temperature = resolve_temperature(temperature, cfg)
  model.temperatures(temperature)  # a per-level tuple of the wrong length fails here
  pixels = sampling.check_pixels(pixels) if pixels else sampling.default_pixels(cfg)
  if mask and not input_path:
    cfg.data.eval_mask = mask
  refine = amortisation.settings(cfg, refine_steps)
  if refine.steps > 0 and input_path:
    raise ConfigError("--refine_steps compares the run's validation and training splits; it "
                      "does not apply with --input")
  e = cfg.eval
  k = int(iw_samples or e.iw_samples)
  n = int(num_samples or e.num_samples)
  rank_k = min(RANK_SAMPLES, k) if rank else 0
  prefix = "eval" if input_path else PREFIXES[split]
  if input_path:
    batches = input_batches(input_path, mask, cfg, int(e.batch_size))
    mask_name = mask or cfg.data.eval_mask
  else:
    batches = data.eval_batches(cfg, split, int(e.num_examples), int(e.batch_size))
    mask_name = cfg.data.eval_mask
  out_dir = output or os.path.join(workdir, "eval", *([input_name(input_path)] if input_path
                                                      else []))
  rng = jax.random.PRNGKey(cfg.seed)
  logging.info("eval: %s step %d, %s, %d examples, mask %s, K=%d, N=%d, tau %s, baselines %s",
               workdir, model.step, input_path or f"{split} split",
               int(sum(b["weight"].sum() for b in batches)), mask_name, k, n, temperature,
               ",".join(names) or "none")

  rows, methods, keeps, grid = {}, {}, [], None
  for i, batch in enumerate(batches):
    preemption.check(interrupt)
    keys = jax.random.split(jax.random.fold_in(rng, i), 2)
    image, mask_b = batch["image"], batch["mask"]
    keep = batch["weight"] > 0
    figures = (model.evaluate(image, mask_b, k=k, seed=keys[0], interrupt=interrupt)
               if likelihood else {})
    preemption.check(interrupt)
    outputs = model_fills(model, image, mask_b, num_samples=n, temperature=temperature,
                          rng=keys[1], rank_samples=rank_k, baseline_names=names, pixels=pixels,
                          interrupt=interrupt)
    per_method, legacy = method_figures(outputs, image, mask_b)
    figures.update(legacy)
    figures["index"] = batch["index"]
    if "name" in batch:
      figures["name"] = batch["name"]
    keeps.append(keep)  # padding rows are dropped after the gather below (equal shapes there)
    for name, value in figures.items():
      rows.setdefault(name, []).append(np.asarray(value))
    for method, figs in per_method.items():
      for fig, value in figs.items():
        methods.setdefault(method, {}).setdefault(fig, []).append(np.asarray(value))
    if grid is None:
      grid = fill_grid(outputs, image, mask_b, min(int(e.num_grid_examples), int(keep.sum())),
                   reference)
    logging.info("eval: batch %d/%d done (%.1fs)", i + 1, len(batches), time.perf_counter() - t0)
  keep = np.concatenate(keeps)
  rows = {name: np.concatenate(v) for name, v in rows.items()}
  methods = {m: {f: np.concatenate(v) for f, v in figs.items()} for m, figs in methods.items()}
  sharded = not input_path and jax.process_count() > 1  # each process scored its split rows
  if sharded:  # every process gets every example's figures, as one process would have them
    keep, rows, methods = allgather_rows((keep, rows, methods))
  rows = {name: v[keep] for name, v in rows.items()}
  methods = {m: {f: v[keep] for f, v in figs.items()} for m, figs in methods.items()}
  if sharded:  # process-major after the gather: back to the split's order
    order = np.argsort(rows["index"], kind="stable")
    rows = {name: v[order] for name, v in rows.items()}
    methods = {m: {f: v[order] for f, v in figs.items()} for m, figs in methods.items()}
  table = methods_summary(methods, reference)
  metrics = _summarize(rows, prefix, latent_dims(model.model.config), table)
  num_examples = int(rows["index"].size)
  title = (f"Fill-in methods: {workdir} step {model.step}, "
           f"{input_path or f'{split} split'}, mask {mask_name}, N={n}, tau {temperature}, "
           f"pixels {pixels}")
  text = format_table(table, reference, num_examples, title)
  split_text = ""
  if refine.steps > 0 and model.model.config.has_latents:
    metrics.update(_refine_split(cfg, model, refine, interrupt))
    split_text = "\n".join(split_report.markdown(
        metrics, model.model.config.num_levels, f"Encoder/decoder split of the held-out gap: "
        f"{workdir} step {model.step}, S = {refine.steps}, {refine.examples} examples per "
        f"split, mask {mask_name}"))
  per_example = {name: v.tolist() for name, v in rows.items() if v.ndim == 1}
  for method, figs in methods.items():
    per_example.update({f"{method}/{fig}": v.tolist() for fig, v in figs.items()})

  results = {
      "workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint),
      "checkpoint_step": model.step, "ema": model.ema,
      "split": None if input_path else split,
      "input": os.path.abspath(input_path) if input_path else None, "mask": mask_name,
      "iw_samples": k if likelihood else None, "num_samples": n, "rank_samples": rank_k or None,
      "temperature": temperature, "pixels": pixels, "num_examples": num_examples,
      "seed": cfg.seed,
      "baselines": list(names), "reference": reference, "psnr_cap_db": quality.PSNR_CAP,
      "hf_eps": quality.HF_EPS, "metrics": metrics, "methods": table,
      "per_example": per_example, "wall_time_s": time.perf_counter() - t0,
  }
  if refine.steps > 0:
    results["refine"] = {"steps": refine.steps, "examples": refine.examples, "lr": refine.lr}
  if jax.process_index() == 0:  # a failed write (a full disk) is one line (FileWriteError)
    path = os.path.join(out_dir, "results.json")
    with writing(path):
      os.makedirs(out_dir, exist_ok=True)
      atomic.write_json(path, results, strict=True)
    for name, content in (("table.md", text), ("split.md", split_text)):
      if content:
        with writing(os.path.join(out_dir, name)), open(os.path.join(out_dir, name), "w") as f:
          f.write(content)
    with writing(os.path.join(out_dir, "grid.png")):
      grids.save_png(os.path.join(out_dir, "grid.png"), grid)
    print(text + (f"\n{split_text}" if split_text else ""), flush=True)
  with MetricWriter(out_dir, replace_step=model.step) as writer:  # a re-run replaces its row
    writer.write_scalars(model.step, metrics)
    writer.write_images(model.step, {f"{prefix}/fill_ins": grid})
  logging.info("eval: %s", "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                     if k.count("/") == 1))
  if jax.process_index() == 0:  # the others computed the same figures and wrote nothing
    logging.info("eval: wrote %s (%.1fs)", out_dir, time.perf_counter() - t0)
  return results


def _refine_split(cfg, model: api.Inpainter, refine: amortisation.Settings,
                  interrupt=None) -> dict[str, float]:
  """The encoder/decoder split at the loaded checkpoint, on the training evaluations' examples
  (eval.num_examples of each split; the first eval.refine_examples refined) and key: with
  S = eval.refine_steps it reproduces their figures."""
  e = cfg.eval
  n, bs = int(e.num_examples), int(e.batch_size)
  sets = {"eval": data.eval_batches(cfg, "validation", n, bs),
          "eval_train": data.eval_batches(cfg, "train", n, bs)}
  logging.info("eval: refining %d examples per split, S = %d", refine.examples, refine.steps)
  split = amortisation.Split(model.model, make_mesh(), sets, amortisation.evaluation_key(cfg),
                             refine)
  return split(model.params, interrupt)


def tau_label(tau: float | Sequence[float]) -> str:
  """A sweep's name of tau: "0.85", or "0.85/0/0" for one tau per level (level 1 first)."""
  if np.ndim(tau) == 0:
    return f"{float(tau):g}"
  return "/".join(f"{float(t):g}" for t in tau)


def parse_tau(text: str) -> float | tuple[float, ...]:
  """The inverse of `tau_label`: "0.85" -> 0.85, "0.85/0/0" -> (0.85, 0.0, 0.0)."""
  return sampling.parse_temperature(text.replace("/", ","))


def temperature_sweep(workdir: str,
                      temperatures: Sequence[float | tuple[float, ...]] = SWEEP_TEMPERATURES, *,
                      input_path: str | None = None, output: str | None = None,
                      checkpoint: str | int = "best", config=None, **kwargs) -> tuple[dict, str]:
  """Runs the fill-in methods of `run` at every tau (no likelihood bound: it does not depend on
  tau; no likelihood ranking unless rank=True is passed: it costs K passes per sample) and
  tabulates psnr / ssim / l1 / hf_ratio per method and tau.

  Args:
    workdir: the trained run.
    temperatures: the taus: each one for every level, or a tuple of one per level (level 1,
      the finest, first), e.g. (0.85, 0.0, 0.0) samples only level 1.
    input_path: score these images instead of the validation split.
    output: folder of the per-tau results (default WORKDIR/eval/temperature_sweep[/INPUT_NAME]);
      each tau's `run` writes to OUTPUT/tau_TAU, the table to OUTPUT/table.md.
    checkpoint: "best", "latest" or a step.
    config: the experiment config (default WORKDIR/config.json).
    **kwargs: further arguments of `run` (mask, num_samples, baseline_names, split, ...).

  Returns:
    ({tau: {method: {figure: value}}}, the markdown table); per-level taus are tuples, their
    folders tau_0.85-0-0.
  """
  model = api.load(workdir, checkpoint, config=config)
  output = output or os.path.join(workdir, "eval", "temperature_sweep",
                                  *([input_name(input_path)] if input_path else []))
  tables = {}
  for tau in temperatures:
    tau = float(tau) if np.ndim(tau) == 0 else tuple(float(t) for t in tau)
    r = run(workdir, config, checkpoint=checkpoint, temperature=tau, input_path=input_path,
            output=os.path.join(output, "tau_" + tau_label(tau).replace("/", "-")),
            likelihood=False, model=model, **{"rank": False, **kwargs})
    tables[tau] = r["methods"]
  text = format_sweep(tables, f"Temperature sweep: {workdir} step {model.step}, "
                      f"{input_path or 'validation split'}")
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "table.md"), "w") as f:
    f.write(text)
  return tables, text


def format_sweep(tables: dict[float | tuple[float, ...], dict[str, dict[str, float]]],
                 title: str = "") -> str:
  """Markdown: one row per (method, tau) with psnr, ssim, l1, hf_ratio; the best tau of each
  method by PSNR marked with * (none for the methods that do not depend on tau: mode,
  baselines)."""
  lines = ([title, ""] if title else []) + ["| method | tau | PSNR (dB) | SSIM | L1 | hf_ratio |",
                                             "|---|---:|---:|---:|---:|---:|"]
  methods = list(dict.fromkeys(m for t in tables.values() for m in t))
  for method in methods:
    taus = [t for t in tables if method in tables[t]]
    best = max(taus, key=lambda t: tables[t][method]["psnr"])
    for tau in taus:
      row = tables[tau][method]
      varies = len({tables[t][method]["psnr"] for t in taus}) > 1  # mode, baselines: no tau
      mark = "*" if tau == best and varies else ""
      lines.append(f"| {method} | {tau_label(tau)} | {row['psnr']:.2f}{mark} | {row['ssim']:.4f} | "
                   f"{row['l1']:.2f} | {row['hf_ratio']:.3f} |")
  covered = [t for t in tables if "spread_ratio" in tables[t].get("sample", {})]
  if covered:  # hvae.quality.coverage: how the samples lie around the truth, per tau
    lines += ["", "| tau | spread ratio | truth's rank | truth farthest out |",
              "|---:|---:|---:|---:|"]
    for tau in covered:
      row = tables[tau]["sample"]
      lines.append(f"| {tau_label(tau)} | {row['spread_ratio']:.3f} | {row['truth_rank']:.3f} | "
                   f"{100 * row['truth_outside']:.1f} % |")
  return "\n".join(lines) + "\n"
