"""Base experiment: every config key of docs/design.md §7, each with a one-line comment.

Variants import `get_config` from here and change a few fields; nothing else defines keys.
Per-level fields are tuples: length 1 broadcasts to every level, otherwise the length must be
`model.num_levels` (level 1 = finest, 32×32; level L = the top vector).

  python launch.py --config=experiments/base.py --workdir=runs/base

Sweeps (docs/sweeps.md), one convention for every experiment file: beside `get_config(arg)` a
file may define `sweep(arg) -> list[dict]`, one dict of overrides (dotted config key -> value;
the seed is the ordinary key `seed`) per point, e.g.

  def sweep(arg=None):
    return [{"model.num_levels": L, "seed": s} for L in (2, 3, 4) for s in (0, 1)]

`python launch.py --config=experiments/FILE.py[:ARG] --sweep --workdir=DIR` trains every point
in DIR/<name from the overrides> (`L3_seed1`), `--sweep_index=I` only point I, `--sweep
--dry_run` lists them; `--mode=report --workdir=DIR` tabulates them (seeds aggregated).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the base config; `arg` is unused here (variants use it)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # base PRNG seed: parameters, data order, masks and sampling all derive from it

  c.data = d = ml_collections.ConfigDict()
  d.source = "embedded"  # celeb_a | folder | embedded | synthetic (tests only)
  d.path = ""  # image folder for source=folder
  d.eval_path = ""  # folder source: held-out image folder (then every data.path image trains)
  d.data_dir = ""  # TFDS data_dir ("" = ~/tensorflow_datasets; folders: ~/.cache/hvae/datasets)
  d.manual_dir = ""  # TFDS manual_dir holding the CelebA files when offline
  d.train_mask = "centre"  # centre | boxes | freeform (non-centre needs posterior_sees_mask)
  d.eval_mask = "centre"  # masks of evaluation passes; deterministic given seed and example index
  d.flip = True  # random horizontal flips of training images
  d.image_size = 64  # the model's resolution; only 64 is supported by the level layout
  d.celeb_a_crop = 140  # centre crop (px) of the aligned 178x218 CelebA images before resizing
  d.celeb_a_download = False  # let TFDS try the (Google Drive) CelebA download when not prepared
  d.small_images = "upscale"  # folder images under 64 px: upscale | skip
  d.validation_fraction = 0.1  # folder source: share held out by path (or split_by group) hash
  d.split_by = ""  # folder source: regex, 1st group = a file's group, e.g. '(.+)_\d+$' (LFW)
  d.train_subset = 0  # train on a fixed random subset of this many examples (0 = all; finite)
  d.num_workers = 0  # grain worker processes (0 = in the main process)

  c.model = m = ml_collections.ConfigDict()
  m.kind = "hvae"  # hvae | deterministic (same trunk and decoder, no latents: the baseline)
  m.num_levels = 4  # L in 1..6: levels 1..L-1 are 2-D maps at 64/2^l, level L a vector
  m.posterior = "bottom_up"  # bottom_up (the seed) | top_down (VDVAE form)
  m.context_skips = True  # decoder level l also sees the masked image's trunk features h^p_l
  m.top_prior = "conditional"  # conditional p(z_L | x_outer) | standard_normal
  m.posterior_sees_mask = False  # 1x1 projection of the mask added to h^q_0 (non-centre masks)
  m.latent_channels = (8,)  # channels of each 2-D latent (per level; the top uses top_latent_dim)
  m.latent_groups = (1,)  # per level: z_l drawn in this many groups, each given the ones before
  # it through a residual block (VDVAE's groups per resolution); channels: divides latent_channels
  m.latent_group_layout = "channels"  # channels (a group = c_l/G channels) | space (a group = all
  # channels on a sub-lattice of positions: G = 2 a checkerboard, 4 the 2x2 sub-lattices)
  m.top_latent_dim = 64  # size of the top (vector) latent z_L
  m.width = 64  # channels of the trunk and the decoder state at 64x64 (and every level by default)
  m.level_widths = (0,)  # per level: channels at 64/2^l (0 = model.width); cheap capacity
  m.blocks_per_level = 2  # residual blocks per resolution, in the trunk and in the decoder
  m.merge_blocks = 0  # residual blocks after a level's last latent merge (VDVAE), at its resolution
  m.head_clamp = 0.0  # c > 0: Gaussian heads' mean and scale soft-clamped, c*tanh(x/c) (NVAE: 5)
  m.upsample = "nearest"  # nearest | bilinear: 2x upsampling of the decoder state
  m.hole_fill = "zeros"  # zeros | pull_push: the prior input's hole (x * m, or a smooth fill of it)
  m.fill_residual = False  # the likelihood's locations = the prior input's pixels + the head's
  m.likelihood = "dmol"  # dmol | discretized_gaussian | gaussian (continuous, dequantised)
  m.num_mixtures = 5  # logistic components per pixel for likelihood=dmol
  m.likelihood_mean_clamp = 0.0  # c > 0: the likelihood's means soft-clamped, c*tanh(x/c)
  m.likelihood_grad = "exact"  # exact | scaled: likelihood locations' gradients x their scale,
  # so near-exact channels (G given R of grey photos) cannot swamp the features; values are
  # unchanged, the optimum is not (docs/results.md "Learning structure")
  m.likelihood_grad_anneal = ()  # (start, end): scaled -> exact location gradients over these
  # steps, so the coupling of near-exact channels is learned after the features (() = off)
  # Speed and memory (docs/design.md "Speed, precision and memory"); none changes the model:
  m.likelihood_region = "all"  # all | centre: training scores only the hole's box (centre masks)
  m.compute_dtype = "float32"  # float32 | bfloat16: convs and activations; params stay float32
  m.remat = (False,)  # per level: recompute its residual blocks' activations in the backward pass

  c.loss = lo = ml_collections.ConfigDict()
  lo.kl_weight = (1.0,)  # beta_l: per-level KL weight in the loss (reports stay unweighted)
  lo.free_bits = (0.0,)  # lambda_l: per-level floor (nats/image) on the batch-mean KL, loss only
  lo.kl_warmup_steps = 0  # linear beta from 0 to 1 over this many steps (0 = off)
  lo.kl_balancing = False  # NVAE KL balancing across levels during warm-up
  lo.free_bits_per = "level"  # free bits on each level's batch-mean KL | on each of its channels
  lo.free_bits_prior = "frozen"  # below a floor: no KL gradient | learns: the prior still learns

  c.regularize = r = ml_collections.ConfigDict()
  r.dropout = (0.0,)  # dropout rate on the features feeding level l's posterior and prior heads
  r.sigma_floor = (0.0,)  # lower bound on the posterior and prior sigma of level l
  r.head_weight_decay = (0.0,)  # extra L2 weight decay on level l's posterior and prior heads
  # Encoder-only remedies (hvae/remedies.py; docs/overfitting.md "Encoder or decoder"):
  r.posterior_dropout = (0.0,)  # dropout on the features feeding level l's posterior head only
  r.posterior_noise = (0.0,)  # std of Gaussian noise added to those features (training only)
  r.posterior_head_weight_decay = (0.0,)  # L2 weight decay on level l's posterior head only
  r.sleep_weight = (0.0,)  # weight of -log q(z_l | dream) for dreams (x, z) drawn from the model

  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"  # adam | adamw | adamax
  o.b1 = 0.9  # decay rate of the first moment
  o.b2 = 0.999  # of the second moment (VDVAE: 0.9, which follows fast changes of gradient size)
  o.learning_rate = 1e-3  # peak learning rate
  o.warmup_steps = 100  # linear learning-rate warm-up
  o.schedule = "cosine"  # constant | cosine (decays to 0: see optim.schedule_steps)
  o.schedule_steps = 0  # cosine length (0 = train.num_steps); fix it to train in stages
  o.weight_decay = 0.0  # decoupled weight decay (adamw) on all parameters
  o.grad_clip = 200.0  # global gradient-norm clipping (0 = off)
  o.skip_threshold = 0.0  # skip an update whose gradient norm exceeds this (0 = never by norm)
  o.max_consecutive_skips = 20  # stop with an error after this many skipped updates in a row
  o.on_repeated_skips = "stop"  # stop | rollback: last checkpoint, learning rate x 0.5, <= 3 times
  o.ema_decay = 0.999  # EMA of parameters, used for evaluation (0 = no EMA)

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 10_000  # total optimisation steps
  t.batch_size = 32  # GLOBAL batch size, split over all devices and processes
  t.log_every_steps = 50  # train/ metrics and console progress
  t.checkpoint_every_steps = 1000  # periodic checkpoints (also on preemption and at the end)
  t.keep_checkpoints = 3  # latest checkpoints kept (the best by eval/bpd is kept too)

  c.eval = e = ml_collections.ConfigDict()
  e.every_steps = 1000  # evaluation period (also at the last step)
  e.num_examples = 256  # examples of each evaluation pass (held-out and training split alike)
  e.num_samples = 4  # fill-in samples per context in image grids and sample metrics
  e.iw_samples = 64  # K of the importance-weighted bound in --mode=eval
  e.temperature = ""  # fill-in tau (eval, inpaint, hvae.load): "0.8", "0.5,1"; "" = the default
  e.pixels = ""  # a fill-in sample's pixels: sample (p(x|z)) | sample:T (at pixel temperature T)
  # | mean (E[x|z]); "" = hvae.sampling.DEFAULT_PIXELS
  e.batch_size = 64  # evaluation batch size (global)
  e.num_grid_examples = 8  # fixed validation contexts shown in images/step_N.png
  e.num_swap_examples = 64  # examples of the posterior->prior swap (L + 1 forward passes each)
  e.diagnostics_every = 1  # diagnostic images (worst, resample, KL heatmaps) every N evaluations
  e.num_worst = 3  # held-out examples with the largest KL shown per level
  # The encoder/decoder split of the held-out gap (hvae/amortisation.py, hvae/memorisation.py):
  e.refine_steps = 0  # S: per-example posterior refinement steps at every evaluation (0 = off)
  e.refine_examples = 64  # examples of each split refined (memorisation: all eval.num_examples)
  e.refine_lr = 0.05  # Adam step size of the refinement (cosine-decayed to 0 over S steps)
  e.refine_samples = 1  # noise draws the refinement fits (scored on the evaluation's own noise)

  c.verdict = v = ml_collections.ConfigDict()  # verdict/overfit/level_l (rule: hvae/verdict.py)
  v.window = 4  # evaluations the trend is measured over (first vs last of them)
  v.gap_margin = 2.0  # nats/image gap/kl (or the swap gap) must grow by over the window
  v.train_margin = 0.5  # nats/image eval_train/kl may rise by and still count as "has not"
  v.material_share = 0.1  # warn only if the flagged level's part is >= this share of gap/bpd
  return c
