"""The decoder: pre-norm blocks, embedding and (un)embedding, and the pure functions the rest of
the framework sees (`init_params`, `apply`, `param_count`, `logical_axes`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from diloco_jax import mesh as mesh_lib
from diloco_jax.model import ring
from diloco_jax.model.attention import Attention
from diloco_jax.model.config import _DTYPES, ModelConfig
from diloco_jax.model.layers import RMSNorm, _no_constraint, _normal, dense
from diloco_jax.model.mlp import Mlp
from diloco_jax.model.moe import MoE

# The logical name of every dimension of every parameter, keyed on the leaf's own name (the last
# entry of its path). Norm scales are tiny and stay replicated ("norm").
LOGICAL_AXES = {
    "embed": ("vocab", "embed"),                 # [V, D]
    "unembed": ("embed", "vocab"),               # [D, V]
    "wq": ("embed", "heads", "head_dim"),        # [D, H, K]
    "wk": ("embed", "heads", "head_dim"),
    "wv": ("embed", "heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),        # [H, K, D]
    "w_gate": ("embed", "mlp"),                  # [D, F]
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),                  # [F, D]
    "scale": ("norm",),                          # RMSNorm scales [D] or [K]
    # The sparse feed-forward (moe.py): the router is small and stays whole inside a worker.
    "router": ("embed", None),                   # [D, E]
    "experts_gate": ("experts", "embed", "mlp"),  # [E, D, F]
    "experts_up": ("experts", "embed", "mlp"),
    "experts_down": ("experts", "mlp", "embed"),  # [E, F, D]
    "shared_gate": ("embed", "mlp"),             # [D, F]
    "shared_up": ("embed", "mlp"),
    "shared_down": ("mlp", "embed"),             # [F, D]
}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); the feed-forward is the
  dense MLP or, in the blocks `cfg.moe_blocks` names, the sparse MoE (which also returns its
  auxiliaries: `__call__` gives (x, aux), aux = {} for a dense block)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, sparse: bool = False):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = MoE(cfg.d_model, cfg.ffn_dim, cfg.moe, rngs) if sparse else Mlp(cfg, rngs)

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint, train: bool = True,
               positions_BxL: jax.Array | None = None, segment_ids_BxL: jax.Array | None = None):
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), constrain, positions_BxL,
                                  segment_ids_BxL)
    if isinstance(self.mlp, MoE):
      y_BxLxD, aux = self.mlp(self.mlp_norm(x_BxLxD), constrain, train=train)
      return x_BxLxD + y_BxLxD, aux
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD), constrain), {}


class Transformer(nnx.Module):
  """tokens [B, L] int -> (logits [B, L, V] float32, aux), with optional positions and
  segment ids [B, L] int for packed documents (see `apply`). aux is {} for a dense model; with
  MoE blocks, aux["moe"] holds each MoE block's auxiliaries stacked in block order (leading
  dimension: the MoE blocks, `cfg.moe_blocks`): load_balance_loss, router_z_loss,
  dropped_fraction, router_confidence [n], expert_load and mean_probs [n, E], experts
  [n, B, L, k]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # Vocabulary-facing matrices use std 0.02 (GPT-2 style) so the initial logits are small and
    # the loss at init is close to log(vocab); the pre-norm blocks make the input scale irrelevant.
    self.embed = _normal(rngs, (cfg.vocab_size, cfg.d_model), 0.02)  # [V, D]
    sparse = cfg.moe_blocks
    self.blocks = nnx.List([Block(cfg, rngs, i in sparse) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    if not cfg.tied_embeddings:
      self.unembed = _normal(rngs, (cfg.d_model, cfg.vocab_size), 0.02)  # [D, V]

  def __call__(self, tokens_BxL: jax.Array, constrain=_no_constraint, train: bool = True,
               positions_BxL: jax.Array | None = None, segment_ids_BxL: jax.Array | None = None):
    dt = _DTYPES[self.cfg.dtype]
    # The lookup reads whole rows: gather from the table whole (under FSDP/TP it is all-gathered
    # like every other weight); XLA cannot gather from a vocab-sharded table without first
    # replicating it anyway.
    table_VxD = constrain(self.embed[...], (None, None))
    order = _context_order(self.cfg, constrain, tokens_BxL.shape[1])
    if order is not None:
      # Ring attention's load-balanced layout (ring.py): the sequence enters permuted, every
      # position-wise layer is indifferent to it, attention masks by (position, segment), and
      # the hidden states are put back in order before the unembedding.
      perm, _ = order
      if positions_BxL is None:
        positions_BxL = jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32)[None, :]
      positions_BxL = jnp.broadcast_to(positions_BxL, tokens_BxL.shape)[:, perm]
      tokens_BxL = tokens_BxL[:, perm]
      if segment_ids_BxL is not None:
        segment_ids_BxL = segment_ids_BxL[:, perm]
    x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dt)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", None))
    if self.cfg.remat == "block":
      x_BxLxD, moe_aux = self._scan_blocks(x_BxLxD, constrain, train, positions_BxL,
                                           segment_ids_BxL)
    else:
      auxes = []
      for block in self.blocks:
        x_BxLxD, aux = block(x_BxLxD, constrain, train, positions_BxL, segment_ids_BxL)
        auxes += [aux] if aux else []
      moe_aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else {}
    if order is not None:
      x_BxLxD = constrain(x_BxLxD[:, order[1]], ("batch", "length", None))
    x_BxLxD = self.final_norm(x_BxLxD)
    w_DxV = self.embed[...].T if self.cfg.tied_embeddings else self.unembed[...]
    # Accumulate in float32: the softmax over 32k classes and the z-loss need full precision.
    logits = dense(x_BxLxD, w_DxV.astype(dt), 1, constrain,
                   preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab")), ({"moe": moe_aux} if moe_aux else {})


  def _scan_blocks(self, x_BxLxD: jax.Array, constrain, train: bool, positions_BxL=None,
                   segment_ids_BxL=None):
    """The blocks as a scan over their stacked weights, each step under jax.checkpoint: the
    backward pass keeps only each block's input and recomputes the rest. (Unrolled blocks
    under jax.checkpoint do not save memory on XLA: its scheduler is free to run every
    recomputation early, which XLA:CPU does; a scan's loop orders them.) With MoE every n-th
    block, one scan step is a period of n blocks (n − 1 dense, then the sparse one), so the
    stacked weights have one structure. The params stay one dict per block (fragments are made
    of whole blocks): stacking them costs one copy of the blocks' weights, sharded like the
    weights themselves. Returns (x, aux stacked over the MoE blocks, {} for a dense model)."""
    n = self.cfg.moe.every if self.cfg.moe is not None else 1
    blocks = list(self.blocks)
    graphdefs = [nnx.split(b)[0] for b in blocks[:n]]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks[j::n]])
               for j in range(n)]

    def body(x, states):
      aux = {}
      for graphdef, state in zip(graphdefs, states):
        # positions and segments are closed over: constants of every step, not scanned.
        x, aux = nnx.merge(graphdef, state)(x, constrain, train, positions_BxL, segment_ids_BxL)
      return x, aux   # the period's last block is its only sparse one

    x_BxLxD, aux = jax.lax.scan(jax.checkpoint(body), x_BxLxD, stacked)
    return x_BxLxD, aux


