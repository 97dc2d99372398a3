"""python -m diloco_jax.evals.needle --workdir=DIR [--lengths=256,512,1024,2048] [--depths=11]
[--variants=single,multikey] [--trials=5] [--out=DIR] [--which=outer] [--haystack=FILE]

Needle-in-a-haystack recall of a training run's latest checkpoint (SPEC §6.3), Gemini's
protocol with RULER's variants:

* Haystack: the run's held-out text (the held-out tail of every data file, `data.TextBytes`;
  each file's tail is one document and an episode never spans two), or any text file
  (--haystack). Each episode draws a document (among those long enough, in proportion to their
  size) and a sentence start in it.
* Prompts (`haystack.make_episode`): exactly `length` bytes, the needle(s) at `depth` of the
  haystack snapped back to a sentence start, the question last. Depths are spaced linearly from
  0 to 1; for multi-needle variants the depth is needle 0's (the queried one for "multikey"),
  the other needles go to uniform random depths.
* Greedy decoding of len(answer) + `extra_bytes` bytes, recomputing the forward pass over the
  growing prompt (no KV cache; right padding never changes a causal model's earlier logits).
  Each cell's trials (and the controls) run as batches.
* Score per episode: `haystack.score` (exact for one value, the fraction of values recovered
  for multi-value/multi-query); recall of a cell = the mean over its trials.
* Control: every (variant, length) also runs `trials` needle-free prompts with the same
  questions (`haystack.remove_needles`); their recall must stay at chance (≈ 10**-digits).
* Lengths beyond the training length (``data.seq_len``) are marked "extrapolation".
* Effective length (RULER): the longest length whose mean recall over depths is >= 0.856.
* A length too short for a variant's needles and question (`haystack.min_length`, e.g. 282
  bytes for 4 multi-key needles) is skipped for that variant: recall None, "skipped" says why.

Writes OUT/needle.json (every cell, controls, per-length means with the fraction of answers
that are another needle's value, effective lengths) and
OUT/needle_<variant>.png (a heat map per variant). `evaluate` and `heatmap` are the library
entry points (no workdir needed). Any bad flag, config or file: one sentence on stderr, exit 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from diloco_jax.evals import haystack as hs

THRESHOLD = 0.856   # RULER: the score of Llama-2-7B at 4k, the bar for "effective length"
DEFAULT_LENGTHS = (256, 512, 1024, 2048)


class NeedleError(ValueError):
  """The evaluation cannot run as asked; the message is one sentence."""


# ----------------------------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _greedy(apply_fn: Callable, steps: int):
  """A jitted greedy decoder for `apply_fn`: (params, tokens [B, W] int32, prompt_len [])
  -> tokens with positions prompt_len .. prompt_len + steps - 1 filled by argmax over the
  first 256 logits (bytes). One compile per (B, W), whatever the prompt length."""
  import jax  # noqa: PLC0415  (JAX only when decoding: the flags fail fast without it)
  import jax.numpy as jnp  # noqa: PLC0415

  def run(params, tokens_BxW, prompt_len):
    def body(i, toks):
      pos = prompt_len + i
      logits_BxWxV = apply_fn(params, toks)
      row_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, pos - 1, axis=1, keepdims=False)
      nxt_B = jnp.argmax(row_BxV[:, :256], axis=-1).astype(toks.dtype)
      return jax.lax.dynamic_update_index_in_dim(toks, nxt_B, pos, axis=1)
    return jax.lax.fori_loop(0, steps, body, tokens_BxW)

  return jax.jit(run)


def decode(apply_fn: Callable, params, prompts: Sequence[bytes], steps: int, *,
           batch_size: int = 16, pad_multiple: int = 1) -> list[bytes]:
  """Greedy continuation (`steps` bytes) of each prompt; all prompts have one length.

  Batches of `batch_size` (the last one padded with copies, so every batch has one shape) in a
  buffer of W = len(prompt) + steps rounded up to `pad_multiple` (blockwise attention needs W
  divisible by its tile).
  """
  import jax.numpy as jnp  # noqa: PLC0415

  n = len(prompts[0])
  if any(len(p) != n for p in prompts):
    raise ValueError("decode's prompts must all have one length.")
  width = -(-(n + steps) // pad_multiple) * pad_multiple
  run = _greedy(apply_fn, steps)
  out: list[bytes] = []
  for lo in range(0, len(prompts), batch_size):
    chunk = list(prompts[lo:lo + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    buf = np.zeros((batch_size, width), np.int32)
    buf[:, :n] = np.frombuffer(b"".join(chunk), np.uint8).reshape(batch_size, n)
    toks = np.asarray(run(params, jnp.asarray(buf), jnp.int32(n)))
    out += [bytes(row[n:n + steps].astype(np.uint8)) for row in toks[:real]]
  return out


# ----------------------------------------------------------------------------------------------
# The evaluation.
# ----------------------------------------------------------------------------------------------
def _documents(text) -> list[hs.Haystack]:
  docs = text if isinstance(text, (list, tuple)) else [text]
  if not docs:
    raise NeedleError("text must hold at least one document.")
  return [hs.Haystack.of(d) for d in docs]


def _episode(docs: list[hs.Haystack], length: int, depth: float, rng: np.random.Generator,
             **kw) -> tuple[hs.Haystack, hs.Episode]:
  """(document, episode): the document drawn in proportion to size among those of at least
  `length` bytes (room for the haystack from any of its sentence starts but the last few)."""
  sizes = np.array([len(d.data) if len(d.data) >= length else 0 for d in docs], np.float64)
  if sizes.sum() == 0:
    raise NeedleError(f"no haystack document holds the {length} bytes a {length}-byte prompt "
                      f"needs (the longest has {max(len(d.data) for d in docs)}); use shorter "
                      f"--lengths or a longer --haystack.")
  doc = docs[int(rng.choice(len(docs), p=sizes / sizes.sum()))]
  try:
    return doc, hs.make_episode(doc, length, depth, rng, **kw)
  except ValueError as e:
    raise NeedleError(str(e)) from None


def effective_length(per_length: Sequence[dict], threshold: float = THRESHOLD) -> int | None:
  """RULER's effective length: the longest length whose mean recall is >= `threshold` (None:
  no length reaches it). `per_length`: [{"length": int, "recall": float | None}, ...] (None: a
  skipped length, never effective)."""
  ok = [r["length"] for r in per_length if r["recall"] is not None and r["recall"] >= threshold]
  return max(ok) if ok else None


def evaluate(apply_fn: Callable, params, text, lengths: Sequence[int], depths: Sequence[float],
             variants: Sequence[str] = ("single",), trials: int = 5, rng_seed: int = 0, *,
             train_length: int | None = None, num_needles: int = 4, value_digits: int = 7,
             extra_bytes: int = 4, batch_size: int = 16, pad_multiple: int = 1,
             control: bool = True) -> dict:
  """Recall per (variant, length, depth) cell (see the module docstring); a JSON-able dict.

  Args:
    apply_fn: ``apply_fn(params, tokens [B, W] int32) -> logits [B, W, V]`` of a byte-level
      causal model (`heldout.model_apply`), traceable under jit; the same object each call
      reuses the compiled decoder.
    text: the haystack: one text (str, bytes, uint8 array, `haystack.Haystack`) or a list of
      documents.
    lengths, depths: the grid; prompt lengths in bytes, depths in [0, 1].
    variants: `haystack.VARIANTS` entries.
    trials: episodes per cell (and control episodes per (variant, length)).
    rng_seed: every episode is a pure function of (seed, variant, length, depth index, trial).
    train_length: the training sequence length; longer lengths are marked "extrapolation".
    num_needles, value_digits: as `haystack.make_episode`.
    extra_bytes: bytes decoded beyond the answer (so a longer wrong number is caught).
    batch_size, pad_multiple: see `decode`.
    control: also run the needle-free controls.

  Returns:
    {"cells": [{variant, length, depth, trials, recall, exact, extrapolation}], "control":
    [{variant, length, trials, recall}], "per_length": {variant: [{length, recall, control,
    extrapolation, skipped}]} (recall None and skipped a reason for a length too short for the
    variant; "all": the mean over variants when there are several), "effective_length":
    {variant: int | None}, plus the grid and protocol.
  """
  lengths = [int(x) for x in lengths]
  depths = [float(d) for d in depths]
  variants = list(variants)
  if not lengths or any(x < 1 for x in lengths):
    raise NeedleError(f"lengths must be positive integers, got {lengths}.")
  if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
    raise NeedleError(f"depths must be numbers in [0, 1], got {depths}.")
  for v in variants:
    if v not in hs.VARIANTS:
      raise NeedleError(f"variant must be one of {hs.VARIANTS}, got {v!r}.")
  if trials < 1:
    raise NeedleError(f"trials must be >= 1, got {trials}.")
  docs = _documents(text)
  cells, controls = [], []
  per_length: dict[str, list[dict]] = {}
  for vi, variant in enumerate(variants):
    kw = dict(variant=variant, num_needles=num_needles, value_digits=value_digits)
    shortest = hs.min_length(variant, num_needles, value_digits=value_digits)
    per_length[variant] = []
    for length in lengths:
      extrap = train_length is not None and length > train_length
      if length < shortest:   # no room for the needles: skipped, not an error of the grid
        per_length[variant].append({"length": length, "recall": None, "control": None,
                                    "extrapolation": extrap, "skipped": f"shorter than the "
                                    f"{shortest} bytes a {variant!r} prompt needs"})
        continue
      drawn = [[_episode(docs, length, d, np.random.default_rng([rng_seed, vi, length, di, t]),
                         **kw) for t in range(trials)] for di, d in enumerate(depths)]
      flat = [e for row in drawn for _, e in row]
      # The controls: the first depth's episodes without their needles (depth is moot there).
      ctrl = [hs.remove_needles(e, doc) for doc, e in drawn[0]] if control else []
      steps = max(len(e.answer) for e in flat) + extra_bytes
      outs = decode(apply_fn, params, [e.prompt for e in flat + ctrl], steps,
                    batch_size=min(batch_size, len(flat) + len(ctrl)),
                    pad_multiple=pad_multiple)
      scores = [hs.score(o, e) for o, e in zip(outs, flat)]
      exacts = [hs.exact(o, e) for o, e in zip(outs, flat)]
      for di, d in enumerate(depths):
        sl = slice(di * trials, (di + 1) * trials)
        cells.append({"variant": variant, "length": length, "depth": d, "trials": trials,
                      "recall": float(np.mean(scores[sl])), "exact": float(np.mean(exacts[sl])),
                      "extrapolation": extrap})
      c_recall = (float(np.mean([hs.score(o, e) for o, e in zip(outs[len(flat):], ctrl)]))
                  if ctrl else None)
      if ctrl:
        controls.append({"variant": variant, "length": length, "trials": trials,
                         "recall": c_recall})
      # How the misses miss: another needle's value in place of the asked one (the needle
      # was found, the key not matched) or anything else.
      wrong = float(np.mean([hs.wrong_needle(o, e) for o, e in zip(outs, flat)]))
      per_length[variant].append({"length": length, "recall": float(np.mean(scores)),
                                  "control": c_recall, "extrapolation": extrap,
                                  "skipped": None, "wrong_needle": wrong})
  eff = {v: effective_length(rows) for v, rows in per_length.items()}
  if len(variants) > 1:   # RULER's summary: the mean over tasks per length (all evaluated)
    per_length["all"] = []
    for i, x in enumerate(lengths):
      got = [per_length[v][i]["recall"] for v in variants]
      per_length["all"].append({
          "length": x, "recall": None if None in got else float(np.mean(got)), "control": None,
          "extrapolation": train_length is not None and x > train_length,
          "skipped": "a variant was skipped" if None in got else None})
    eff["all"] = effective_length(per_length["all"])
  return {"lengths": lengths, "depths": depths, "variants": variants, "trials": trials,
          "train_length": train_length, "num_needles": num_needles,
          "value_digits": value_digits, "chance": 10.0 ** -value_digits,
          "threshold": THRESHOLD, "seed": rng_seed, "cells": cells, "control": controls,
          "per_length": per_length, "effective_length": eff}


# ----------------------------------------------------------------------------------------------
# Heat map.
# ----------------------------------------------------------------------------------------------
def heatmap(result: dict, path: str, variant: str | None = None) -> str:
  """One variant's (default: the only one) recall heat map as a PNG at `path`: depth on y,
  length on x, recall 0..1 in colour and written in each cell; extrapolated lengths (beyond the
  training length) are starred and set off by a dashed line. Returns `path`."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  if variant is None:
    if len(result["variants"]) != 1:
      raise NeedleError(f"the result holds variants {result['variants']}; pass variant=.")
    variant = result["variants"][0]
  lengths, depths = result["lengths"], result["depths"]
  grid = np.full((len(depths), len(lengths)), np.nan)
  for c in result["cells"]:
    if c["variant"] == variant:
      grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["recall"]
  fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 0.9 * len(lengths)), 1.2 + 0.38 * len(depths)))
  im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      label = "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"   # –: a skipped length
      ax.text(j, i, label, ha="center", va="center", fontsize=7)
  extrap = [result["train_length"] is not None and x > result["train_length"] for x in lengths]
  ax.set_xticks(range(len(lengths)),
                [f"{x}*" if e else str(x) for x, e in zip(lengths, extrap)])
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
  if any(extrap) and not all(extrap):
    ax.axvline(extrap.index(True) - 0.5, color="black", linestyle="--", linewidth=1.5)
  ax.set_xlabel("prompt length (bytes)" + ("\n* extrapolation: beyond the training length "
                                           f"{result['train_length']}" if any(extrap) else ""),
                fontsize=8)
  ax.set_ylabel("needle depth")
  eff = result["effective_length"].get(variant)
  ax.set_title(f"needle recall: {variant} (trials {result['trials']}; effective length "
               f"{eff if eff is not None else '< ' + str(min(lengths))})", fontsize=9)
  fig.colorbar(im, ax=ax, label="recall")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write(result: dict, out_dir: str) -> dict:
  """OUT/needle.json and a heat map per variant; returns {"json": path, variant: png path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "needle.json")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  for v in result["variants"]:
    paths[v] = heatmap(result, os.path.join(out_dir, f"needle_{v}.png"), v)
  return paths


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------
def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The training run's directory.", flag_values=fv)
  config_flags.DEFINE_config_file(
      "config", None, "The run's config file (path[:arg]) with its overrides; only for a workdir "
      "without config.json.", flag_values=fv, lock_config=True)
  flags.DEFINE_list("lengths", [str(x) for x in DEFAULT_LENGTHS], "Prompt lengths in bytes.",
                    flag_values=fv)
  flags.DEFINE_integer("depths", 11, "Depths spaced linearly from 0 to 1.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_list("variants", ["single"], f"Of {hs.VARIANTS}.", flag_values=fv)
  flags.DEFINE_integer("trials", 5, "Episodes per cell.", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (default WORKDIR/needle).", flag_values=fv)
  flags.DEFINE_enum("which", None, ("outer", "worker_mean", "worker0"), "Which parameters "
                    "(default: the run's eval.params).", flag_values=fv)
  flags.DEFINE_string("haystack", None, "A text file as the haystack instead of the run's "
                      "held-out split.", flag_values=fv)
  flags.DEFINE_integer("num_needles", None, "Needles of the multi-needle variants (default: the "
                       "run's data.retrieval.num_needles).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("value_digits", None, "Digits per value (default: the run's "
                       "data.retrieval.value_digits).", lower_bound=1, upper_bound=18,
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Prompts decoded per call.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Episode seed.", flag_values=fv)
  return fv


def _parse(argv: list[str]):
  """The parsed flags, or the one-sentence reason they are bad."""
  from diloco_jax.evals.__main__ import parse_workdir_flags  # noqa: PLC0415

  fv = parse_workdir_flags(_define_flags(), argv)
  if isinstance(fv, str):
    return fv
  try:
    lengths = [int(x) for x in fv.lengths]
  except ValueError:
    return f"--lengths must be comma-separated integers, got {','.join(fv.lengths)!r}"
  if not lengths or min(lengths) < 1:
    return f"--lengths must be positive, got {lengths}"
  bad = [v for v in fv.variants if v not in hs.VARIANTS]
  if bad or not fv.variants:
    return f"--variants must be a list of {hs.VARIANTS}, got {fv.variants}"
  if fv.haystack and not os.path.isfile(fv.haystack):
    return f"--haystack {fv.haystack!r} is not a file"
  return fv


def main(argv: list[str]) -> int:
  """Runs the command for `argv` (argv[0] is the program name); returns the exit status."""
  from diloco_jax.evals import __main__ as evals_cli  # noqa: PLC0415  (the shared CLI parts)

  _fail = evals_cli.fail
  fv = _parse(argv)
  if isinstance(fv, str):
    return _fail("flag error", fv)
  config = evals_cli.load_config(fv)   # one loader for every evals command
  if isinstance(config, str):
    return _fail("config error", config)
  from absl import logging  # noqa: PLC0415

  from diloco_jax import build  # noqa: PLC0415
  from diloco_jax import config as config_lib  # noqa: PLC0415
  from diloco_jax.evals import heldout, workdir  # noqa: PLC0415

  logging.set_verbosity(logging.WARNING)
  try:
    rc = config_lib.from_config_dict(config)
    if (rc.model.vocab_size < 256 or rc.data.tokenizer != "bytes"
        or (rc.data.source != "text" and not fv.haystack)):
      return _fail("config error", f"the needle prompts are UTF-8 bytes, but this run trained on "
                   f"data.source={rc.data.source!r} with a vocabulary of {rc.model.vocab_size}; "
                   f"it needs a byte-level (data.source='text') run.")
    if fv.haystack:
      with open(fv.haystack, "rb") as f:
        text = [f.read()]
    else:
      source = build.make_source(rc, "eval")
      text = [np.asarray(source.region(i)) for i in range(len(source.paths))]
    retrieval = rc.data.retrieval
    which = fv.which or rc.eval.params
    params, step = workdir.restore_params(fv.workdir, rc, which)
    pad = rc.model.attention_block if rc.model.attention == "blockwise" else 1
    result = evaluate(
        heldout.model_apply(rc.model), params, text, [int(x) for x in fv.lengths],
        list(np.linspace(0.0, 1.0, fv.depths)) if fv.depths > 1 else [0.5], fv.variants,
        fv.trials, fv.seed, train_length=rc.data.seq_len,
        num_needles=fv.num_needles or retrieval.num_needles,
        value_digits=fv.value_digits or retrieval.value_digits, batch_size=fv.batch_size,
        pad_multiple=pad)
  except config_lib.ConfigError as e:
    return _fail("config error", str(e))
  except (workdir.EvalError, NeedleError) as e:
    return _fail("error", str(e))
  result.update(workdir=os.path.abspath(fv.workdir), step=step, params=which,
                haystack=fv.haystack or "held-out split")
  paths = write(result, fv.out or os.path.join(fv.workdir, "needle"))
  for v in result["variants"] + (["all"] if len(result["variants"]) > 1 else []):
    rows = "  ".join(f"{r['length']}{'*' if r['extrapolation'] else ''}: "
                     + ("skipped" if r["recall"] is None else f"{r['recall']:.2f}")
                     + (f" (ctrl {r['control']:.2f})" if r["control"] is not None else "")
                     + (f" (wrong needle {r['wrong_needle']:.2f})" if r.get("wrong_needle")
                        else "")
                     for r in result["per_length"][v])
    print(f"{v:<10} {rows}  effective length {result['effective_length'][v]}")
  print(f"wrote {', '.join(paths.values())}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
