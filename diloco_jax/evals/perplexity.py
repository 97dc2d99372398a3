"""python -m diloco_jax.evals.perplexity --workdir=DIR [--seq_len=N] [--out=DIR]
[--which=outer] [--text=FILE] [--max_windows=N]

Long-context loss (SPEC §6.3, the Gemini 1.5 report's figure): the cumulative mean negative
log-likelihood up to each position x of long held-out documents, fitted by L(x) = α·x^β + γ.

Protocol:

* Documents: the held-out tail of every data file of the run (`data.TextBytes.region`; each
  file's tail is one long document), or any text file (--text). Each document is cut into
  non-overlapping windows of seq_len + 1 bytes from its start (a partial window at the end is
  dropped), so a window never spans two documents; at most `max_windows` windows, taken evenly
  spread over all of them.
* Per-position loss: the cross-entropy (nats) of predicting byte i + 1 from bytes 0..i, averaged
  over the windows (`heldout.token_losses`, so the same number as the held-out loss).
* Position x = i + 1 (the bytes of context seen); the cumulative mean at x is the mean of the
  per-position losses at positions 1..x (`cumulative_mean`).
* Fit (`fit_power_law`): for each β on a grid the model is linear in (α, γ), solved by least
  squares; the best grid point is refined by nonlinear least squares over all three.
* seq_len beyond the training length is marked "extrapolation".

Writes OUT/perplexity.json and OUT/perplexity.png. Library entry points: `position_losses`,
`cumulative_mean`, `fit_power_law`, `evaluate`, `plot`. Bad flags or files: one sentence on
stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

BETA_GRID = np.concatenate([np.linspace(-3.0, -0.005, 600), np.linspace(0.005, 1.0, 200)])


class PerplexityError(ValueError):
  """The evaluation cannot run as asked; the message is one sentence."""


# ----------------------------------------------------------------------------------------------
# Curves and the fit.
# ----------------------------------------------------------------------------------------------
def cumulative_mean(loss_per_position) -> np.ndarray:
  """c[x - 1] = mean(loss[0:x]) for x = 1..L, along the last axis (float64)."""
  loss = np.asarray(loss_per_position, np.float64)
  if loss.ndim == 0 or loss.shape[-1] == 0:
    raise ValueError(f"loss_per_position must be a non-empty array, got shape {loss.shape}.")
  return np.cumsum(loss, axis=-1) / np.arange(1, loss.shape[-1] + 1)


def power_law(x, alpha: float, beta: float, gamma: float) -> np.ndarray:
  """L(x) = α·x^β + γ."""
  return alpha * np.power(np.asarray(x, np.float64), beta) + gamma


def _linear_fit(xb: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  """(α, γ, sum of squared residuals) of y ≈ α·xb + γ."""
  a = np.stack([xb, np.ones_like(xb)], axis=1)
  (alpha, gamma), *_ = np.linalg.lstsq(a, y, rcond=None)
  r = a @ np.array([alpha, gamma]) - y
  return float(alpha), float(gamma), float(r @ r)


def fit_power_law(x, y, *, betas: Sequence[float] = BETA_GRID) -> tuple[float, float, float]:
  """(α, β, γ) minimising Σ (α·x^β + γ − y)² over the points.

  Robust start: for each β in `betas` the problem is linear in (α, γ) (exact least squares);
  the best β is then refined jointly with scipy's nonlinear least squares (kept only if it
  lowers the error). x is rescaled by its maximum inside, for conditioning: α·x^β =
  (α·s^β)·(x/s)^β.
  """
  from scipy import optimize  # noqa: PLC0415

  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}.")
  if x.size < 3:
    raise ValueError(f"fit_power_law needs at least 3 points, got {x.size}.")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0):
    raise ValueError("x must be positive and x, y finite.")
  if np.unique(x).size < 3:
    raise ValueError("x must hold at least 3 distinct values.")
  s = float(x.max())
  u = x / s
  best = min((_linear_fit(u ** b, y) + (float(b),) for b in betas), key=lambda t: t[2])
  a0, g0, sse0, b0 = best

  def residuals(p):
    return p[0] * u ** p[1] + p[2] - y

  try:
    res = optimize.least_squares(residuals, [a0, b0, g0], method="lm", xtol=1e-15, ftol=1e-15,
                                 gtol=1e-15, max_nfev=20000)
    a1, b1, g1 = (float(v) for v in res.x)
    if np.isfinite(res.cost) and 2 * res.cost <= sse0:
      a0, b0, g0 = a1, b1, g1
  except (ValueError, np.linalg.LinAlgError):   # keep the grid solution
    pass
  return a0 * s ** (-b0), b0, g0


def formula(alpha: float, beta: float, gamma: float) -> str:
  """The fit as text: "L(x) = 1.23·x^-0.456 + 0.789"."""
  return f"L(x) = {alpha:.3g}·x^{beta:.3g} {'+' if gamma >= 0 else '−'} {abs(gamma):.3g}"


# ----------------------------------------------------------------------------------------------
# The model's per-position loss on long documents.
# ----------------------------------------------------------------------------------------------
def windows(docs, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """int32 [N, seq_len + 1]: non-overlapping windows from the start of each document (uint8
  arrays, bytes or str), at most `max_windows` of them spread evenly over all."""
  rows = []
  for d in docs:
    if isinstance(d, str):
      d = d.encode("utf-8")
    a = np.frombuffer(d, np.uint8) if isinstance(d, (bytes, bytearray)) else np.asarray(d)
    n = len(a) // (seq_len + 1)
    if n:
      rows.append(np.asarray(a[:n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1))
  if not rows:
    longest = max((len(d) for d in docs), default=0)
    raise PerplexityError(f"no document holds one window of seq_len + 1 = {seq_len + 1} bytes "
                          f"(the longest has {longest}); lower --seq_len or pass a longer "
                          f"--text.")
  out = np.concatenate(rows)
  if max_windows is not None and len(out) > max_windows:
    out = out[np.linspace(0, len(out) - 1, max_windows).round().astype(int)]
  return out


@functools.lru_cache(maxsize=None)
def _summed_losses(apply_fn: Callable):
  """jit: (params, batch [B, S], mask [B]) -> Σ over masked rows of the per-position loss [L]."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from diloco_jax.evals import heldout  # noqa: PLC0415

  def run(params, batch_BxS, mask_B):
    loss_BxL = heldout.token_losses(apply_fn, params, batch_BxS)
    return jnp.sum(loss_BxL * mask_B[:, None], axis=0)

  return jax.jit(run)


