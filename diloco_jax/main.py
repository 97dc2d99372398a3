"""Entry point: python -m diloco_jax.main --config=experiments/configs/diloco.py:tiny --workdir=DIR

Flags -> train.run(config, workdir). Sets the number of simulated CPU devices from the config
before JAX starts, so users never have to.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the summary go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from diloco_jax import mesh, train  # noqa: PLC0415  (after flags, before JAX's backends start)
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  mesh.set_cpu_device_count(train.cpu_devices_for(config))
  try:
    summary = train.run(config, _WORKDIR.value)
  except train.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  print(train.format_summary(summary))
  return 0


def parse_flags(argv):
  """absl's parser, but an override of a key the config does not have (which ml_collections
  reports as a KeyError/AttributeError deep inside flag parsing) becomes one sentence."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # A failing get_config() arrives with its traceback inside the message: keep the last line.
    msg = lines[-1] if any("Traceback" in line for line in lines) else " ".join(lines)
    print(f"flag error: {msg}", file=sys.stderr)
  except (KeyError, AttributeError) as e:
    msg = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
    msg = msg.replace("\\", "").replace("'", "").strip('"')
    print(f"config error: the config has no key {msg}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
