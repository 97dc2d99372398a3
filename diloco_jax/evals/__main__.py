"""python -m diloco_jax.evals --workdir=DIR [--hellaswag=F] [--piqa=F [--piqa_labels=F]]
[--arc_easy=F] [--params=outer|worker_mean|worker0] [--json]

Evaluates the latest checkpoint of a training run: held-out loss on the run's own held-out split,
per-position loss, and zero-shot multiple-choice accuracy on the task files given. The model and
data are rebuilt from the run's saved config, WORKDIR/config.json (a ConfigDict as JSON), or, for
a workdir without one, from --config=FILE[:ARG] plus the same --config.KEY=VALUE overrides the run
was started with. Any bad flag, config or task file: one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from diloco_jax.evals import tasks as tasks_lib

CONFIG_FILE = "config.json"
_PARAMS = ("outer", "worker_mean", "worker0")


def _define_flags() -> flags.FlagValues:
  """A fresh set of flags per call (not absl's global one), so main() can run more than once in
  one process (tests) and never clashes with diloco_jax.main's flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The training run's directory.", flag_values=fv)
  config_flags.DEFINE_config_file(
      "config", None, "The run's config file (path[:arg]) with its overrides; only for a workdir "
      f"without {CONFIG_FILE}.", flag_values=fv, lock_config=True)
  flags.DEFINE_string("hellaswag", None, "HellaSwag jsonl file.", flag_values=fv)
  flags.DEFINE_string("piqa", None, "PIQA jsonl file.", flag_values=fv)
  flags.DEFINE_string("piqa_labels", None, "PIQA labels file (one 0/1 per line); without it, "
                      "every PIQA record needs a 'label' field.", flag_values=fv)
  flags.DEFINE_string("arc_easy", None, "ARC-Easy jsonl file.", flag_values=fv)
  flags.DEFINE_enum("params", None, _PARAMS, "Which parameters to evaluate (default: the run's "
                    "eval.params).", flag_values=fv)
  flags.DEFINE_integer("heldout_batches", None, "Held-out batches of eval.batch_size sequences "
                       "(default: the run's eval.num_batches).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Choices scored per call.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.", flag_values=fv)
  return fv


def fail(kind: str, msg: str) -> int:
  """Prints `kind: msg` on stderr; the exit status of a refused evaluation command (2)."""
  print(f"{kind}: {msg}", file=sys.stderr)
  return 2



def parse_workdir_flags(fv: flags.FlagValues, argv: list[str]) -> flags.FlagValues | str:
  """`fv` parsed from `argv` with a --workdir that exists, or the one-sentence reason not: the
  checks every evaluation command (this one, `needle`, `perplexity`) shares."""
  try:
    rest = fv(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # A failing get_config() arrives with its traceback inside the message: keep the last line.
    return lines[-1] if any("Traceback" in line for line in lines) else " ".join(lines)
  except (KeyError, AttributeError) as e:   # --config.KEY=... for a key the config lacks
    while e.args and isinstance(e.args[0], BaseException):   # ml_collections wraps the KeyError
      e = e.args[0]
    key = str(e.args[0] if e.args else e).strip("'\"")
    return f"the config has no key {key!r}"
  if len(rest) > 1:
    return f"unexpected arguments: {rest[1:]}"
  if not fv.workdir:
    return "--workdir is required"
  if not os.path.isdir(fv.workdir):
    return f"--workdir {fv.workdir!r} is not a directory"
  return fv


def _parse(argv: list[str]) -> flags.FlagValues | str:
  """The parsed flags, or the one-sentence reason they are bad."""
  fv = parse_workdir_flags(_define_flags(), argv)
  if isinstance(fv, str):
    return fv
  if fv.piqa_labels and not fv.piqa:
    return "--piqa_labels needs --piqa"
  return fv


def load_config(fv: flags.FlagValues):
  """The run's ConfigDict: WORKDIR/config.json, else --config; or the reason there is none."""
  import ml_collections  # noqa: PLC0415

  path = os.path.join(fv.workdir, CONFIG_FILE)
  if os.path.isfile(path):
    if fv.config is not None:
      return f"--config is only for a workdir without {CONFIG_FILE}, but {path!r} exists"
    try:
      with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
      return f"cannot read the run's config {path!r}: {e}"
  if fv.config is None:
    return (f"workdir {fv.workdir!r} has no saved config ({CONFIG_FILE}); pass the run's "
            f"--config=FILE[:ARG] and its --config.KEY=VALUE overrides")
  return fv.config


def _load_tasks(fv: flags.FlagValues) -> dict:
  out = {}
  if fv.hellaswag:
    out["hellaswag"] = tasks_lib.load_hellaswag(fv.hellaswag)
  if fv.piqa:
    out["piqa"] = tasks_lib.load_piqa(fv.piqa, fv.piqa_labels)
  if fv.arc_easy:
    out["arc_easy"] = tasks_lib.load_arc(fv.arc_easy)
  return out


def report(r: dict) -> str:
  """The human-readable summary of `workdir.evaluate_workdir`'s result."""
  lines = [f"{r['workdir']}: {r['algorithm']}, step {r['step']}, params={r['params']}",
           f"  held-out loss   {r['heldout_loss']:.4f} nats/token over {r['heldout_sequences']} "
           f"sequences of {r['seq_len']} tokens ({r['data_source']} held-out split)"]
  if r["entropy_floor"] is not None:
    lines.append(f"  entropy floor   {r['entropy_floor']:.4f}  "
                 f"(gap {r['heldout_loss'] - r['entropy_floor']:.4f} nats)")
  buckets = "  ".join(f"{lo}{'' if lo == hi else f'-{hi}'}: {loss:.3f}"
                      for lo, hi, loss in r["per_position_buckets"])
  lines.append(f"  loss by position  {buckets}")
  for name, t in r["tasks"].items():
    lines.append(f"  {name:<10} acc_norm {t['acc_norm']:.4f}  acc {t['acc']:.4f}  "
                 f"({t['num_examples']} examples; acc_norm: log-likelihood per byte)")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """Runs the command for `argv` (argv[0] is the program name); returns the exit status."""
  fv = _parse(argv)
  if isinstance(fv, str):
    return fail("flag error", fv)
  config = load_config(fv)
  if isinstance(config, str):
    return fail("config error", config)
  try:
    task_examples = _load_tasks(fv)
  except tasks_lib.FormatError as e:
    return fail("data error", str(e))
  # JAX (and everything that imports it) only now: bad flags and files fail in a second.
  from diloco_jax import config as config_lib  # noqa: PLC0415
  from diloco_jax.evals import workdir  # noqa: PLC0415

  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  try:
    rc = config_lib.from_config_dict(config)
    result = workdir.evaluate_workdir(fv.workdir, rc, which=fv.params, tasks=task_examples,
                                      heldout_batches=fv.heldout_batches,
                                      batch_size=fv.batch_size)
  except config_lib.ConfigError as e:
    return fail("config error", str(e))
  except workdir.EvalError as e:
    return fail("error", str(e))
  print(json.dumps(result) if fv.json else report(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