def position_losses(apply_fn: Callable, params, windows_NxS: np.ndarray, *,
                    batch_size: int = 8) -> np.ndarray:
  """Mean loss [L] at each position over the windows (batches of `batch_size`; the last one
  padded with masked copies, so every batch has one shape and compiles once)."""
  import jax.numpy as jnp  # noqa: PLC0415

  run = _summed_losses(apply_fn)
  n = len(windows_NxS)
  b = min(batch_size, n)
  total = None
  for lo in range(0, n, b):
    chunk = windows_NxS[lo:lo + b]
    mask = np.zeros(b, np.float32)
    mask[:len(chunk)] = 1.0
    if len(chunk) < b:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)])
    s = np.asarray(run(params, jnp.asarray(chunk), jnp.asarray(mask)), np.float64)
    total = s if total is None else total + s
  return total / n


def evaluate(apply_fn: Callable, params, docs, seq_len: int, *, max_windows: int | None = 64,
             batch_size: int = 8, train_length: int | None = None) -> dict:
  """Per-position loss, its cumulative mean and the power-law fit (see the module docstring),
  as a JSON-able dict: positions (x = 1..L), per_position_loss, cumulative_mean, fit {alpha,
  beta, gamma, formula, rmse}, windows, seq_len, train_length, extrapolation."""
  w = windows(docs, seq_len, max_windows)
  per_position = position_losses(apply_fn, params, w, batch_size=batch_size)
  x = np.arange(1, seq_len + 1, dtype=np.float64)
  cum = cumulative_mean(per_position)
  fit = None
  if seq_len >= 3:
    alpha, beta, gamma = fit_power_law(x, cum)
    rmse = float(np.sqrt(np.mean((power_law(x, alpha, beta, gamma) - cum) ** 2)))
    fit = {"alpha": alpha, "beta": beta, "gamma": gamma, "formula": formula(alpha, beta, gamma),
           "rmse": rmse}
  return {"seq_len": seq_len, "windows": int(len(w)), "train_length": train_length,
          "extrapolation": train_length is not None and seq_len > train_length,
          "positions": x.astype(int).tolist(),
          "per_position_loss": [float(v) for v in per_position],
          "cumulative_mean": [float(v) for v in cum], "mean_loss": float(cum[-1]), "fit": fit}


