"""Shared by the absl entry points (main, aot): bad flags end with one sentence and exit 2."""

import sys

from absl import flags


def parse_flags(argv):
  """absl's parser, but an override of a key the config does not have (which ml_collections
  reports as a KeyError/AttributeError deep inside flag parsing) becomes one sentence."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:   # a config file that failed to load reports it on first access
      getattr(flags.FLAGS[name].value, "to_dict", None)
    return rest
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # A failing get_config() arrives with its traceback inside the message: keep the last line.
    msg = lines[-1] if any("Traceback" in line for line in lines) else " ".join(lines)
    print(f"flag error: {msg}", file=sys.stderr)
  except (OSError, SyntaxError, ValueError) as e:   # config_flags could not load the file
    detail = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = detail[-1].split("earlier failure to load: ")[-1] if detail else type(e).__name__
    print(f"flag error: --config: cannot load the config file: {last}", file=sys.stderr)
  except (KeyError, AttributeError) as e:
    msg = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
    msg = msg.replace("\\", "").replace("'", "").strip('"')
    print(f"config error: the config has no key {msg}", file=sys.stderr)
  sys.exit(2)
