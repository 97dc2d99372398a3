"""Simulated host devices for the whole suite; set before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound on tiny programs: XLA's backend optimisation passes cost more
# compile time (~16 %) than they save in run time here; inherited by the subprocesses the tests
# start. Bit-for-bit tests compare programs compiled alike, so they hold either way. (The CPU
# backend's classic emitters, --xla_cpu_use_fusion_emitters=false, compile ~40 % faster but
# break three "P=1, τ=0 is DiLoCo" bit-for-bit tests by a last bit: not used.)
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
from diloco_jax import mesh  # noqa: E402  (sets XLA flags before any backend starts)

NUM_DEVICES = 8
mesh.set_cpu_device_count(NUM_DEVICES)

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests build the same small programs again (a fresh algorithm object is a fresh jit): a
# persistent compilation cache, private to this session, turns those recompiles into lookups.
# Shared by the xdist workers of one run (the same id in each), so a program one worker compiled
# is a lookup for the other.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
  _CACHE = os.path.join(tempfile.gettempdir(), f"diloco_jax_test_cache_{_RUN}")
  os.makedirs(_CACHE, exist_ok=True)
  if os.environ.get("PYTEST_XDIST_WORKER") == "gw0":
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
else:
  _CACHE = tempfile.mkdtemp(prefix="diloco_jax_test_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