def plot(result: dict, path: str) -> str:
  """PNG at `path`: per-position and cumulative mean loss against position (log x), the fit
  with its formula, the training length marked when the window goes beyond it."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  x = np.asarray(result["positions"], np.float64)
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  ax.plot(x, result["per_position_loss"], color="0.75", linewidth=0.6,
          label="loss at position x")
  ax.plot(x, result["cumulative_mean"], color="C0", linewidth=1.8,
          label="cumulative mean loss up to x")
  fit = result.get("fit")
  if fit:
    ax.plot(x, power_law(x, fit["alpha"], fit["beta"], fit["gamma"]), "--", color="C3",
            linewidth=1.2, label=f"fit {fit['formula']}")
  if result.get("extrapolation"):
    ax.axvline(result["train_length"], color="black", linestyle=":", linewidth=1.0,
               label=f"training length {result['train_length']}")
  ax.set_xscale("log")
  ax.set_xlabel("position x (bytes of context)")
  ax.set_ylabel("negative log-likelihood (nats/byte)")
  ax.set_title(f"long-context loss: {result['windows']} windows of "
               f"{result['seq_len']} bytes", fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write(result: dict, out_dir: str) -> dict:
  """OUT/perplexity.json and OUT/perplexity.png; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "perplexity.json"),
           "png": os.path.join(out_dir, "perplexity.png")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  plot(result, paths["png"])
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
  flags.DEFINE_integer("seq_len", None, "Window length in bytes (default: the run's "
                       "data.seq_len).", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (default WORKDIR/perplexity).",
                      flag_values=fv)
  flags.DEFINE_enum("which", None, ("outer", "worker_mean", "worker0"), "Which parameters "
                    "(default: the run's eval.params).", flag_values=fv)
  flags.DEFINE_string("text", None, "A text file as the documents instead of the run's "
                      "held-out split.", flag_values=fv)
  flags.DEFINE_integer("max_windows", 64, "At most this many windows.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.", lower_bound=1,
                       flag_values=fv)
  return fv


def _parse(argv: list[str]):
  """The parsed flags, or the one-sentence reason they are bad."""
  from diloco_jax.evals.__main__ import parse_workdir_flags  # noqa: PLC0415

  fv = parse_workdir_flags(_define_flags(), argv)
  if isinstance(fv, str):
    return fv
  if fv.text and not os.path.isfile(fv.text):
    return f"--text {fv.text!r} is not a file"
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
    if rc.data.tokenizer != "bytes":
      return _fail("config error", f"the long-context loss is measured per byte position, but "
                   f"this run trained with data.tokenizer={rc.data.tokenizer!r}; it needs a "
                   f"byte-level run.")
    seq_len = fv.seq_len or rc.data.seq_len
    if rc.model.attention == "blockwise" and seq_len % rc.model.attention_block:
      return _fail("flag error", f"--seq_len={seq_len} must be a multiple of the run's "
                   f"model.attention_block={rc.model.attention_block} (blockwise attention)")
    if fv.text:
      if rc.model.vocab_size < 256:
        return _fail("config error", f"--text feeds UTF-8 bytes, but this run's vocabulary is "
                     f"{rc.model.vocab_size}; it needs a byte-level run.")
      with open(fv.text, "rb") as f:
        docs = [f.read()]
    elif rc.data.source == "text":
      source = build.make_source(rc, "eval")
      docs = [np.asarray(source.region(i)) for i in range(len(source.paths))]
    else:
      return _fail("config error", f"data.source={rc.data.source!r} has no held-out documents; "
                   f"pass --text=FILE (for a byte-level run) or evaluate a data.source='text' "
                   f"run.")
    which = fv.which or rc.eval.params
    params, step = workdir.restore_params(fv.workdir, rc, which)
    result = evaluate(heldout.model_apply(rc.model), params, docs, seq_len,
                      max_windows=fv.max_windows, batch_size=fv.batch_size,
                      train_length=rc.data.seq_len)
  except config_lib.ConfigError as e:
    return _fail("config error", str(e))
  except (workdir.EvalError, PerplexityError) as e:
    return _fail("error", str(e))
  result.update(workdir=os.path.abspath(fv.workdir), step=step, params=which,
                documents=fv.text or "held-out split")
  paths = write(result, fv.out or os.path.join(fv.workdir, "perplexity"))
  fit = result["fit"]
  print(f"mean loss {result['mean_loss']:.4f} nats/byte over {result['windows']} windows of "
        f"{seq_len} bytes{' (extrapolation)' if result['extrapolation'] else ''}"
        + (f"; {fit['formula']} (rmse {fit['rmse']:.2g})" if fit else ""))
  print(f"wrote {paths['json']}, {paths['png']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
