"""The model package: a decoder-only transformer (Flax NNX) with a pure apply on a params pytree.

The paper's model family (SPEC §4): pre-norm blocks of causal self-attention with QK-norm and
rotary positions, an MLP, RMSNorm everywhere, no biases, z-loss on the logits. The NNX module
defines the maths; the rest of the framework only sees `init_params` / `apply` / `loss_fn` on a
plain nested dict, so DiLoCo can vmap it over workers and slice it into fragments.

Params layout (the fragmenter keys on it): `params["blocks"][i]` for i = 0..num_layers-1 holds
block i; `embed`, `final_norm` and (untied only) `unembed` sit outside "blocks". Layers are
deliberately not scanned/stacked, so a fragment is a set of whole sub-dicts.

Sharding: `logical_axes(params)` names every dimension of every leaf (`vocab`, `embed`, `heads`,
`head_dim`, `mlp`, `norm`); `sharding.py` maps those names onto mesh axes. Activations are
named through the `constrain(x, names)` hook that `apply`/`loss_fn` take (default: none), so
the partitioner is told, not left to guess, where the batch, heads and MLP dimensions live.

Document packing: `apply(..., positions=, segment_ids=)` takes each token's RoPE position and
document id [B, L]; no query attends across a document (every attention implementation).

Modules: `config` (ModelConfig, presets), `layers` (RMSNorm, RoPE and its length scalings,
initialisers), `attention` (the layer; dense attention), `blockwise` (flash-style attention in
pure JAX), `kernels` (cuDNN and splash attention), `ring` (ring attention over the context
axis, with the causal load-balancing order), `mlp` (dense feed-forward), `moe` (sparse
mixture-of-experts feed-forward), `transformer` (blocks, `init_params`, `apply`,
`logical_axes`), `loss` (`loss_fn`).
"""

from diloco_jax.model.config import PRESETS, REMAT, ModelConfig, config_from_preset
from diloco_jax.model.layers import RMSNorm
from diloco_jax.model.loss import loss_fn
from diloco_jax.model.moe import MoEConfig
from diloco_jax.model.transformer import (LOGICAL_AXES, Block, Transformer, apply,
                                          flops_per_token, init_params, logical_axes,
                                          param_count, param_counts)

__all__ = ["PRESETS", "REMAT", "ModelConfig", "config_from_preset", "RMSNorm", "loss_fn",
           "MoEConfig", "LOGICAL_AXES", "Block", "Transformer", "apply", "flops_per_token",
           "init_params", "logical_axes", "param_count", "param_counts"]
