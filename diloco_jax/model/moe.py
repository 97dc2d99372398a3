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
  keeps only the residual path. Tokens are scattered into an [E, C, D] buffer and gathered
  back (static shapes; the experts compute E·C rows). The tests state the same routing as
  GShard's one-hot dispatch/combine tensors [T, E, C] and compare the two.
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

from jax.sharding import PartitionSpec as P

from diloco_jax.mesh import DATA, EXPERT
from diloco_jax.model.layers import _no_constraint, _normal

COMBINES = ("topk_softmax", "softmax_topk")
DISPATCHES = ("capacity", "dropless")
GROUPED_MATMULS = ("ragged_dot", "megablox", "megablox_interpret")
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
  grouped_matmul: str = "ragged_dot"  # dropless: "ragged_dot", "megablox" (TPU kernel) or
                                      # "megablox_interpret" (the kernel interpreted, for tests)
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
                          ("dispatch", DISPATCHES), ("grouped_matmul", GROUPED_MATMULS)):
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


def capacity_positions(experts_TxK: jax.Array, num_experts: int, C: int):
  """Each assignment's position in its expert's buffer, and whether it fits (position < C):
  (position [T, k] int32, kept [T, k] bool). Priority: every token's j-th choice before any
  (j+1)-th, then token order."""
  T, k = experts_TxK.shape
  onehot = jax.nn.one_hot(experts_TxK.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k·T, E]
  # Assignments before this one (in priority order) that chose the same expert.
  position_KxT = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=-1).reshape(k, T)
  return position_KxT.T, position_KxT.T < C


def router_agreement(experts_MxNxTxK: jax.Array, routers_MxNxDxE: jax.Array) -> dict:
  """How far M workers' routers have drifted apart, for N MoE blocks: per block [N],
    topk_overlap: mean over worker pairs and tokens of |S_m ∩ S_n| / k, S_m the k experts
      worker m picks for a token (the same tokens for every worker): 1 when they agree;
    distance: mean over worker pairs of ‖W_m − W_n‖_F / mean_m ‖W_m‖_F (0 right after a sync
      with α = 0)."""
  M, _, _, k = experts_MxNxTxK.shape
  pairs = [(m, n) for m in range(M) for n in range(m + 1, M)]
  if not pairs:
    zero = jnp.zeros(experts_MxNxTxK.shape[1], jnp.float32)
    return {"topk_overlap": zero + 1.0, "distance": zero}
  overlap, distance = [], []
  norms_MxN = jnp.sqrt(jnp.sum(jnp.square(routers_MxNxDxE), axis=(-2, -1)))
  for m, n in pairs:
    a, b = experts_MxNxTxK[m], experts_MxNxTxK[n]   # [N, T, k]
    shared_NxT = jnp.sum(a[..., :, None] == b[..., None, :], axis=(-2, -1))
    overlap.append(jnp.mean(shared_NxT / k, axis=-1))
    diff = jnp.sqrt(jnp.sum(jnp.square(routers_MxNxDxE[m] - routers_MxNxDxE[n]), axis=(-2, -1)))
    distance.append(diff / jnp.mean(norms_MxN, axis=0))
  return {"topk_overlap": jnp.mean(jnp.stack(overlap), 0),
          "distance": jnp.mean(jnp.stack(distance), 0)}


