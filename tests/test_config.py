"""config.RunConfig: one frozen dataclass per section, built from the config files' ConfigDicts;
unknown keys and bad values are one sentence naming the full key; the files' conventions resolve
into typed values; building one starts no JAX backend."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from diloco_jax import build, config as config_lib, quantize, train
from diloco_jax import model as model_lib
from diloco_jax.config import (CheckpointConfig, ConfigError, DataConfig, DilocoConfig,
                               EvalConfig, MeshConfig, RunConfig, TrainConfig)
from tests import overrides as overrides_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import diloco as diloco_configs  # noqa: E402
import streaming as streaming_configs  # noqa: E402

FAMILIES = {"diloco": diloco_configs, "streaming": streaming_configs}


def _dict(family="diloco", **overrides) -> dict:
  """The family's tiny config as a plain dict with {"section.key": value} overrides (any key,
  any type: a ConfigDict would refuse some of the bad values tested here)."""
  return overrides_lib.apply(FAMILIES[family].get_config("tiny").to_dict(), overrides)


def _build(family="diloco", **overrides) -> RunConfig:
  return RunConfig.from_dict(_dict(family, **overrides))


# --------------------------------------------------------------------------- the two families
TINY_TRAIN = TrainConfig(num_steps=300, batch_size=8, learning_rate=3e-3, warmup_steps=30,
                         final_lr_fraction=0.05, weight_decay=None, b1=0.9, b2=0.99,
                         grad_clip=1.0, log_every=20)
TINY_REST = dict(data=DataConfig(source="synthetic", seq_len=64, vocab_size=128, num_classes=16),
                 eval=EvalConfig(every_steps=100, num_batches=4, batch_size=32, params="outer"),
                 checkpoint=CheckpointConfig(every_steps=100, max_to_keep=2),
                 mesh=MeshConfig(data=1, model=1, num_cpu_devices=0))


def test_every_section_builds_from_the_diloco_tiny_config():
  rc = config_lib.from_config_dict(diloco_configs.get_config("tiny"))
  assert rc == RunConfig(
      algorithm="diloco", seed=0, train=TINY_TRAIN, **TINY_REST,
      model=model_lib.ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4,
                                  ffn_dim=256, mlp="swiglu", tied_embeddings=True,
                                  dtype="float32", remat="none"),
      diloco=DilocoConfig(num_workers=4, inner_steps=20, outer_optimizer="nesterov",
                          outer_lr=0.7, outer_momentum=0.9, offload_outer=False))
  # The DiLoCo family leaves Streaming's keys at their defaults: one fragment's worth, fp32.
  d = rc.diloco
  assert (d.overlap_steps, d.worker_overlap_steps, d.merge_alpha, d.wire) == (0, (), 0.0,
                                                                              "reference")
  assert d.quantizer == quantize.Codec("fp32", 32, False)
  assert d.taus == (0,)


def test_every_section_builds_from_the_streaming_tiny_config():
  rc = config_lib.from_config_dict(streaming_configs.get_config("tiny"))
  assert rc == RunConfig(
      algorithm="streaming", seed=0, train=TINY_TRAIN, **TINY_REST,
      model=model_lib.ModelConfig(vocab_size=128, num_layers=4, d_model=64, num_heads=4,
                                  ffn_dim=256),
      diloco=DilocoConfig(num_workers=4, inner_steps=30, outer_lr=0.7, outer_momentum=0.9,
                          layers_per_fragment=2, fragment_pattern="strided", overlap_steps=1,
                          worker_overlap_steps=(), merge_alpha=0.5, codec="fp4_e3m0",
                          codec_block_size=32, stochastic_rounding=False, error_feedback=False,
                          wire="reference"))
  assert rc.diloco.quantizer == quantize.Codec("fp4_e3m0", 32, False)
  assert rc.diloco.taus == (1,)


@pytest.mark.parametrize("family,arg", [("diloco", "35m"), ("streaming", "paper")])
def test_the_paper_configs_build_on_text(tmp_path, family, arg):
  (tmp_path / "a.txt").write_text("some text\n")
  (tmp_path / "b.txt").write_text("more text\n")
  c = FAMILIES[family].get_config(arg)
  c.data.paths = (str(tmp_path / "*.txt"),)
  rc = config_lib.from_config_dict(c)
  assert rc.data.files == (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
  assert rc.data.vocab == 256
  assert (rc.model.vocab_size, rc.model.num_layers, rc.model.d_model, rc.model.mlp) == (
      256, 6, 512, "gelu")
  assert (rc.diloco.num_workers, rc.diloco.inner_steps, rc.train.num_steps) == (
      2, 30 if family == "diloco" else 100, 88_000)


def test_a_json_round_trip_builds_the_same_config():
  """What evals read: WORKDIR/config.json, where tuples came back as lists."""
  for family in FAMILIES:
    c = FAMILIES[family].get_config("tiny")
    if family == "streaming":
      c.diloco.worker_overlap_steps = (1, 0, 2, 1)
    rc = config_lib.from_config_dict(c)
    again = RunConfig.from_dict(json.loads(c.to_json()))
    assert again == rc and hash(again) == hash(rc)
  assert again.diloco.worker_overlap_steps == (1, 0, 2, 1)


# ------------------------------------------------------------------------------ unknown keys
def test_an_unknown_key_is_named_with_the_allowed_keys():
  with pytest.raises(ConfigError, match=re.escape(
      "unknown key diloco.foo; allowed: codec, codec_block_size, delayed, drop_prob, eager, "
      "error_feedback, fragment_pattern, inner_steps, layers_per_fragment, merge_alpha, "
      "num_workers, offload_outer, outages, outer_lr, outer_lr_schedule, outer_momentum, "
      "outer_optimizer, "
      "overlap_steps, quarantine, rejoin_reset_inner_opt, router_sync_every, "
      "stochastic_rounding, wire, worker_overlap_steps") + "$"):
    _build(**{"diloco.foo": 1})
  with pytest.raises(ConfigError, match=re.escape(
      "unknown key mesh.ring; allowed: context, data, expert, model, num_cpu_devices") + "$"):
    _build(**{"mesh.ring": 2})
  with pytest.raises(ConfigError, match=re.escape(
      "unknown keys eval.a, eval.b; allowed: batch_size, every_steps, num_batches, params") + "$"):
    _build(**{"eval.b": 1, "eval.a": 1})
  with pytest.raises(ConfigError, match=re.escape(
      "unknown key optimizer; allowed: algorithm, checkpoint, data, diloco, eval, mesh, model, "
      "seed, train") + "$"):
    _build(optimizer="adam")


@pytest.mark.parametrize("section", list(config_lib.SECTIONS))
def test_an_unknown_key_is_an_error_in_every_section(section):
  allowed = sorted(f.name for f in dataclasses.fields(config_lib.SECTIONS[section]) if f.init)
  with pytest.raises(ConfigError, match=re.escape(
      f"unknown key {section}.foo; allowed: {', '.join(allowed)}") + "$"):
    _build(**{f"{section}.foo": 1})


def test_a_missing_required_key_is_named():
  c = _dict()
  del c["train"]["b1"]
  with pytest.raises(ConfigError, match=re.escape(
      "missing key train.b1; a config must set train.num_steps, train.batch_size, "
      "train.learning_rate, train.warmup_steps, train.final_lr_fraction, train.b1, train.b2, "
      "train.log_every") + "$"):
    RunConfig.from_dict(c)
  with pytest.raises(ConfigError, match=re.escape(
      "missing key model.preset; a config must set model.preset") + "$"):
    _build(model={})
  with pytest.raises(ConfigError, match=re.escape(
      "mesh must be a section of keys (a ConfigDict or dict), got 4") + "$"):
    _build(mesh=4)
  # A section left out entirely takes its defaults.
  c = _dict()
  del c["mesh"]
  assert RunConfig.from_dict(c).mesh == MeshConfig()


# ---------------------------------------------------------------- keys reach the built object
def test_the_new_keys_reach_the_run_config():
  rc = _build(**{"model.remat": "block", "diloco.offload_outer": True, "mesh.model": 2})
  assert rc.model.remat == "block"
  assert rc.diloco.offload_outer is True
  assert rc.mesh.model == 2
  assert build.cpu_devices_for(rc) == 4 * 1 * 2   # M * mesh.data * mesh.model
  assert build.cpu_devices_for(_build(**{"mesh.num_cpu_devices": 3})) == 3


def test_a_field_added_to_a_section_reaches_the_built_object(monkeypatch):
  """The construction is Section(**c.section): a new dataclass field is a new config key."""

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class MeshWithPipeline(MeshConfig):
    pipeline: int = 1

  monkeypatch.setitem(config_lib.SECTIONS, "mesh", MeshWithPipeline)
  assert _build(**{"mesh.pipeline": 4}).mesh == MeshWithPipeline(pipeline=4)
  assert _build().mesh.context == 1


# ---------------------------------------------------------------------------- bad values
BAD = [
    ("diloco", {"diloco.inner_steps": 0}, "diloco.inner_steps must be an integer >= 1, got 0"),
    ("diloco", {"diloco.num_workers": 2.0},
     "diloco.num_workers must be an integer >= 1, got 2.0"),
    ("diloco", {"diloco.outer_lr": 0.0}, "diloco.outer_lr must be > 0, got 0.0"),
    ("diloco", {"diloco.outer_optimizer": "lion"},
     "diloco.outer_optimizer must be one of ('nesterov', 'sgd', 'adam'), got 'lion'"),
    ("diloco", {"diloco.outer_lr_schedule": "linear"},
     "diloco.outer_lr_schedule must be one of ('constant', 'cosine'), got 'linear'"),
    ("diloco", {"diloco.offload_outer": "yes"},
     "diloco.offload_outer must be a bool (True or False), got 'yes'"),
    ("diloco", {"algorithm": "dp", "diloco.offload_outer": True},
     "diloco.offload_outer must be False for algorithm='dp' (it has no outer copy to offload)"),
    ("diloco", {"algorithm": "dp", "eval.params": "worker0"},
     "eval.params must be 'outer' for algorithm='dp' (it has no worker copies), got 'worker0'"),
    ("diloco", {"diloco.worker_overlap_steps": (1, 2, 1, 2)},
     "diloco.worker_overlap_steps must list one τ per worker (M=4) for algorithm='streaming', "
     "got (1, 2, 1, 2)"),
    ("diloco", {"model.remat": "all"}, "model.remat must be one of ('none', 'block'), got 'all'"),
    ("diloco", {"model.num_layers": -1}, "model.num_layers must be an integer >= 0, got -1"),
    ("diloco", {"model.preset": "7B"},
     "model.preset must be one of ('tiny', '35M', '100M', '200M', '300M', '500M', '1B', '4B'), "
     "got '7B'"),
    ("diloco", {"model.vocab_size": 100},
     "model.vocab_size=100 is smaller than the data's vocabulary (128); use 0 to take the data's"),
    ("diloco", {"mesh.model": 0}, "mesh.model must be an integer >= 1, got 0"),
    ("diloco", {"mesh.data": 3},
     "train.batch_size=8 must be divisible by mesh.data=3 (devices per worker)"),
    ("diloco", {"train.grad_clip": -1.0}, "train.grad_clip must be >= 0 (0: off), got -1.0"),
    ("diloco", {"train.b1": 1.0}, "train.b1 must be in [0, 1), got 1.0"),
    ("diloco", {"train.warmup_steps": -1}, "train.warmup_steps must be an integer >= 0, got -1"),
    ("diloco", {"data.num_classes": 200},
     "data.num_classes must be an integer between 1 and data.vocab_size (128), got 200"),
    ("diloco", {"data.source": "text", "data.paths": ()},
     "data.paths must name at least one file for data.source='text'"),
    ("diloco", {"checkpoint.max_to_keep": 0},
     "checkpoint.max_to_keep must be an integer >= 1, got 0"),
    ("diloco", {"seed": -1}, "seed must be an integer >= 0, got -1"),
    ("streaming", {"diloco.overlap_steps": 30},
     "diloco.overlap_steps (τ) must be an integer with 0 <= τ < diloco.inner_steps (H=30), "
     "got 30"),
    ("streaming", {"diloco.merge_alpha": 1.5},
     "diloco.merge_alpha (α) must be in [0, 1], got 1.5"),
    ("streaming", {"diloco.stochastic_rounding": 1},
     "diloco.stochastic_rounding must be a bool (True or False), got 1"),
    ("streaming", {"diloco.codec": "int4"},
     "diloco.codec must be one of ('fp32', 'bf16', 'fp8_e4m3', 'fp4_e2m1', 'fp4_e3m0'), "
     "got 'int4'"),
    ("streaming", {"diloco.layers_per_fragment": 3},
     "diloco.layers_per_fragment=3 must divide the number of blocks L=4; allowed values: "
     "[1, 2, 4]"),
    ("streaming", {"diloco.fragment_pattern": "zigzag"},
     "diloco.fragment_pattern must be one of ('strided', 'sequential'), got 'zigzag'"),
    ("streaming", {"diloco.inner_steps": 2},
     "diloco.inner_steps (H=2) must be at least the number of fragments (P=3)"),
    ("diloco", {"mesh.model": 3},
     "the parameter ['blocks'][0]['attn']['wk'] has heads=4 (model.num_heads), which "
     "mesh.model=3 does not divide; choose mesh.model dividing 4"),
    ("streaming", {"mesh.data": 4},   # d_model=64 over 4 devices: rows of 16 in [H, K, D]
     "diloco.codec_block_size=32 must divide the runs of 16 values that each device holds of "
     "['blocks'][0]['attn']['wo'] (4, 16, 64) under P(None, None, 'data') on this "
     "mesh, so that no quantization block straddles two devices; use a block size dividing 16"),
]


@pytest.mark.parametrize("family,overrides,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_a_bad_value_is_one_sentence_naming_the_key(family, overrides, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
    _build(family, **overrides)


def test_the_trainer_raises_the_same_error_type():
  assert train.ConfigError is ConfigError and train.RunConfig is RunConfig
  assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------- the conventions
def test_the_config_files_conventions_resolve_into_typed_values(tmp_path):
  rc = _build(**{"train.weight_decay": -1.0, "train.grad_clip": 0.0, "model.num_layers": 0,
                 "model.vocab_size": 0, "model.mlp": ""})
  assert rc.train.weight_decay is None     # -1: 1/T
  assert rc.train.grad_clip is None        # 0: off
  assert rc.model.num_layers == 2          # 0: the tiny preset's
  assert rc.model.vocab_size == 128        # 0: the data's (data.vocab_size)
  assert rc.model.mlp == "swiglu"          # "": the tiny preset's
  rc = _build(**{"train.weight_decay": 0.01, "train.grad_clip": 0.5, "model.num_layers": 3,
                 "model.vocab_size": 300, "model.mlp": "gelu", "train.learning_rate": 1})
  assert (rc.train.weight_decay, rc.train.grad_clip, rc.model.num_layers, rc.model.vocab_size,
          rc.model.mlp) == (0.01, 0.5, 3, 300, "gelu")
  assert rc.train.learning_rate == 1.0 and isinstance(rc.train.learning_rate, float)
  (tmp_path / "t.txt").write_text("bytes\n")
  rc = _build(**{"data.source": "text", "data.paths": str(tmp_path / "t.txt")})
  assert rc.data.paths == (str(tmp_path / "t.txt"),) and rc.model.vocab_size == 256


def test_a_run_config_is_frozen_and_hashable():
  rc = _build("streaming")
  with pytest.raises(dataclasses.FrozenInstanceError):
    rc.seed = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    rc.diloco.num_workers = 2
  assert {rc: "x"}[_build("streaming")] == "x"
  assert rc != _build("streaming", seed=1)
  # dataclasses.replace runs every check again.
  with pytest.raises(ConfigError, match=r"^diloco.num_workers must be an integer >= 1, got 0$"):
    dataclasses.replace(rc.diloco, num_workers=0)
  with pytest.raises(ConfigError, match=r"^train.batch_size=8 must be divisible by mesh.data=3"):
    dataclasses.replace(rc, mesh=MeshConfig(data=3))


def test_building_a_config_starts_no_jax_backend():
  """Entry points build the RunConfig before they set the device count (main.py, aot.py)."""
  code = (
      "import sys; sys.path.insert(0, 'experiments/configs'); import streaming\n"
      "from diloco_jax import build, config, mesh\n"
      "rc = config.from_config_dict(streaming.get_config('tiny'))\n"
      "mesh.set_cpu_device_count(build.cpu_devices_for(rc) - 1)\n"
      "import jax; print(jax.device_count())\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "3"


# ----------------------------------------------------------------------------- the builders
def test_the_builders_make_what_the_config_says():
  from diloco_jax import algorithm, data, mesh as mesh_lib  # noqa: PLC0415
  rc = _build("streaming", **{"diloco.worker_overlap_steps": (1, 2, 1, 2)})
  params = config_lib.abstract_params(rc.model)
  algo = build.make_algorithm(rc, mesh_lib.make_mesh(4), params)
  assert isinstance(algo, algorithm.StreamingDiLoCo)
  assert (algo.M, algo.H, algo.taus, algo.alpha) == (4, 30, (1, 2, 1, 2), 0.5)
  assert algo.codec == quantize.Codec("fp4_e3m0", 32, False)
  assert config_lib.make_fragments(rc, params).num_fragments == 3   # 4 blocks / 2 + 1
  diloco = build.make_algorithm(_build("diloco"), mesh_lib.make_mesh(4), params)
  jax.eval_shape(diloco.init, params, jax.ShapeDtypeStruct((2,), jnp.uint32))   # binds them
  assert (diloco.M, diloco.H, diloco.taus, diloco.alpha, diloco.codec.name,
          diloco.fragments.num_fragments) == (4, 20, (0, 0, 0, 0), 0.0, "fp32", 1)
  assert type(build.make_algorithm(_build("diloco", algorithm="dp"), mesh_lib.make_mesh(4),
                                   params)) is algorithm.DataParallel
  # M = 4 workers' fp32 ring all-reduce of 1,000 values: 2 (M-1)/M · 1,000 · 32 bits.
  assert build.dp_bits_per_step(rc, 1000) == 48_000
  source = build.make_source(rc)
  assert isinstance(source, data.SyntheticLanguage)
  assert (source.vocab_size, source.num_classes) == (128, 16)


def test_a_cosine_outer_lr_decays_over_T_over_H_outer_steps():
  rc = _build(**{"diloco.outer_lr_schedule": "cosine", "diloco.outer_optimizer": "sgd",
                 "diloco.outer_momentum": 0.0, "diloco.num_workers": 2,
                 "train.num_steps": 120, "diloco.inner_steps": 30})     # 4 outer steps
  mesh = build.make_mesh(rc)
  algo = build.make_algorithm(rc, mesh, build.init_params(rc, mesh, jax.random.PRNGKey(0)))
  g = jnp.zeros(())
  state = algo.outer_opt.init(g)
  for _ in range(4):
    upd, state = algo.outer_opt.update(jnp.ones(()), state, g)
  want = rc.diloco.outer_lr * (0.05 + 0.475 * (1 - math.cos(math.pi / 4)))   # k = 3 of 4
  assert -float(upd) == pytest.approx(want, rel=1e-6)
