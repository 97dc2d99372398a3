"""Joining JAX's multi-controller runtime: one process per host, the same entry point.

A run of N processes is the single-process program run N times: every process builds the same
global mesh (all processes' devices), feeds only its own workers' data, and takes part in every
collective. Where the process group comes from, first match wins:

1. flags `--coordinator_address`, `--num_processes`, `--process_id` (all three);
2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
3. a cluster JAX detects by itself (SLURM with more than one task, Open MPI, multi-host Cloud TPU,
   Kubernetes JobSets): `jax.distributed.initialize()` with no arguments;
4. otherwise one process, and nothing is initialised.

A process that stops sending heartbeats (killed, preempted, hung host) makes the coordination
service end every other process within `heartbeat_timeout_s` with JAX's fatal error "Terminating
process because the JAX distributed service detected fatal errors ... another task died", instead
of leaving them blocked in a collective.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """How to join: explicit (address, count, id) or `auto` (JAX's cluster detection)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False


def _cluster_detected(env: Mapping[str, str]) -> str | None:
  """The cluster a launcher put us in, if it has more than one process (JAX then finds the rest)."""
  def more_than_one(key):
    try:
      return int(env.get(key, "1")) > 1
    except ValueError:
      return False
  if "SLURM_JOB_ID" in env and more_than_one("SLURM_NTASKS"):
    return "SLURM"
  if more_than_one("OMPI_COMM_WORLD_SIZE"):
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "Cloud TPU"
  if "JOBSET_NAME" in env:
    return "Kubernetes JobSet"
  return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None
            ) -> ProcessGroup | None:
  """The process group from flags, else the environment, else cluster detection; None for one
  process. Raises ValueError with one sentence naming the flag or variable on bad values."""
  env = os.environ if env is None else env
  given = (coordinator_address, num_processes, process_id)
  source = "flags --coordinator_address, --num_processes and --process_id"
  if all(v is None or v == "" for v in given):
    given = tuple(env.get(k) or None for k in ENV)
    source = "environment variables " + ", ".join(ENV)
  if all(v is None for v in given):
    return ProcessGroup(auto=True) if _cluster_detected(env) else None
  if any(v is None or v == "" for v in given):
    raise ValueError(f"the {source} must be given together (got {given})")
  address, n, i = given
  try:
    n, i = int(n), int(i)
  except ValueError:
    raise ValueError(f"the {source}: process count and id must be integers, got {n!r} and "
                     f"{i!r}") from None
  host, _, port = str(address).rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"the coordinator address must be host:port, got {address!r}")
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"the {source}: need num_processes >= 1 and 0 <= process_id < "
                     f"num_processes, got {n} and {i}")
  if n == 1:
    return None
  return ProcessGroup(str(address), n, i)


def process_count(group: ProcessGroup | None, env: Mapping[str, str] | None = None
                  ) -> int | None:
  """How many processes the run has, known before JAX starts: 1 alone, the flags' count, or
  the cluster's task count (SLURM, Open MPI); None where only JAX's detection would know."""
  if group is None:
    return 1
  if not group.auto:
    return group.num_processes
  env = os.environ if env is None else env
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(key, "").isdigit():
      return int(env[key])
  return None


def initialize(group: ProcessGroup | None, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300) -> None:
  """Joins the group (before any JAX backend starts). CPU collectives go through gloo."""
  if group is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_s,
                initialization_timeout=initialization_timeout_s)
  if group.auto:
    jax.distributed.initialize(**kwargs)
  else:
    jax.distributed.initialize(group.coordinator_address, num_processes=group.num_processes,
                               process_id=group.process_id, **kwargs)


def is_primary() -> bool:
  """Process 0 writes the metrics, the summary and the console progress."""
  return jax.process_index() == 0