# ------------------------------------------------------------------------- grouped matmuls
def grouped_matmul(x_AxD: jax.Array, w_ExDxF: jax.Array, group_sizes_E: jax.Array,
                   impl: str = "ragged_dot") -> jax.Array:
  """Rows of x sorted by group (rows past sum(group_sizes) give zeros), row block e times w[e].

  "ragged_dot": `jax.lax.ragged_dot`; "megablox" / "megablox_interpret": the Pallas TPU kernel
  (`megablox.gmm`), the latter in interpret mode so it runs (slowly) on CPU for tests. The
  kernel tiles rows by tm, so the rows are padded to a multiple of it (the pad lies past the
  groups and is cut off again)."""
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_AxD, w_ExDxF, group_sizes_E)
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # TPU kernel; imported on use
  A, D = x_AxD.shape
  F = w_ExDxF.shape[-1]
  # The kernel leaves rows past the groups unwritten (garbage, NaN in interpret mode), in the
  # output and in its backward's dx: select them away on both sides (`where`, not a product,
  # so a NaN there cannot leak); callers rely on zeros there (ragged_dot's semantics).
  in_group = (jnp.arange(A) < jnp.sum(group_sizes_E))[:, None]
  x_AxD = jnp.where(in_group, x_AxD, 0)
  tm = 128 if A >= 128 else max(8, -(-A // 8) * 8)
  padded = -(-A // tm) * tm
  x_pad = jnp.pad(x_AxD, ((0, padded - A), (0, 0)))
  out = gmm(x_pad, w_ExDxF, group_sizes_E, preferred_element_type=x_AxD.dtype,
            tiling=(tm, math.gcd(D, 128), math.gcd(F, 128)),
            interpret=impl == "megablox_interpret")
  return jnp.where(in_group, out[:A], 0)


# ------------------------------------------------------------------------------------- layer
class MoE(nnx.Module):
  """The sparse feed-forward: x [B, L, D] -> (y [B, L, D], aux). Weights: `router` [D, E]
  (float32), `experts_up` / `experts_gate` (SwiGLU) [E, D, F], `experts_down` [E, F, D], and
  with a shared expert `shared_up` / `shared_gate` [D, F], `shared_down` [F, D].

  Expert parallelism: when `constrain` carries a mesh (`sharding.ActivationSharding`) whose
  `expert` axis has more than one device, the routed part runs inside `shard_map`: each device
  routes its own tokens (the batch is split over the data and expert axes), holds E/X of the
  experts (X = the expert axis size), and the capacity path exchanges the dispatched tokens by
  all-to-all over the expert axis and back; the dropless path all-gathers the tokens of the X
  devices, runs its own experts' grouped matmuls and reduce-scatters the partial outputs (static
  shapes without a worst-case buffer). Nothing crosses the worker axis. Capacity is then per
  device group (GShard's groups): C = ceil(k·T_device/E · factor).
  """

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

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint, *, train: bool = True):
    moe = self.moe
    dt = x_BxLxD.dtype
    B, L, D = x_BxLxD.shape
    experts = ([self.experts_gate[...].astype(dt)] if moe.mlp == "swiglu" else []) + [
        self.experts_up[...].astype(dt), self.experts_down[...].astype(dt)]
    factor = moe.capacity_factor if train else moe.eval_capacity_factor
    mesh = getattr(constrain, "mesh", None)
    if mesh is not None and mesh.shape[EXPERT] > 1:
      y_BxLxD, aux = _expert_parallel(mesh, moe, factor, x_BxLxD, self.router[...], experts)
    else:
      y_TxD, aux = routed(moe, factor, x_BxLxD.reshape(B * L, D), self.router[...], experts)
      y_BxLxD = y_TxD.reshape(B, L, D)
      aux["experts"] = aux["experts"].reshape(B, L, moe.top_k)
    if moe.shared_expert:
      sgate = self.shared_gate[...].astype(dt) if moe.mlp == "swiglu" else None
      y_BxLxD = y_BxLxD + _ffn(x_BxLxD, self.shared_up[...].astype(dt),
                               self.shared_down[...].astype(dt), sgate)
    return constrain(y_BxLxD, ("batch", None, None)), aux


def _ffn(x, up, down, gate=None):
  """An MLP on x [..., D] with weights up/gate [.., D, F], down [.., F, D] (batched over the
  leading expert dimension when the weights have one)."""
  h = x @ up
  h = jax.nn.silu(x @ gate) * h if gate is not None else jax.nn.gelu(h)
  return h @ down


def routed(moe: MoEConfig, factor: float, x_TxD: jax.Array, router_DxE: jax.Array,
           experts: list, expert_axis: str | None = None):
  """The routed experts on one group of T tokens: (y [T, D], aux). `experts`: [gate,] up, down
  with a leading expert dimension; inside shard_map with `expert_axis`, the local E/X experts
  (see `MoE`), else all E."""
  T, _ = x_TxD.shape
  E, k = moe.num_experts, moe.top_k
  dt = x_TxD.dtype
  # The router in float32: its softmax decides which weights a token trains.
  logits_TxE = x_TxD.astype(jnp.float32) @ router_DxE
  weights_TxK, experts_TxK, probs_TxE = route(logits_TxE, k, moe.combine)
  *gate, up, down = experts
  gate = gate[0] if gate else None
  if moe.dispatch == "capacity":
    C = capacity(T, E, k, factor)
    position_TxK, kept_TxK = capacity_positions(experts_TxK, E, C)
    # Row e·C + c of the experts' input buffer is slot c of expert e; an assignment over
    # capacity goes to one extra row that is never read. A scatter-add and a gather move
    # T·k·D values (GShard's one-hot dispatch/combine einsums would cost T·E·C·D).
    slot_TxK = jnp.where(kept_TxK, experts_TxK * C + position_TxK, E * C)
    D = x_TxD.shape[1]
    buffer = jnp.zeros((E * C + 1, D), dt).at[slot_TxK.reshape(-1)].add(
        jnp.repeat(x_TxD, k, axis=0))
    in_ExCxD = buffer[:E * C].reshape(E, C, D)
    if expert_axis is not None:   # to the experts' devices: [E, C, D] -> [E/X, X·C, D]
      in_ExCxD = jax.lax.all_to_all(in_ExCxD, expert_axis, 0, 1, tiled=True)
    out_ExCxD = _ffn(in_ExCxD, up, down, gate)   # batched over the expert dimension
    if expert_axis is not None:   # and back
      out_ExCxD = jax.lax.all_to_all(out_ExCxD, expert_axis, 1, 0, tiled=True)
    out_rows = jnp.concatenate([out_ExCxD.reshape(E * C, D), jnp.zeros((1, D), dt)])
    combine_TxK = jnp.where(kept_TxK, weights_TxK, 0.0).astype(dt)
    y_TxD = jnp.einsum("tk,tkd->td", combine_TxK, out_rows[slot_TxK])
    dropped = 1.0 - jnp.mean(kept_TxK.astype(jnp.float32))
  else:
    y_TxD = _dropless(moe, x_TxD, weights_TxK, experts_TxK, up, down, gate, expert_axis)
    dropped = jnp.zeros((), jnp.float32)
  aux = {"load_balance_loss": load_balance_loss(probs_TxE, experts_TxK),
         "router_z_loss": router_z_loss(logits_TxE),
         "expert_load": expert_load(experts_TxK, E),
         "dropped_fraction": dropped,
         "router_confidence": jnp.mean(jnp.max(probs_TxE, axis=-1)),
         "experts": experts_TxK,
         "mean_probs": jnp.mean(probs_TxE, axis=0)}   # P_e (the expert-parallel balance loss)
  return y_TxD, aux


def _dropless(moe, x_TxD, weights_TxK, experts_TxK, up, down, gate, expert_axis):
  """Sort the T·k assignments by expert, grouped matmuls, unsort, weighted sum over k. With an
  expert axis: every device takes all X groups' assignments, keeps those of its own E/X experts
  (the others sort past the groups and come out zero), and the partial sums are reduce-scattered
  back to the tokens' devices."""
  if expert_axis is not None:
    x_TxD, weights_TxK, experts_TxK = (jax.lax.all_gather(a, expert_axis, tiled=True)
                                       for a in (x_TxD, weights_TxK, experts_TxK))
  T, k = experts_TxK.shape
  E_local = up.shape[0]
  flat = experts_TxK.reshape(-1)
  if expert_axis is not None:
    flat = flat - jax.lax.axis_index(expert_axis) * E_local
    flat = jnp.where((flat >= 0) & (flat < E_local), flat, E_local)   # not ours: past the end
  order = jnp.argsort(flat, stable=True)
  x_AxD = x_TxD[order // k]   # assignment a = t·k + j belongs to token t
  group_sizes = jnp.bincount(flat, length=E_local).astype(jnp.int32)
  mm = lambda a, w: grouped_matmul(a, w, group_sizes, moe.grouped_matmul)
  h = mm(x_AxD, up)
  h = jax.nn.silu(mm(x_AxD, gate)) * h if gate is not None else jax.nn.gelu(h)
  out_AxD = mm(h, down)
  unsorted = jnp.zeros_like(out_AxD).at[order].set(out_AxD).reshape(T, k, -1)
  y_TxD = jnp.einsum("tk,tkd->td", weights_TxK.astype(out_AxD.dtype), unsorted)
  if expert_axis is not None:
    y_TxD = jax.lax.psum_scatter(y_TxD, expert_axis, tiled=True)
  return y_TxD


def _expert_parallel(mesh, moe: MoEConfig, factor: float, x_BxLxD, router_DxE, experts):
  """`routed` under shard_map: tokens split over (data, expert), experts over expert."""
  tokens = P((DATA, EXPERT))
  stats = ("router_z_loss", "expert_load", "dropped_fraction", "router_confidence",
           "mean_probs")

  def local(x_BxLxD, router_DxE, *experts):
    B, L, D = x_BxLxD.shape
    y_TxD, aux = routed(moe, factor, x_BxLxD.reshape(B * L, D), router_DxE, list(experts),
                        EXPERT)
    # Every group has the same T: the mean over groups is the mean over all tokens, so each
    # statistic and the balance loss E·Σ f_e·P_e (from the global f and P) equal the
    # unsharded layer's.
    out = {k: jax.lax.pmean(aux[k], (DATA, EXPERT)) for k in stats}
    out["load_balance_loss"] = moe.num_experts * jnp.sum(out["expert_load"] * out["mean_probs"])
    out["experts"] = aux["experts"].reshape(B, L, moe.top_k)
    return y_TxD.reshape(B, L, D), out

  out_aux = {**{k: P() for k in stats}, "load_balance_loss": P(), "experts": tokens}
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(tokens, P(), *[P(EXPERT)] * len(experts)),
                       out_specs=(tokens, out_aux))(x_BxLxD, router_DxE, *experts)
