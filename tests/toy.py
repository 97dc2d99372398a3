"""A tiny model with transformer-like param structure (blocks + non-block leaves) whose programs
compile in well under a second; shared by the algorithm tests."""

import jax.numpy as jnp
import numpy as np

D = 3


def init_params(seed: int = 0, num_blocks: int = 2):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
  return {"embed": f(4, D), "blocks": {i: {"w": f(D, D), "b": f(D)} for i in range(num_blocks)},
          "head": f(D)}


def loss_fn(params, batch_BxF):
  """Regress sum(x) from x [B, 4] through the blocks (tanh layers)."""
  x = batch_BxF @ params["embed"]
  for i in range(len(params["blocks"])):
    blk = params["blocks"][i]
    x = x + jnp.tanh(x @ blk["w"] + blk["b"])
  pred = x @ params["head"]
  loss = jnp.mean(jnp.square(pred - jnp.sum(batch_BxF, axis=-1)))
  return loss, {}


def batches(num_steps: int, M: int, B: int = 4, seed: int = 1):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(M, B, 4)), jnp.float32) for _ in range(num_steps)]
