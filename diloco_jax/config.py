"""The run's configuration at the library boundary: one frozen dataclass per config section.

`from_config_dict(c)` (= `RunConfig.from_dict`) builds `Section(**c.section)` for every section of
an ml_collections ConfigDict (or a plain nested dict, e.g. a workdir's config.json), so a key
added to a config file and to its dataclass reaches the code without editing anything else, and
a key the dataclass does not have is an error. Each dataclass checks its own values in
`__post_init__`; the checks that span sections are `RunConfig.__post_init__`. Every failure is a
`ConfigError` whose message is one sentence naming the full key and what is allowed. Building a
RunConfig starts no JAX backend (the fragment check runs on `jax.eval_shape` params), so entry
points build it before they choose the device count or join other processes.

The config files' conventions become typed values here: `model.num_layers=0` (the preset's) and
`model.vocab_size=0` (the data's) resolve into `RunConfig.model`, a `model.ModelConfig`;
`train.weight_decay<0` (1/T) and `train.grad_clip=0` (off) become None.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Mapping
from typing import Any

import jax

from diloco_jax import collectives, faults, fragments, outer, quantize, retrieval, sharding
from diloco_jax import mesh as mesh_lib
from diloco_jax import tokenizer as tokenizer_lib
from diloco_jax import model as model_lib

ALGORITHMS = ("dp", "diloco", "streaming")
SOURCES = ("synthetic", "text")
EVAL_PARAMS = ("outer", "worker_mean", "worker0")
TEXT_VOCAB = 256   # data.source="text" reads bytes


class InputError(ValueError):
  """Bad input to a run (a flag, a path, a file); the message is one sentence naming it."""


class ConfigError(InputError):
  """A bad config value; the message is one sentence naming the key and what is allowed."""


def check_workdir(workdir: str) -> str:
  """Creates the run's directory if it is missing; one sentence (InputError) if it is not a
  directory, lies under a regular file, or cannot be created or written. Returns its path."""
  if not isinstance(workdir, str) or not workdir:
    raise InputError(f"--workdir must name a directory, got {workdir!r}")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"--workdir={workdir} is an existing file, not a directory; name a "
                     f"directory (it is created if missing)")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(f"--workdir={workdir} cannot be created: {parent} is a file, not a "
                     f"directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise InputError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise InputError(f"--workdir={workdir} is not writable by this user")
  return path


# ----------------------------------------------------------------------------------- checks
def _integer(key: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _real(key: str, value: Any, allowed: str, ok) -> float:
  """The value as a float if it is a number with ok(value), else the error '{key} must be
  {allowed}'."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    raise ConfigError(f"{key} must be {allowed}, got {value!r}")
  return float(value)


_POSITIVE = ("> 0", lambda x: x > 0)
_UNIT = ("in [0, 1]", lambda x: 0 <= x <= 1)
_UNIT_OPEN = ("in [0, 1)", lambda x: 0 <= x < 1)


