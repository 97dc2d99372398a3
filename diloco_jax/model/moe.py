"""Sparse mixture-of-experts feed-forward (SPEC §6.1: Switch, ST-MoE, GShard, Mixtral).

    router logits = x @ W_r            (float32, W_r [D, E], small init)
    top-k experts per token, combine weights: softmax over the k chosen logits ("topk_softmax",
      Mixtral; the default) or the full softmax's probabilities at the k chosen ("softmax_topk",
      Switch/GShard)
    y = Σ_j w_j · FFN_{e_j}(x)         (each expert a SwiGLU or GELU MLP [E, D, F])
      [+ a shared expert: a dense MLP every token passes through]

Two dispatch paths behind one interface (`MoE.__call__`), the same maths:

* **capacity**: every expert takes at most C = ceil(k·T/E · capacity_factor) of the T tokens'
  T·k assignments, in priority order (all tokens' first choices before any second choice, then
  token order, as in Switch/T5X); an assignment over capacity gets zero weight, so its token
  keeps only the residual path. Dispatch and combine are one-hot einsums over [T, E, C]: dense,
  static shapes, the FLOPs of E·C tokens.
* **dropless**: the T·k assignments sorted by expert, `group_sizes = bincount`, and a grouped
  matmul (`jax.lax.ragged_dot`), unsorted and summed with the weights; nothing is dropped.
  XLA:CPU lowers ragged_dot densely (E× the FLOPs), so on CPU the capacity path is the honest
  compute comparison.

Auxiliary losses, returned with the statistics (never a hidden side channel):

* load balance (Switch eq. 4–6): E · Σ_e f_e · P_e with f_e the fraction of the T·k assignments
  routed to e (before capacity) and P_e the mean router probability of e: exactly 1 for a
  balanced router for any k (the count is divided by T·k), E for a collapsed top-1 router;
* router z-loss (ST-MoE): mean over tokens of logsumexp(logits)².
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diloco_jax.model.layers import _no_constraint, _normal

COMBINES = ("topk_softmax", "softmax_topk")
DISPATCHES = ("capacity", "dropless")
_ACTIVATIONS = ("swiglu", "gelu")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """`model.moe.*`: the sparse feed-forward's hyperparameters (hashable, jit closes over it)."""

  num_experts: int = 8             # E
  top_k: int = 2                   # k experts per token
  ffn_dim: int = 0                 # per-expert hidden size; 0: the dense model's ffn_dim
  every: int = 1                   # an MoE feed-forward in every `every`-th block
  mlp: str = "swiglu"              # each expert: "swiglu" or "gelu"
  shared_expert: bool = False      # plus a dense MLP that every token passes through
  combine: str = "topk_softmax"    # "topk_softmax" (Mixtral) or "softmax_topk" (Switch/GShard)
  dispatch: str = "capacity"       # "capacity" (token dropping) or "dropless" (grouped matmul)
  capacity_factor: float = 1.25    # training (T5X)
  eval_capacity_factor: float = 2.0
  router_init_scale: float = 0.1   # router std = scale / sqrt(D) (T5X scales it by 0.1)
  load_balance_weight: float = 0.01
  router_z_weight: float = 1e-3

  def __post_init__(self):
    for name in ("num_experts", "top_k", "every"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"model.moe.{name} must be an integer >= 1, got {v!r}")
    if self.top_k > self.num_experts:
      raise ValueError(f"model.moe.top_k={self.top_k} must be at most model.moe.num_experts="
                       f"{self.num_experts}")
    if not isinstance(self.ffn_dim, int) or isinstance(self.ffn_dim, bool) or self.ffn_dim < 0:
      raise ValueError(f"model.moe.ffn_dim must be an integer >= 0 (0: the dense ffn_dim), "
                       f"got {self.ffn_dim!r}")
    for name, allowed in (("mlp", _ACTIVATIONS), ("combine", COMBINES),
                          ("dispatch", DISPATCHES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.moe.{name} must be one of {allowed}, got "
                         f"{getattr(self, name)!r}")
    for name in ("capacity_factor", "eval_capacity_factor", "router_init_scale"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"model.moe.{name} must be a number > 0, got {v!r}")
    for name in ("load_balance_weight", "router_z_weight"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise ValueError(f"model.moe.{name} must be a number >= 0, got {v!r}")


# ------------------------------------------------------------------------------ routing (pure)
def route(logits_TxE: jax.Array, k: int, combine: str = "topk_softmax"):
  """Top-k routing. Returns (weights [T, k] f32, experts [T, k] int32, probs [T, E] f32)."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  top_TxK, experts_TxK = jax.lax.top_k(logits_TxE, k)
  if combine == "topk_softmax":
    weights_TxK = jax.nn.softmax(top_TxK, axis=-1)
  elif combine == "softmax_topk":
    weights_TxK = jnp.take_along_axis(probs_TxE, experts_TxK, axis=-1)
  else:
    raise ValueError(f"model.moe.combine must be one of {COMBINES}, got {combine!r}")
  return weights_TxK, experts_TxK.astype(jnp.int32), probs_TxE


def expert_load(experts_TxK: jax.Array, num_experts: int) -> jax.Array:
  """f_e: the fraction of the T·k routed assignments that went to each expert [E]."""
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_TxK.reshape(-1)].add(1.0)
  return counts_E / experts_TxK.size


def load_balance_loss(probs_TxE: jax.Array, experts_TxK: jax.Array) -> jax.Array:
  """E · Σ_e f_e · P_e (Switch): 1 for a balanced router (any k), E for a collapsed top-1 one."""
  E = probs_TxE.shape[-1]
  return E * jnp.sum(expert_load(experts_TxK, E) * jnp.mean(probs_TxE, axis=0))


def router_z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)²."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)))


def capacity(num_tokens: int, num_experts: int, k: int, factor: float) -> int:
  """C = ceil(k·T/E · factor), at least 1."""
  return max(1, math.ceil(k * num_tokens / num_experts * factor))


def capacity_masks(weights_TxK: jax.Array, experts_TxK: jax.Array, num_experts: int, C: int):
  """Dispatch [T, E, C] (0/1) and combine [T, E, C] (the weights) tensors, and the kept mask
  [T, k]. Priority: every token's j-th choice before any (j+1)-th, then token order."""
  T, k = experts_TxK.shape
  onehot_KxTxE = jax.nn.one_hot(experts_TxK.T, num_experts, dtype=jnp.int32)
  # Position of each assignment in its expert's buffer: assignments before it (in priority
  # order) that chose the same expert.
  flat = onehot_KxTxE.reshape(k * T, num_experts)
  position_KxT = (jnp.sum((jnp.cumsum(flat, axis=0) - flat) * flat, axis=-1)).reshape(k, T)
  kept_KxT = position_KxT < C
  slot_KxTxC = jax.nn.one_hot(jnp.where(kept_KxT, position_KxT, C), C, dtype=jnp.float32)
  dispatch_KxTxExC = onehot_KxTxE.astype(jnp.float32)[..., None] * slot_KxTxC[:, :, None, :]
  dispatch_TxExC = jnp.sum(dispatch_KxTxExC, axis=0)
  combine_TxExC = jnp.einsum("kt,ktec->tec", weights_TxK.T.astype(jnp.float32),
                             dispatch_KxTxExC)
  return dispatch_TxExC, combine_TxExC, kept_KxT.T


# ------------------------------------------------------------------------------------- layer
class MoE(nnx.Module):
  """The sparse feed-forward: x [B, L, D] -> (y [B, L, D], aux). Weights: `router` [D, E]
  (float32), `experts_up` / `experts_gate` (SwiGLU) [E, D, F], `experts_down` [E, F, D], and
  with a shared expert `shared_up` / `shared_gate` [D, F], `shared_down` [F, D]."""

  def __init__(self, d_model: int, ffn_dim: int, moe: MoEConfig, rngs: nnx.Rngs):
    E, D = moe.num_experts, d_model
    F = moe.ffn_dim or ffn_dim
    self.moe = moe
    self.router = _normal(rngs, (D, E), moe.router_init_scale * D**-0.5)
    if moe.mlp == "swiglu":
      self.experts_gate = _normal(rngs, (E, D, F), D**-0.5)
    self.experts_up = _normal(rngs, (E, D, F), D**-0.5)
    self.experts_down = _normal(rngs, (E, F, D), F**-0.5)
    if moe.shared_expert:
      if moe.mlp == "swiglu":
        self.shared_gate = _normal(rngs, (D, F), D**-0.5)
      self.shared_up = _normal(rngs, (D, F), D**-0.5)
      self.shared_down = _normal(rngs, (F, D), F**-0.5)

  def _ffn(self, x, up, down, gate=None):
    """An MLP on x [..., D] with weights up/gate [.., D, F], down [.., F, D] (batched over the
    leading expert dimension when the weights have one)."""
    h = x @ up
    h = jax.nn.silu(x @ gate) * h if gate is not None else jax.nn.gelu(h)
    return h @ down

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint, *, train: bool = True):
    moe = self.moe
    dt = x_BxLxD.dtype
    B, L, D = x_BxLxD.shape
    E, k = moe.num_experts, moe.top_k
    x_TxD = x_BxLxD.reshape(B * L, D)
    # The router in float32: its softmax decides which weights a token trains.
    logits_TxE = x_TxD.astype(jnp.float32) @ self.router[...]
    weights_TxK, experts_TxK, probs_TxE = route(logits_TxE, k, moe.combine)
    gate = self.experts_gate[...].astype(dt) if moe.mlp == "swiglu" else None
    up, down = self.experts_up[...].astype(dt), self.experts_down[...].astype(dt)
    if moe.dispatch == "capacity":
      C = capacity(B * L, E, k, moe.capacity_factor if train else moe.eval_capacity_factor)
      dispatch_TxExC, combine_TxExC, kept_TxK = capacity_masks(weights_TxK, experts_TxK, E, C)
      in_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC.astype(dt), x_TxD)
      out_ExCxD = self._ffn(in_ExCxD, up, down, gate)   # batched over the expert dimension
      y_TxD = jnp.einsum("tec,ecd->td", combine_TxExC.astype(dt), out_ExCxD)
      dropped = 1.0 - jnp.mean(kept_TxK.astype(jnp.float32))
    else:
      y_TxD = self._dropless(x_TxD, weights_TxK, experts_TxK, up, down, gate)
      dropped = jnp.zeros((), jnp.float32)
    if moe.shared_expert:
      sgate = self.shared_gate[...].astype(dt) if moe.mlp == "swiglu" else None
      y_TxD = y_TxD + self._ffn(x_TxD, self.shared_up[...].astype(dt),
                                self.shared_down[...].astype(dt), sgate)
    load_E = expert_load(experts_TxK, E)
    aux = {"load_balance_loss": load_balance_loss(probs_TxE, experts_TxK),
           "router_z_loss": router_z_loss(logits_TxE),
           "expert_load": load_E,
           "dropped_fraction": dropped,
           "router_confidence": jnp.mean(jnp.max(probs_TxE, axis=-1))}
    return constrain(y_TxD.reshape(B, L, D), ("batch", None, None)), aux

  def _dropless(self, x_TxD, weights_TxK, experts_TxK, up, down, gate):
    """Sort the T·k assignments by expert, grouped matmuls, unsort, weighted sum over k."""
    T, k = experts_TxK.shape
    E = up.shape[0]
    flat_experts = experts_TxK.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    tokens = order // k   # assignment a = t·k + j belongs to token t
    x_AxD = x_TxD[tokens]
    group_sizes = jnp.bincount(flat_experts, length=E).astype(jnp.int32)
    h = jax.lax.ragged_dot(x_AxD, up, group_sizes)
    if gate is not None:
      h = jax.nn.silu(jax.lax.ragged_dot(x_AxD, gate, group_sizes)) * h
    else:
      h = jax.nn.gelu(h)
    out_AxD = jax.lax.ragged_dot(h, down, group_sizes)
    unsorted = jnp.zeros_like(out_AxD).at[order].set(out_AxD).reshape(T, k, -1)
    return jnp.einsum("tk,tkd->td", weights_TxK.astype(out_AxD.dtype), unsorted)
