"""Entry point: python -m diloco_jax.main --config=experiments/configs/diloco.py:tiny --workdir=DIR

Flags -> train.run(config, workdir). Sets the number of simulated CPU devices from the config
before JAX starts, so users never have to. The same command is every process of a multi-process
run (launch/local.sh, TPU VMs, SLURM): it joins `jax.distributed` when flags, environment or the
cluster say there are several processes (see distributed.py), and is unchanged for one.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diloco_jax.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the summary go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-process run "
    "(default: $JAX_COORDINATOR_ADDRESS, or the cluster's own when JAX detects one).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run "
                                      "(default: $JAX_NUM_PROCESSES or detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based "
                                   "(default: $JAX_PROCESS_ID or detected).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "A process silent this long is declared dead and every other "
    "process exits with an error (instead of waiting in a collective forever).", lower_bound=1)
_ORIGINAL = flags.DEFINE_integer(
    "original_num_processes", None, "The run started on this many processes and goes on with "
    "fewer (launch/local.sh --allow_fewer): diloco.num_workers and mesh.num_cpu_devices are "
    "scaled by num_processes / original_num_processes, and a checkpoint of more workers resumes "
    "with its first ones (train.allow_fewer_workers).", lower_bound=1)
_LOG_ALL = flags.DEFINE_bool("log_all_processes", False,
                             "Every process prints its own progress lines (default: process 0).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # After flags, before JAX's backends start:
  from diloco_jax import build, distributed, mesh, train  # noqa: PLC0415
  from diloco_jax import config as config_lib  # noqa: PLC0415
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  try:
    group = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f"flag error: {e}", file=sys.stderr)
    return 2
  if _ORIGINAL.value is not None:
    try:
      config_lib.for_survivors(config, distributed.process_count(group), _ORIGINAL.value)
    except ValueError as e:
      print(f"flag error: {e}", file=sys.stderr)
      return 2
  try:
    rc = config_lib.from_config_dict(config)   # starts no JAX backend
    config_lib.check_workdir(_WORKDIR.value)
  except config_lib.InputError as e:
    print(f"{_kind(e)} error: {e}", file=sys.stderr)
    return 2
  num_processes = group.num_processes if group is not None and group.num_processes else 1
  devices = build.cpu_devices_for(rc)
  if devices % num_processes:
    print(f"config error: the {devices} simulated CPU devices (mesh.num_cpu_devices, or "
          f"M * mesh.data * mesh.expert * mesh.model) must split evenly over {num_processes} "
          f"processes",
          file=sys.stderr)
    return 2
  distributed.initialize(group, heartbeat_timeout_s=_HEARTBEAT.value)
  mesh.set_cpu_device_count(devices // num_processes)   # CPU only: devices of this process
  try:
    summary = train.run(config, _WORKDIR.value, log_all_processes=_LOG_ALL.value)
  except config_lib.InputError as e:
    print(f"{_kind(e)} error: {e}", file=sys.stderr)
    return 2
  except train.Diverged as e:
    print(f"stopped: {e}", file=sys.stderr)
    return 1
  if "stopped_at" in summary:   # preempted (SIGTERM): the checkpoint is saved, the line printed
    return 0
  if distributed.is_primary():
    print(train.format_summary(summary))
  return 0


def _kind(e: Exception) -> str:
  from diloco_jax import config as config_lib  # noqa: PLC0415
  return "config" if isinstance(e, config_lib.ConfigError) else "input"


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
