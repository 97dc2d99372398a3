"""A tiny model with transformer-like param structure (blocks + non-block leaves) whose programs
compile in well under a second; shared by the algorithm tests."""

import jax
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


def assert_close_to_reference(outer, local_M, ref_outer, ref_workers, tol: float = 2e-6):
  """An algorithm's outer params and stacked worker params [M, ...] against a slow reference's
  outer params and list of per-worker params, leaf by leaf."""
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for x, y in zip(leaves(outer), leaves(ref_outer), strict=True):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
  for m, worker in enumerate(ref_workers):
    for x, y in zip(leaves(local_M), leaves(worker), strict=True):
      np.testing.assert_allclose(x[m], y, rtol=tol, atol=tol)


def reference_inner_steps(inner_opt, treedef, local: list, opt_states: list, batch_MxB) -> None:
  """The slow references' inner step: each worker m in turn, in place on `local[m]` (a list of
  leaves) and `opt_states[m]`, with `loss_fn` on its own batch."""
  from diloco_jax import inner  # noqa: PLC0415
  for m in range(len(local)):
    p_m, opt_states[m], _, _ = inner.worker_step(
        loss_fn, inner_opt, jax.tree.unflatten(treedef, local[m]), opt_states[m], batch_MxB[m])
    local[m] = jax.tree.leaves(p_m)
