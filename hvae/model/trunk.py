"""The shared conv-pool trunk g (docs/design.md §2): one set of weights for posterior and prior.

`Trunk` maps a 64x64x4 input `a` to the list [h_0, h_1, ..., h_L]: h_0 = stem(a) at 64x64 and
h_l = g_l(h_{l-1}) = pool(blocks(h_{l-1})) at 64/2^l. The model calls the *same* Trunk
instance on a_q = concat(x, 1) and on a_p = concat(x * m, m), so flax shares its parameters;
when both are needed it is one call on the two stacked along the batch (`HVAE.__call__`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hvae.model import layers


class Trunk(nn.Module):
  """Conv-pool feature extractor.

  Attributes:
    widths: channels at each resolution, (w_0 at 64x64, w_1, ..., w_L); where w_l differs from
      w_{l-1}, a 1x1 convolution `g{l}_proj` after the pool changes the width.
    num_levels: L; the last output is at 64 / 2^L.
    blocks_per_level: residual blocks before each 2x pool.
    dtype: compute dtype of every layer (`model.compute_dtype`); parameters stay float32.
    remat: per level l (entry l - 1), whether stage g_l's residual blocks are rematerialised
      (`model.remat`); () = none.
  """

  widths: tuple[int, ...]
  num_levels: int
  blocks_per_level: int
  dtype: Any = jnp.float32
  remat: tuple[bool, ...] = ()

  @nn.compact
  def __call__(self, a: jnp.ndarray, extra: jnp.ndarray | None = None) -> list[jnp.ndarray]:
    """Returns [h_0 ([B,64,64,w_0]), h_1 ([B,32,32,w_1]), ..., h_L ([B,64/2^L,64/2^L,w_L])].

    Args:
      a: [B, 64, 64, 4] input (image in [-1, 1] and a mask/ones channel).
      extra: optional [B, 64, 64, w_0] added to h_0 (the posterior's own view of the mask).
    """
    h = layers.conv(self.widths[0], 3, name="stem", dtype=self.dtype)(a)
    if extra is not None:
      h = h + extra
    hs = [h]
    for level in range(1, self.num_levels + 1):
      block = layers.res_block(layers.remat_level(self.remat, level))
      for b in range(self.blocks_per_level):
        h = block(self.widths[level - 1], dtype=self.dtype, name=f"g{level}_block{b}")(h)
      h = layers.downsample(h)
      if self.widths[level] != self.widths[level - 1]:
        h = layers.conv(self.widths[level], 1, name=f"g{level}_proj", dtype=self.dtype)(h)
      hs.append(h)
    return hs
