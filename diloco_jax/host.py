"""The machine a run ran on, as recorded in its summary.json.

The same code, config and seed give the same bits on one machine and different bits on another:
XLA:CPU picks kernels by the CPU's vector extensions (AVX-512 or AVX2 on x86), and a run at the
edge of learning something (the needle short stage, docs/long_context.md) turns that last-bit
difference into a different result. A summary that names the machine says which runs can be
compared bit for bit.
"""

from __future__ import annotations

import os
import platform

# Vector extensions, widest first: the first one a CPU has names its class (x86, then Arm).
VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "sve", "asimd")


def cpu_facts(cpuinfo: str) -> dict:
  """{"cpu": the first model name, "vector_isa": the widest of VECTOR_ISAS in the first flags
  line} from the text of /proc/cpuinfo (None where the text does not say)."""
  model, flags = None, None
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and model is None:
      model = value.strip()
    elif key in ("flags", "Features") and flags is None:   # x86, Arm
      flags = set(value.split())
  isa = next((f for f in VECTOR_ISAS if f in (flags or ())), None)
  return {"cpu": model, "vector_isa": isa}


def describe() -> dict:
  """This machine and runtime: CPU model and widest vector extension, architecture, CPU count,
  jax and jaxlib versions, backend and device kind."""
  import jax  # noqa: PLC0415
  import jaxlib  # noqa: PLC0415
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read()
  except OSError:   # not Linux
    text = ""
  facts = cpu_facts(text)
  if facts["cpu"] is None:
    facts["cpu"] = platform.processor() or None
  facts.update(machine=platform.machine(), cpus=os.cpu_count(), jax=jax.__version__,
               jaxlib=jaxlib.__version__, backend=jax.default_backend(),
               device_kind=jax.devices()[0].device_kind)
  return facts