def _context_order(cfg: ModelConfig, constrain, L: int):
  """(permutation, inverse) of the load-balanced sequence layout when ring attention runs over
  a context axis of more than one device (`ring.load_balance_permutation`), else None."""
  mesh = getattr(constrain, "mesh", None)
  if cfg.attention != "ring" or mesh is None or mesh_lib.axis_size(mesh, mesh_lib.CONTEXT) < 2:
    return None
  perm = ring.load_balance_permutation(L, mesh_lib.axis_size(mesh, mesh_lib.CONTEXT))
  return perm, ring.inverse_permutation(perm)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """A fresh params pytree: a plain nested dict of float32 arrays (see the module docstring)."""
  _, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=rng)))
  return nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig):
  """The module's graph definition and an allocation-free state, built once per config."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def apply(cfg: ModelConfig, params: dict, tokens_BxL: jax.Array,
          constrain=_no_constraint, *, train: bool = True, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Pure forward pass: (logits [B, L, V] float32, aux). Safe under jit, vmap and grad.

  Document packing (`diloco_jax.packing`): `positions` int [B, L] are the RoPE positions (None:
  0..L-1 in every row; packed, they restart at each document) and `segment_ids` int [B, L] the
  document of each token (None: one per row). Query i attends to key j iff j <= i and both
  have the same segment id, so nothing crosses a document boundary.

  aux is explicit (no side channel): {} for a dense model, {"moe": ...} with the MoE blocks'
  auxiliary losses and router statistics (see `Transformer`). `train=False` uses the MoE's
  eval capacity factor.

  `constrain(x, names)` is called on the activations with one logical name (or None) per
  dimension, e.g. ("batch", None, "heads", None); `sharding.activation_constraint` turns it
  into sharding constraints for a mesh (and carries the mesh the MoE's expert parallelism
  needs).
  """
  graphdef, abstract_state = _abstract(cfg)
  state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy: the cached one is never filled
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(tokens_BxL, constrain, train, positions, segment_ids)


@functools.lru_cache(maxsize=32)
def _shapes(cfg: ModelConfig) -> dict:
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes only (no allocation, fast even for the 4B config)."""
  return param_counts(cfg)[0]


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
  """(total, active) parameters: active counts k of the E experts of each MoE block (what one
  token passes through); equal for a dense model."""
  shapes = _shapes(cfg)
  total = sum(x.size for x in jax.tree.leaves(shapes))
  inactive = 0
  if cfg.moe is not None:
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    for i in cfg.moe_blocks:
      experts = [v for name, v in shapes["blocks"][i]["mlp"].items() if name.startswith("experts_")]
      inactive += sum(x.size for x in experts) // E * (E - k)
  return total, total - inactive


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Training FLOPs per token (forward + backward = 3 × forward) of the active computation:
  6 · (active matmul parameters: every weight matrix a token multiplies, the router and the
  output projection included, the embedding lookup and the norm scales not) + 12 · layers ·
  seq_len · heads · head_dim (the attention scores and their weighted sum, causal half not
  skipped). The capacity path's dispatch/combine einsums and its padding are not counted."""
  _, active = param_counts(cfg)
  norms = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(_shapes(cfg))[0]
              if _key_name(path[-1]) == "scale")
  matmul = active - norms - (0 if cfg.tied_embeddings else cfg.vocab_size * cfg.d_model)
  return 6 * matmul + 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def logical_axes(params: dict) -> dict:
  """The logical axis names of every leaf of a params tree (arrays or ShapeDtypeStructs), a
  tree of tuples with one name per dimension (see LOGICAL_AXES)."""
  def names(path, leaf):
    key = _key_name(path[-1])
    if key not in LOGICAL_AXES or len(LOGICAL_AXES[key]) != len(leaf.shape):
      raise ValueError(f"no logical axes for the parameter {jax.tree_util.keystr(path)} of "
                       f"shape {tuple(leaf.shape)}")
    return LOGICAL_AXES[key]
  return jax.tree_util.tree_map_with_path(names, params)


def _key_name(entry) -> object:
  """The raw key of one path entry (dict key or sequence index)."""
  return getattr(entry, "key", getattr(entry, "idx", entry))
