"""Logical axis rules -> the sharding of every array: parameters, state fields, activations.

A model names every dimension of its parameters with a *logical* axis (`model.logical_axes`:
`vocab`, `embed`, `heads`, `head_dim`, `mlp`, `norm`, …); the rule table below maps each logical
name onto a mesh axis inside a worker (MaxText / nanodo style). From that one table:

* a parameter leaf gets `P(*param_spec)`, e.g. `w_up [D, F]` → `P("data", "model")`: FSDP over
  the data axis (the `embed` dimension), tensor parallelism over the model axis (`mlp`);
* every per-worker state field (local params, inner optimizer state, error-feedback residuals)
  gets `P("worker", *param_spec)`, and the outer copy, the outer optimizer state and the
  in-flight outer gradients `P(*param_spec)`: sharded inside each worker, replicated over
  workers (`state_specs` in algorithm.py applies these);
* activations get `P(*activation_spec)` through the `constrain` hook of `model.apply`.

A logical name whose mesh axis has size 1 maps to None, so a spec only names the axes that
really split something. A dimension that its mesh axis does not divide is a config error
(one sentence naming the parameter, the model key and the mesh key).
"""

from __future__ import annotations

import math

from typing import Any, Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diloco_jax import mesh as mesh_lib

PyTree = Any

# Logical parameter axis -> mesh axis (None: replicated inside a worker).
PARAM_RULES: dict[str, str | None] = {
    "vocab": mesh_lib.MODEL,
    "embed": mesh_lib.DATA,       # FSDP: every matrix has an embed dimension
    "heads": mesh_lib.MODEL,
    "head_dim": None,
    "mlp": mesh_lib.MODEL,
    "norm": None,                 # RMSNorm scales: tiny, kept whole on every device
    "experts": mesh_lib.EXPERT,
    "layers": None,
}

# Logical activation axis -> mesh axis. `embed` is not here: activations keep the model
# dimension whole (FSDP gathers weights, not activations).
ACTIVATION_RULES: dict[str, str | tuple | None] = {
    # The expert axis also splits the batch: outside the MoE's experts its devices are data
    # parallel (GShard), and each routes its own tokens.
    "batch": (mesh_lib.DATA, mesh_lib.EXPERT),
    # Context parallelism: the sequence over `context` everywhere (ring attention moves the
    # keys and values; everything else is position-wise).
    "length": mesh_lib.CONTEXT,
    "heads": mesh_lib.MODEL,
    "mlp": mesh_lib.MODEL,
    "vocab": mesh_lib.MODEL,
}

# The config key behind each logical dimension, for error messages.
_MODEL_KEYS = {"vocab": "model.vocab_size", "embed": "model.d_model", "heads": "model.num_heads",
               "mlp": "model.ffn_dim", "head_dim": "model.head_dim",
               "experts": "model.moe.num_experts"}


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def spec_for(names: Sequence[str | None], mesh: Mesh, rules: dict = PARAM_RULES,
             shape: Sequence[int] | None = None, what: str = "an array") -> P:
  """The PartitionSpec of one array from its logical names (see the module docstring)."""
  out, used = [], set()
  for i, name in enumerate(names):
    if name is not None and name not in rules:
      raise ValueError(f"{what} has the logical axis {name!r}, which the rule table does not "
                       f"know; known: {sorted(rules)}")
    axis = rules.get(name) if name is not None else None
    if axis is None or mesh_lib.axis_size(mesh, axis) == 1 or axis in used:
      out.append(None)
      continue
    n = mesh_lib.axis_size(mesh, axis)
    if shape is not None and shape[i] % n:
      key = _MODEL_KEYS.get(name, f"the {name!r} dimension")
      raise ValueError(f"{what} has {name}={shape[i]} ({key}), which mesh.{axis}={n} does not "
                       f"divide; choose mesh.{axis} dividing {shape[i]}")
    used.add(axis)
    out.append(axis)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_specs(mesh: Mesh, params: PyTree, logical: PyTree | None) -> PyTree:
  """A PartitionSpec per parameter leaf (no worker axis), from the logical names tree (one
  tuple per leaf, e.g. `model.logical_axes(params)`); None: every leaf replicated."""
  if logical is None:
    return jax.tree.map(lambda _: P(), params)
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  names = jax.tree.leaves(logical, is_leaf=_is_names)
  if len(names) != len(paths):
    raise ValueError(f"the logical axes name {len(names)} leaves but the params have "
                     f"{len(paths)}")
  specs = [spec_for(n, mesh, PARAM_RULES, x.shape, f"the parameter {jax.tree_util.keystr(k)}")
           for (k, x), n in zip(paths, names)]
  return jax.tree.unflatten(jax.tree.structure(params), specs)


def per_worker(spec: P) -> P:
  """The spec of a leaf with a leading [M] worker dimension."""
  return P(mesh_lib.WORKER, *spec)


def is_spec(x) -> bool:
  return isinstance(x, P)


def opt_state_specs(opt: optax.GradientTransformation, params: PyTree, specs: PyTree) -> PyTree:
  """The specs of `opt.init(params)`: every params-shaped sub-tree (Adam's moments, momentum)
  takes the params' specs; scalars (step counts) are replicated."""
  state = jax.eval_shape(opt.init, params)
  return optax.tree_utils.tree_map_params(opt, lambda _, s: s, state, specs,
                                          transform_non_params=lambda _: P(),
                                          is_leaf=is_spec)


def named(mesh: Mesh, specs: PyTree, memory_kind: str | None = None) -> PyTree:
  """NamedShardings for a tree of PartitionSpecs (optionally in another memory space, e.g.
  "pinned_host")."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s, memory_kind=memory_kind), specs,
                      is_leaf=is_spec)


def local_shape(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
  """The shape of one device's shard of an array of `shape` under `spec`."""
  out = list(shape)
  for i, axes in enumerate(spec):
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None:
        out[i] //= mesh_lib.axis_size(mesh, a)
  return tuple(out)


class ActivationSharding:
  """The `constrain(x, names)` hook for `model.apply` on a mesh: a sharding constraint from the
  activation rules (under the algorithm's vmap over workers, the worker axis is prepended by
  `spmd_axis_name`). A dimension its axes do not divide is left unconstrained; axes of size 1
  are dropped. `mesh` is what layers that place work themselves (the MoE's expert parallelism)
  read."""

  def __init__(self, mesh: Mesh, rules: dict = ACTIVATION_RULES):
    self.mesh, self.rules = mesh, rules

  def __call__(self, x: jax.Array, names: tuple) -> jax.Array:
    if mesh_lib.devices_per_worker(self.mesh) == 1:
      # Nothing to place inside a one-device worker; and there the algorithm runs the model
      # inside a shard_map over the workers (`algorithm.over_workers`), where a constraint on
      # the whole mesh is not allowed.
      return x
    out, used = [], set()
    for size, name in zip(x.shape, names):
      axes = self.rules.get(name) if name is not None else None
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      axes = tuple(a for a in axes if mesh_lib.axis_size(self.mesh, a) > 1 and a not in used)
      n = math.prod(mesh_lib.axis_size(self.mesh, a) for a in axes)
      if not axes or size % n:
        out.append(None)
        continue
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*out)))


def activation_constraint(mesh: Mesh, rules: dict = ACTIVATION_RULES) -> ActivationSharding:
  """The `constrain` hook of `model.apply` / `model.loss_fn` for this mesh."""
  return ActivationSharding(mesh, rules)
