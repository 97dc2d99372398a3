"""Tests for diloco_jax.model: parameter counts, causality, RoPE, loss, vmap, training, config."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diloco_jax import model

TINY = model.config_from_preset("tiny")
SEQ = 16


def expected_count(cfg: model.ModelConfig) -> int:
  """Parameter count written out from the architecture (no biases)."""
  D, H, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
  attention = 4 * D * H * K + 2 * K  # wq, wk, wv, wo + q/k RMSNorm scales
  mlp = (3 if cfg.mlp == "swiglu" else 2) * D * F
  block = attention + mlp + 2 * D  # + pre-attention and pre-MLP RMSNorm scales
  vocab = V * D * (1 if cfg.tied_embeddings else 2)
  return vocab + cfg.num_layers * block + D  # + final RMSNorm


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
  return jax.random.randint(jax.random.key(1), (2, SEQ + 1), 0, TINY.vocab_size, jnp.int32)


@functools.cache
def jitted_apply(cfg):
  return jax.jit(lambda p, t: model.apply(cfg, p, t)[0])


# --- parameter counts -------------------------------------------------------------------------


def test_tiny_param_count_exact(params):
  # 512*64 embed + 2 * (4*64*64 + 2*16 + 3*64*256 + 2*64) + 64 final norm.
  assert model.param_count(TINY) == 164_224
  assert sum(x.size for x in jax.tree.leaves(params)) == 164_224


@pytest.mark.parametrize("name", ["35M", "100M", "200M", "300M", "500M", "1B", "4B"])
def test_paper_preset_counts_match_formula(name):
  cfg = model.config_from_preset(name)
  layers, d_model = {"35M": (6, 512), "100M": (9, 768), "200M": (12, 1024), "300M": (15, 1280),
                     "500M": (18, 1536), "1B": (24, 2048), "4B": (36, 3072)}[name]
  assert (cfg.num_layers, cfg.d_model, cfg.ffn_dim) == (layers, d_model, 4 * d_model)
  assert (cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (d_model // 64, 64, 32768)
  assert model.param_count(cfg) == expected_count(cfg)


def test_35m_and_1b_sizes():
  n35 = model.param_count(model.config_from_preset("35M"))
  assert n35 == 32768 * 512 + 6 * (12 * 512**2 + 2 * 512 + 2 * 64) + 512
  assert abs(n35 - 35e6) / 35e6 < 0.05
  n1b = model.param_count(model.config_from_preset("1B"))
  print(f"1B preset: {n1b:,} parameters")
  assert n1b >= 1.0e9 and n1b <= 1.5e9


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("tied", [True, False])
def test_variants_run_and_count(mlp, tied, batch):
  cfg = model.config_from_preset("tiny", mlp=mlp, tied_embeddings=tied)
  p = model.init_params(cfg, jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(p)) == model.param_count(cfg) == expected_count(cfg)
  assert ("unembed" in p) == (not tied)
  assert ("w_gate" in p["blocks"][0]["mlp"]) == (mlp == "swiglu")
  loss, _ = model.loss_fn(cfg, p, batch)
  assert np.isfinite(float(loss))


# --- params layout ----------------------------------------------------------------------------


def test_params_layout(params):
  assert isinstance(params, dict)
  assert set(params) == {"embed", "blocks", "final_norm"}
  assert list(params["blocks"]) == list(range(TINY.num_layers))  # integer keys 0..L-1
  assert set(params["blocks"][0]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  # Blocks are distinct (not one stacked or shared array).
  assert not np.array_equal(params["blocks"][0]["attn"]["wq"], params["blocks"][1]["attn"]["wq"])


def test_apply_matches_module(params, batch):
  from flax import nnx
  module = model.Transformer(TINY, rngs=nnx.Rngs(params=jax.random.key(0)))
  logits, aux = model.apply(TINY, params, batch[:, :-1])
  assert logits.shape == (2, SEQ, TINY.vocab_size) and logits.dtype == jnp.float32
  assert aux == {}   # a dense model has no auxiliaries
  np.testing.assert_array_equal(module(batch[:, :-1])[0], logits)


# --- causality and positions ------------------------------------------------------------------


def test_causal(params, batch):
  tokens = batch[:, :-1]
  j = 9
  changed = tokens.at[:, j].set((tokens[:, j] + 1) % TINY.vocab_size)
  a, b = jitted_apply(TINY)(params, tokens), jitted_apply(TINY)(params, changed)
  np.testing.assert_allclose(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
  assert np.all(np.abs(a[:, j:] - b[:, j:]).max(axis=-1) > 1e-4)  # every later position sees it


def test_rope_scores_depend_only_on_offset():
  # The same q and k at every position: after RoPE, q_m . k_n must be a function of m - n only.
  K, L = 16, 12
  q = jax.random.normal(jax.random.key(2), (K,))
  k = jax.random.normal(jax.random.key(3), (K,))
  rq = model.layers._rope(jnp.broadcast_to(q, (1, L, 1, K)), 10000.0)[0, :, 0]
  rk = model.layers._rope(jnp.broadcast_to(k, (1, L, 1, K)), 10000.0)[0, :, 0]
  s_LxL = np.asarray(rq @ rk.T, np.float64)
  for m in range(L - 1):
    for n in range(L - 1):
      assert abs(s_LxL[m + 1, n + 1] - s_LxL[m, n]) < 1e-4
  # ...and it really rotates: scores differ across offsets, norms are preserved, position 0 is
  # left untouched.
  assert abs(s_LxL[3, 0] - s_LxL[0, 0]) > 1e-2
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)
  np.testing.assert_allclose(rq[0], q, rtol=1e-6)


def test_model_uses_order_of_earlier_tokens(monkeypatch):
  # In a one-layer model without positions, the last position's output would be a function of
  # the *set* of earlier tokens (attention is permutation-invariant over keys), so swapping two
  # earlier tokens could not change it. With RoPE it must.
  cfg = model.config_from_preset("tiny", num_layers=1)
  p = model.init_params(cfg, jax.random.key(4))
  tokens = jnp.arange(3, 3 + SEQ, dtype=jnp.int32)[None]
  swapped = tokens.at[0, 1].set(tokens[0, 4]).at[0, 4].set(tokens[0, 1])
  a, b = model.apply(cfg, p, tokens)[0][0, -1], model.apply(cfg, p, swapped)[0][0, -1]
  assert float(jnp.abs(a - b).max()) > 1e-3
  # Check of the argument itself: with RoPE replaced by the identity the swap is invisible.
  monkeypatch.setattr(model.attention, "_rope", lambda x, base: x)
  a0, b0 = model.apply(cfg, p, tokens)[0][0, -1], model.apply(cfg, p, swapped)[0][0, -1]
  np.testing.assert_allclose(a0, b0, atol=1e-5)


# --- loss -------------------------------------------------------------------------------------


def test_loss_at_init(params, batch):
  loss, aux = model.loss_fn(TINY, params, batch)
  assert loss.dtype == aux["ce"].dtype == aux["z_loss"].dtype == jnp.float32
  assert abs(float(aux["ce"]) - math.log(TINY.vocab_size)) < 0.5
  logits = np.asarray(model.apply(TINY, params, batch[:, :-1])[0], np.float64)
  mx = logits.max(-1, keepdims=True)
  lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
  targets = np.asarray(batch[:, 1:])
  ce = np.mean(lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
  np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(aux["z_loss"]), TINY.z_loss * np.mean(lse**2), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(aux["ce"]) + float(aux["z_loss"]), rtol=1e-6)
  _, aux0 = model.loss_fn(model.config_from_preset("tiny", z_loss=0.0), params, batch)
  assert float(aux0["z_loss"]) == 0.0


def test_bfloat16_compute(params, batch):
  cfg = model.config_from_preset("tiny", dtype="bfloat16")
  logits = model.apply(cfg, params, batch[:, :-1])[0]
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, model.apply(TINY, params, batch[:, :-1])[0], atol=0.1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.init_params(cfg, jax.random.key(0))))


def test_vmap_over_workers_equals_separate_applies(batch):
  params2 = [model.init_params(TINY, jax.random.key(s)) for s in (10, 11)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params2)
  batches = jnp.stack([batch, jnp.flip(batch, axis=1)])
  vloss = jax.jit(jax.vmap(lambda p, b: model.loss_fn(TINY, p, b)))
  losses, aux = vloss(stacked, batches)
  assert losses.shape == (2,) and aux["ce"].shape == (2,)
  for w in range(2):
    loss_w, aux_w = model.loss_fn(TINY, params2[w], batches[w])
    np.testing.assert_allclose(losses[w], loss_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux["ce"][w], aux_w["ce"], rtol=1e-6, atol=1e-6)
  assert abs(float(losses[0] - losses[1])) > 1e-4  # the two workers really differ


def test_adam_steps_decrease_loss(params, batch):
  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    (loss, _), g = jax.value_and_grad(lambda p: model.loss_fn(TINY, p, batch), has_aux=True)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  p, s = params, opt.init(params)
  losses = []
  for _ in range(8):
    p, s, loss = step(p, s)
    losses.append(float(loss))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 1.0, losses
  assert jax.tree.structure(p) == jax.tree.structure(params)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (dict(mlp="relu"), "model.mlp"),
    (dict(d_model=65), "model.d_model"),
    (dict(num_layers=0), "model.num_layers"),
    (dict(vocab_size=-1), "model.vocab_size"),
    (dict(head_dim=7), "model.head_dim"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(z_loss=-1.0), "model.z_loss"),
    (dict(remat="all"), "model.remat"),
])
def test_invalid_config(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    model.config_from_preset("tiny", **overrides)


def test_unknown_preset_lists_names():
  with pytest.raises(ValueError, match="tiny.*got 'huge'"):
    model.config_from_preset("huge")


def test_config_hashable_and_head_dim_default():
  assert TINY.head_dim == 16
  assert hash(TINY) == hash(model.config_from_preset("tiny"))
  assert model.config_from_preset("tiny", head_dim=32).head_dim == 32


# --- rematerialisation and logical axes -------------------------------------------------------


def test_remat_block_gives_the_same_loss_and_gradients(params, batch):
  remat = model.config_from_preset("tiny", remat="block")
  grad = lambda cfg: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(cfg, p, batch)[0]))(params)
  (l0, g0), (l1, g1) = grad(TINY), grad(remat)
  # The same maths, but two programs: XLA:CPU may order a sum differently inside the scan
  # (with YNNPACK's reductions off, mesh.py, entries differ by up to 2e-7 on gradients of
  # order 1e-3; with the suite's --xla_backend_optimization_level=0 the loss by one ulp), so
  # both are compared to fp32 accumulation error, not bit for bit.
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_block_keeps_only_block_inputs_for_the_backward_pass():
  """Compiled temporaries (XLA's buffer assignment, deterministic) of one gradient at L=256:
  per extra block, rematerialisation keeps the block's input and its stacked weights and
  gradient, not its attention scores and MLP activations."""
  def temp(layers, remat):
    cfg = model.config_from_preset("tiny", num_layers=layers, remat=remat)
    p = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    b = jax.ShapeDtypeStruct((4, 257), jnp.int32)
    f = jax.jit(jax.grad(lambda p, b: model.loss_fn(cfg, p, b)[0]))
    return f.lower(p, b).compile().memory_analysis().temp_size_in_bytes
  per_block = {r: temp(4, r) - temp(2, r) for r in ("none", "block")}
  scores = 4 * 4 * 256 * 256 * 4   # one block's [B, H, L, L] fp32 attention probabilities
  assert per_block["none"] > scores > per_block["block"] > 0, per_block


def test_logical_axes_name_every_dimension(params):
  names = model.logical_axes(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  got = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
  assert len(got) == len(leaves)
  for (path, x), n in zip(leaves, got):
    assert len(n) == x.ndim, (jax.tree_util.keystr(path), n)
  assert names["embed"] == ("vocab", "embed")
  assert names["blocks"][1]["mlp"]["w_down"] == ("mlp", "embed")
  with pytest.raises(ValueError, match=r"no logical axes for the parameter \['extra'\]"):
    model.logical_axes({**params, "extra": jnp.zeros((3,))})