def _choice(key: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def _bool(key: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f"{key} must be a bool (True or False), got {value!r}")


def _set(obj: Any, name: str, value: Any) -> None:
  """Normalises a field of a frozen dataclass in its __post_init__."""
  object.__setattr__(obj, name, value)


def expand_paths(paths) -> tuple[str, ...]:
  """Files named by a string or list of paths/globs; a missing file is a ConfigError."""
  if isinstance(paths, str):
    paths = (paths,)
  out = []
  for p in paths:
    hits = sorted(glob.glob(os.path.expanduser(p)))
    if not hits:
      raise ConfigError(f"data.paths entry {p!r} matches no file")
    out += hits
  return tuple(out)


# --------------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
  """`model.*`: a preset and the overrides a config file sets; `resolve` gives the ModelConfig."""

  preset: str                      # "tiny" or the paper family "35M" ... "4B" (SPEC §4)
  num_layers: int = 0              # transformer blocks; 0: the preset's
  vocab_size: int = 0              # 0: the data source's vocabulary
  mlp: str = ""                    # "swiglu" or "gelu"; "": the preset's
  d_model: int = 0                 # 0: the preset's
  num_heads: int = 0               # 0: the preset's
  ffn_dim: int = 0                 # dense MLP hidden size; 0: the preset's
  tied_embeddings: bool = True
  dtype: str = "float32"           # compute dtype; params are fp32
  remat: str = "none"              # "block": recompute each block's activations in backward
  attention: str = "dense"         # "dense", "blockwise" (flash-style, O(L·block) memory),
                                   # "cudnn" (GPU), "splash" (TPU), "ring" (mesh.context)
  attention_block: int = 128       # blockwise/splash: positions per tile
  rope_base: float = 0.0           # RoPE base; 0: 10000 (base scaling: e.g. 5e5, 1e6)
  rope_scaling: str = "none"       # "none", "linear" (position interpolation) or "yarn"
  rope_scaling_factor: float = 1.0  # s = L_target / L_train
  rope_original_length: int = 0    # yarn: L_train
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  moe: Any = None                  # model.moe.*: MoEConfig's keys; num_experts=0 (or no
                                   # section): a dense model

  def __post_init__(self):
    _choice("model.preset", self.preset, tuple(model_lib.PRESETS))
    for name in ("num_layers", "vocab_size", "d_model", "num_heads", "ffn_dim"):
      _integer(f"model.{name}", getattr(self, name), 0)
    _bool("model.tied_embeddings", self.tied_embeddings)
    moe = {} if self.moe is None else _plain(self.moe, "model.moe")
    if moe.get("num_experts", 0) == 0:
      _set(self, "moe", None)
    else:
      try:   # MoEConfig's messages name the model.moe.* key
        _set(self, "moe", model_lib.MoEConfig(**_keyword_args(model_lib.MoEConfig, moe,
                                                              "model.moe")))
      except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None

  def resolve(self, data_vocab: int) -> model_lib.ModelConfig:
    """The preset's ModelConfig with every other field of this section as an override (a field
    added here must be a ModelConfig field; ModelConfig checks the values)."""
    overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "preset"}
    overrides["vocab_size"] = self.vocab_size or data_vocab
    for name in ("num_layers", "d_model", "num_heads", "ffn_dim", "mlp", "rope_base"):
      if not getattr(self, name):
        del overrides[name]         # the preset's
    try:
      return model_lib.config_from_preset(self.preset, **overrides)
    except ValueError as e:   # ModelConfig's messages name the model.* key
      raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DilocoConfig:
  """`diloco.*`: workers and the outer loop; Streaming DiLoCo's fragments, overlap and codec
  (the DiLoCo family leaves those at their defaults: one fragment, τ = 0, fp32)."""

  num_workers: int                 # M
  inner_steps: int                 # H
  outer_optimizer: str = "nesterov"
  outer_lr: float                  # η
  outer_momentum: float            # μ
  outer_lr_schedule: str = "constant"   # or "cosine": η decayed over the T / H outer steps
  offload_outer: bool = False      # θ_g, outer opt state, in-flight Δ in host memory (checked;
                                   # not passed to the algorithm yet)
  layers_per_fragment: int = 3     # streaming: blocks per fragment (P = L / this + 1)
  fragment_pattern: str = "strided"
  overlap_steps: int = 0           # τ
  worker_overlap_steps: tuple[int, ...] = ()   # streaming: one τ per worker
  merge_alpha: float = 0.0         # α
  codec: str = "fp32"              # Q, one of quantize.CODECS
  codec_block_size: int = 32
  stochastic_rounding: bool = False
  error_feedback: bool = False
  wire: str = "reference"
  router_sync_every: int = 0       # MoE: routers as their own fragment, synced every k steps
                                   # (k dividing H); 0: with their block's fragment
  delayed: bool = False            # the outer all-reduce overlaps a whole round: the mean sent
                                   # at round r is applied at r+1 as it is (naive delay)
  eager: bool = False              # ... with eager updates: worker m applies its own fresh Δ_m
                                   # and the others' one-round-stale ones (SPEC §5)
  drop_prob: float = 0.0           # faults: each worker's outer gradient dropped per sync
  outages: tuple = ()              # faults: (worker, step, duration) triples (faults.py)
  rejoin_reset_inner_opt: bool = False   # a worker back from an outage gets fresh Adam moments
  quarantine: bool = True          # a worker with a non-finite Δ is left out and restarted
  quantizer: quantize.Codec = dataclasses.field(init=False)   # Q as the algorithm takes it

  def __post_init__(self):
    _integer("diloco.num_workers", self.num_workers, 1)
    _integer("diloco.inner_steps", self.inner_steps, 1)
    _choice("diloco.outer_optimizer", self.outer_optimizer, outer.OUTER_OPTIMIZERS)
    _set(self, "outer_lr", _real("diloco.outer_lr", self.outer_lr, *_POSITIVE))
    _choice("diloco.outer_lr_schedule", self.outer_lr_schedule, outer.OUTER_LR_SCHEDULES)
    _set(self, "outer_momentum", _real("diloco.outer_momentum", self.outer_momentum,
                                       *_UNIT_OPEN))
    _bool("diloco.offload_outer", self.offload_outer)
    _integer("diloco.overlap_steps", self.overlap_steps, 0)
    per_worker = self.worker_overlap_steps
    if not isinstance(per_worker, (tuple, list)) or any(
        isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in per_worker):
      raise ConfigError(f"diloco.worker_overlap_steps must be a sequence of integers >= 0 "
                        f"(one τ per worker) or empty, got {per_worker!r}")
    _set(self, "worker_overlap_steps", tuple(per_worker))
    _set(self, "merge_alpha", _real("diloco.merge_alpha (α)", self.merge_alpha, *_UNIT))
    _bool("diloco.stochastic_rounding", self.stochastic_rounding)
    _bool("diloco.error_feedback", self.error_feedback)
    _choice("diloco.wire", self.wire, collectives.WIRES)
    _integer("diloco.router_sync_every", self.router_sync_every, 0)
    _bool("diloco.delayed", self.delayed)
    _bool("diloco.eager", self.eager)
    _bool("diloco.rejoin_reset_inner_opt", self.rejoin_reset_inner_opt)
    _bool("diloco.quarantine", self.quarantine)
    _set(self, "drop_prob", _real("diloco.drop_prob", self.drop_prob, "in [0, 1)",
                                  lambda x: 0 <= x < 1))
    outages = self.outages
    if not isinstance(outages, (tuple, list)) or not all(
        isinstance(o, (tuple, list)) and len(o) == 3 for o in outages):
      raise ConfigError(f"diloco.outages must be a sequence of (worker, step, duration) "
                        f"triples, got {outages!r}")
    _set(self, "outages", tuple(tuple(o) for o in outages))
    try:
      faults.FaultSchedule(self.num_workers, self.drop_prob, self.outages)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    try:   # quantize.Codec checks diloco.codec and diloco.codec_block_size
      _set(self, "quantizer", quantize.get_codec(self.codec, self.codec_block_size,
                                                 self.stochastic_rounding))
    except ValueError as e:
      raise ConfigError(str(e)) from None

  @property
  def delay(self) -> str:
    """The algorithm's `delay`: "eager", "naive" (diloco.delayed alone) or "none"."""
    return "eager" if self.eager else "naive" if self.delayed else "none"

  @property
  def taus(self) -> tuple[int, ...]:
    """The τ in use: diloco.worker_overlap_steps if given, else (diloco.overlap_steps,)."""
    return self.worker_overlap_steps or (self.overlap_steps,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """`train.*`: the inner loop (InnerOpt: AdamW, warm-up + cosine, clipping) and logging."""

  num_steps: int                   # T, inner steps per worker
  batch_size: int                  # sequences per worker per step
  learning_rate: float             # peak inner learning rate
  warmup_steps: int
  final_lr_fraction: float
  weight_decay: float | None = None   # None (config: any value < 0): 1/T
  b1: float
  b2: float
  grad_clip: float | None = 1.0    # None (config: 0): off
  log_every: int
  init_from: str = ""              # a finished run's workdir: start from its latest outer params
                                   # (fresh optimizer state; e.g. "train short, continue long")
  final_sync: bool = True          # DiLoCo family: after step T every fragment's θ_g takes in
                                   # all inner steps (pending receives land, the rest sync once)
  allow_fewer_workers: bool = False   # a checkpoint saved by more workers than
                                   # diloco.num_workers resumes with its first M workers' state

  def __post_init__(self):
    if not isinstance(self.init_from, str):
      raise ConfigError(f"train.init_from must be a workdir path or '', got {self.init_from!r}")
    if self.init_from and not os.path.isfile(os.path.join(self.init_from, "config.json")):
      raise ConfigError(f"train.init_from={self.init_from!r} is not a training run's workdir "
                        f"(it has no config.json)")
    _integer("train.num_steps", self.num_steps, 1)
    _integer("train.batch_size", self.batch_size, 1)
    _set(self, "learning_rate", _real("train.learning_rate", self.learning_rate, *_POSITIVE))
    _integer("train.warmup_steps", self.warmup_steps, 0)
    _set(self, "final_lr_fraction", _real("train.final_lr_fraction", self.final_lr_fraction,
                                          *_UNIT))
    if self.weight_decay is not None:
      wd = _real("train.weight_decay", self.weight_decay, "a number (< 0: 1/T)", lambda x: True)
      _set(self, "weight_decay", None if wd < 0 else wd)
    _set(self, "b1", _real("train.b1", self.b1, *_UNIT_OPEN))
    _set(self, "b2", _real("train.b2", self.b2, *_UNIT_OPEN))
    if self.grad_clip is not None:
      clip = _real("train.grad_clip", self.grad_clip, ">= 0 (0: off)", lambda x: x >= 0)
      _set(self, "grad_clip", clip or None)
    _integer("train.log_every", self.log_every, 1)
    _bool("train.final_sync", self.final_sync)
    _bool("train.allow_fewer_workers", self.allow_fewer_workers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """`data.*`: the embedded synthetic language or UTF-8 text files read as bytes."""

  source: str                      # "synthetic" or "text"
  paths: tuple[str, ...] = ()      # text: files or globs
  seq_len: int                     # L
  vocab_size: int | None = None    # synthetic: vocabulary (required there)
  num_classes: int = 16            # synthetic: word classes
  retrieval: Any = None            # text: data.retrieval.*, RetrievalConfig's keys (needle
                                   # episodes packed into a fraction of the training windows)
  tokenizer: str = "bytes"         # text: "bytes", or a SentencePiece .model (tokenizer.py)
  token_cache: str = ""            # text + SentencePiece: where the prepared shards go
                                   # ("": ~/.cache/diloco_jax/tokens)
  check_utf8: bool = True          # text: a file that is not valid UTF-8 is an error
  files: tuple[str, ...] = dataclasses.field(init=False)   # text: the files `paths` name
  subword_vocab: int = dataclasses.field(init=False, default=0)   # the model's vocabulary

  def __post_init__(self):
    _choice("data.source", self.source, SOURCES)
    _integer("data.seq_len", self.seq_len, 1)
    paths = (self.paths,) if isinstance(self.paths, str) else self.paths
    if not isinstance(paths, (tuple, list)) or not all(isinstance(p, str) for p in paths):
      raise ConfigError(f"data.paths must be a file or glob, or a sequence of them, got "
                        f"{self.paths!r}")
    paths = tuple(paths)
    _set(self, "paths", paths)
    _set(self, "files", ())
    _bool("data.check_utf8", self.check_utf8)
    rcfg = {} if self.retrieval is None else _plain(self.retrieval, "data.retrieval")
    try:   # RetrievalConfig's messages name the data.retrieval.* key
      rcfg = retrieval.RetrievalConfig(**_keyword_args(retrieval.RetrievalConfig, rcfg,
                                                       "data.retrieval"))
      rcfg.check_length(self.seq_len)
    except (TypeError, ValueError) as e:
      raise ConfigError(str(e)) from None
    _set(self, "retrieval", rcfg)
    if rcfg.fraction and self.source != "text":
      raise ConfigError(f"data.retrieval.fraction={rcfg.fraction} needs data.source='text' "
                        f"(the episodes are built from its files); use 0")
    if self.source == "text":
      if not paths:
        raise ConfigError("data.paths must name at least one file for data.source='text'")
      _set(self, "files", expand_paths(paths))
    if not isinstance(self.tokenizer, str) or not isinstance(self.token_cache, str):
      raise ConfigError(f"data.tokenizer and data.token_cache must be strings, got "
                        f"{self.tokenizer!r} and {self.token_cache!r}")
    if self.tokenizer != tokenizer_lib.BYTES:
      if self.source != "text":
        raise ConfigError(f"data.tokenizer={self.tokenizer!r} tokenizes text files; it needs "
                          f"data.source='text' (use 'bytes' for synthetic data)")
      if rcfg.fraction:
        raise ConfigError("data.retrieval.fraction needs data.tokenizer='bytes' (needle "
                          "episodes, their answers and the needle evaluation are byte-level)")
      try:
        tokenizer_lib.check_model(self.tokenizer)
      except ValueError as e:
        raise ConfigError(str(e)) from None
      _set(self, "subword_vocab", tokenizer_lib.vocab_size(self.tokenizer))
    else:
      _integer("data.vocab_size", self.vocab_size, 2)
      if (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
          or not 1 <= self.num_classes <= self.vocab_size):
        raise ConfigError(f"data.num_classes must be an integer between 1 and data.vocab_size "
                          f"({self.vocab_size}), got {self.num_classes!r}")

  @property
  def vocab(self) -> int:
    """The tokens the source emits: bytes (or the SentencePiece model's pieces) for text,
    data.vocab_size for synthetic."""
    if self.source == "text":
      return self.subword_vocab or TEXT_VOCAB
    return self.vocab_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """`eval.*`: the held-out loss during training."""

  every_steps: int                 # 0: only at the end
  num_batches: int
  batch_size: int
  params: str = "outer"            # one of EVAL_PARAMS

  def __post_init__(self):
    _integer("eval.every_steps", self.every_steps, 0)
    _integer("eval.num_batches", self.num_batches, 1)
    _integer("eval.batch_size", self.batch_size, 1)
    _choice("eval.params", self.params, EVAL_PARAMS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  """`checkpoint.*`."""

  every_steps: int                 # 0: only at the end
  max_to_keep: int = 2

  def __post_init__(self):
    _integer("checkpoint.every_steps", self.every_steps, 0)
    _integer("checkpoint.max_to_keep", self.max_to_keep, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """`mesh.*`: devices per worker, and the simulated host devices on CPU."""

  data: int = 1                    # devices per worker for its batch
  model: int = 1                   # devices per worker along the model axis
  expert: int = 1                  # devices per worker holding E/expert experts each (the
                                   # batch is split over data × expert)
  context: int = 1                 # devices per worker over which the sequence is split
                                   # (ring attention: model.attention='ring')
  num_cpu_devices: int = 0         # 0: M * data * expert * context * model

  def __post_init__(self):
    _integer("mesh.data", self.data, 1)
    _integer("mesh.model", self.model, 1)
    _integer("mesh.expert", self.expert, 1)
    _integer("mesh.context", self.context, 1)
    _integer("mesh.num_cpu_devices", self.num_cpu_devices, 0)


SECTIONS = {"model": ModelSection, "diloco": DilocoConfig, "train": TrainConfig,
            "data": DataConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
            "mesh": MeshConfig}


def _plain(values: Any, key: str) -> dict:
  if hasattr(values, "to_dict"):   # ml_collections.ConfigDict
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ConfigError(f"{key} must be a section of keys (a ConfigDict or dict), got {values!r}")
  return dict(values)


def _keyword_args(cls, values: dict, section: str = "") -> dict:
  """`values` as keyword arguments of `cls`: a key it lacks, or a required key missing, is an
  error naming the full key."""
  prefix = f"{section}." if section else ""
  fields = [f for f in dataclasses.fields(cls) if f.init]
  allowed = sorted(f.name for f in fields)
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(prefix + k for k in unknown)}; allowed: {', '.join(allowed)}")
  required = [f.name for f in fields
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  missing = [k for k in required if k not in values]
  if missing:
    raise ConfigError(f"missing key{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(prefix + k for k in missing)}; a config must set "
                      f"{', '.join(prefix + k for k in required)}")
  return values


@functools.lru_cache(maxsize=8)
def abstract_params(model_cfg: model_lib.ModelConfig):
  """The model's params as shapes only (`jax.eval_shape`: nothing is allocated, no backend
  starts)."""
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return jax.eval_shape(functools.partial(model_lib.init_params, model_cfg), key)


def param_specs(mesh, params):
  """The PartitionSpec of every params leaf on `mesh` (a Mesh or AbstractMesh): the model's
  logical axes (`model.logical_axes`) through the rule table (`sharding.PARAM_RULES`)."""
  try:
    return sharding.param_specs(mesh, params, model_lib.logical_axes(params))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def make_fragments(rc: RunConfig, params) -> fragments.Fragments:
  """The fragments of `params` (concrete or abstract) and the schedule check: Streaming DiLoCo's
  blocks, or DiLoCo's one fragment, plus the routers' own with diloco.router_sync_every;
  RunConfig runs it on abstract params, so a bad value stops a run before anything compiles."""
  d = rc.diloco
  try:
    if rc.algorithm == "streaming":
      frags = fragments.by_blocks(params, layers_per_fragment=d.layers_per_fragment,
                                  pattern=d.fragment_pattern)
    else:
      frags = fragments.single(params)
    if d.router_sync_every:
      frags = fragments.split_out(frags, params, ROUTER_FRAGMENT, is_router)
    periods = sync_every(rc) or {}
    fragments.Schedule(H=d.inner_steps, P=frags.num_fragments, tau=max(d.taus),
                       every=tuple(periods.get(n, 0) for n in frags.names) if periods else ())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return frags


ROUTER_FRAGMENT = "router"


def is_router(path, leaf) -> bool:
  """An MoE router weight (the leaf named "router")."""
  del leaf
  return getattr(path[-1], "key", None) == "router"


def sync_every(rc: RunConfig) -> dict | None:
  """The fragments with their own sync period, as the algorithm takes them ({"router": k}), or
  None."""
  k = rc.diloco.router_sync_every
  return {ROUTER_FRAGMENT: k} if k else None


# ------------------------------------------------------------------------------------- run
@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """The validated, typed view of a config file (see experiments/configs/diloco.py for units)."""

  algorithm: str                   # one of ALGORITHMS
  seed: int
  model: model_lib.ModelConfig     # model.* resolved against the data (ModelSection.resolve)
  diloco: DilocoConfig
  train: TrainConfig
  data: DataConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig

  @classmethod
  def from_dict(cls, c) -> RunConfig:
    """From a ConfigDict or nested dict of the config files' shape; raises ConfigError."""
    # A section left out takes its defaults (and names its missing required keys).
    top = _keyword_args(cls, {**dict.fromkeys(SECTIONS, {}), **_plain(c, "the config")})
    sections = {name: section(**_keyword_args(section, _plain(top[name], name), name))
                for name, section in SECTIONS.items()}
    model = sections.pop("model").resolve(sections["data"].vocab)
    return cls(algorithm=top["algorithm"], seed=top["seed"], model=model, **sections)

  def __post_init__(self):
    """The checks that span sections."""
    _choice("algorithm", self.algorithm, ALGORITHMS)
    _integer("seed", self.seed, 0)
    d, B, D, X = self.diloco, self.train.batch_size, self.mesh.data, self.mesh.expert
    if B % D:
      raise ConfigError(f"train.batch_size={B} must be divisible by mesh.data={D} "
                        f"(devices per worker)")
    if X > 1:
      moe = self.model.moe
      if moe is None:
        raise ConfigError(f"mesh.expert={X} needs an MoE model (model.moe.num_experts >= 1); "
                          f"use mesh.expert=1 for a dense model")
      if moe.num_experts % X:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} must be divisible by "
                          f"mesh.expert={X} (each expert device holds E/{X} experts)")
      if B % (D * X):
        raise ConfigError(f"train.batch_size={B} must be divisible by mesh.data * mesh.expert "
                          f"= {D * X} (each device routes its own share of the batch)")
    if self.algorithm == "dp" and self.eval.params != "outer":
      raise ConfigError(f"eval.params must be 'outer' for algorithm='dp' (it has no worker "
                        f"copies), got {self.eval.params!r}")
    if self.algorithm == "dp" and d.offload_outer:
      raise ConfigError("diloco.offload_outer must be False for algorithm='dp' (it has no "
                        "outer copy to offload)")
    streaming = self.algorithm == "streaming"
    if d.drop_prob or d.outages:
      if self.algorithm == "dp" or d.delay != "none":
        raise ConfigError("diloco.drop_prob and diloco.outages need algorithm='diloco' or "
                          "'streaming' without diloco.eager or diloco.delayed")
      late = [o for o in d.outages if o[1] > self.train.num_steps]
      if late:
        raise ConfigError(f"diloco.outages {late} start after the last step "
                          f"(train.num_steps={self.train.num_steps})")
    if d.delay != "none":
      key = "diloco.eager" if d.eager else "diloco.delayed"
      if self.algorithm == "dp":
        raise ConfigError(f"{key}=True needs algorithm='diloco' or 'streaming' (data-parallel "
                          f"training has no outer round to overlap)")
      if any(d.taus) or d.offload_outer:
        raise ConfigError(f"{key}=True overlaps the all-reduce with a whole outer round (H "
                          f"steps); it needs diloco.overlap_steps=0, no "
                          f"diloco.worker_overlap_steps and diloco.offload_outer=False")
    if d.worker_overlap_steps and (not streaming or len(d.worker_overlap_steps) != d.num_workers):
      raise ConfigError(f"diloco.worker_overlap_steps must list one τ per worker "
                        f"(M={d.num_workers}) for algorithm='streaming', got "
                        f"{d.worker_overlap_steps!r}")
    if streaming:
      for tau in d.taus:
        if tau >= d.inner_steps:
          raise ConfigError(f"diloco.overlap_steps (τ) must be an integer with 0 <= τ < "
                            f"diloco.inner_steps (H={d.inner_steps}), got {tau!r}")
    if self.model.attention in ("blockwise", "splash"):
      block = min(self.model.attention_block, self.data.seq_len)
      if self.data.seq_len % block:
        raise ConfigError(f"model.attention_block={self.model.attention_block} must divide "
                          f"data.seq_len={self.data.seq_len} for model.attention="
                          f"{self.model.attention!r}")
      if self.model.attention == "splash" and block % 128:
        raise ConfigError(f"model.attention='splash' needs tiles of a multiple of 128 "
                          f"positions (the kernel's lane width), but model.attention_block="
                          f"{self.model.attention_block} with data.seq_len={self.data.seq_len} "
                          f"gives {block}")
    C, L = self.mesh.context, self.data.seq_len
    if C > 1 and self.model.attention != "ring":
      raise ConfigError(f"mesh.context={C} splits the sequence, which only "
                        f"model.attention='ring' supports; got model.attention="
                        f"{self.model.attention!r}")
    if C > 1 and self.model.moe is not None:
      raise ConfigError(f"mesh.context={C} with an MoE model is not supported (the expert "
                        f"dispatch splits tokens over data × expert only); use mesh.context=1")
    if C > 1 and L % (2 * C):
      raise ConfigError(f"data.seq_len={L} must be divisible by 2 * mesh.context = {2 * C} "
                        f"(ring attention's load-balanced order cuts the sequence into "
                        f"{2 * C} chunks)")
    if self.model.vocab_size < self.data.vocab:
      raise ConfigError(f"model.vocab_size={self.model.vocab_size} is smaller than the data's "
                        f"vocabulary ({self.data.vocab}); use 0 to take the data's")
    params = abstract_params(self.model)
    if d.router_sync_every:
      if self.algorithm == "dp" or self.model.moe is None:
        raise ConfigError(f"diloco.router_sync_every={d.router_sync_every} needs an MoE model "
                          f"(model.moe.num_experts >= 1) trained with algorithm='diloco' or "
                          f"'streaming'; use 0")
      if d.inner_steps % d.router_sync_every or max(d.taus) >= d.router_sync_every:
        raise ConfigError(f"diloco.router_sync_every={d.router_sync_every} must divide "
                          f"diloco.inner_steps (H={d.inner_steps}) and exceed "
                          f"diloco.overlap_steps (τ={max(d.taus)})")
    if streaming or d.router_sync_every:   # partition and schedule, on the model's shapes only
      make_fragments(self, params)
    # Every sharding divides the model, and no quantization block straddles two devices: on
    # the mesh's axis sizes alone, before any device exists.
    mesh = mesh_lib.abstract_mesh(d.num_workers, self.mesh.data, self.mesh.model,
                                  expert=self.mesh.expert, context=self.mesh.context)
    specs = param_specs(mesh, params)
    if self.algorithm != "dp":
      try:
        collectives.check_blocks(params, specs, mesh, d.quantizer)
      except ValueError as e:
        raise ConfigError(str(e)) from None


def for_survivors(config, num_processes: int | None, original: int) -> None:
  """Scales `config` (a ConfigDict, in place) from `original` processes to `num_processes`:
  the same workers per process, so M' = M · num_processes / original, and a checkpoint of the
  M workers resumes with the first M'. Raises ValueError (one sentence) where M' is not whole."""
  if num_processes is None:
    raise ValueError("--original_num_processes needs the process count before JAX starts: "
                     "pass --num_processes (or run under SLURM or Open MPI)")
  if num_processes > original:
    raise ValueError(f"--original_num_processes={original} is less than the "
                     f"{num_processes} processes of this run (it only shrinks a run)")
  m = config.diloco.num_workers
  if m * num_processes % original:
    raise ValueError(f"diloco.num_workers={m} over --original_num_processes={original} does not "
                     f"leave a whole number of workers on {num_processes} processes")
  config.diloco.num_workers = m * num_processes // original
  if config.mesh.get("num_cpu_devices"):
    config.mesh.num_cpu_devices = config.mesh.num_cpu_devices * num_processes // original
  config.train.allow_fewer_workers = True


def from_config_dict(c) -> RunConfig:
  """The RunConfig of a ConfigDict (the config files' `get_config()`); raises ConfigError."""
  return RunConfig.from_dict(c)
