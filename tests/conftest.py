"""Simulated host devices for the whole suite; set before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound on tiny programs, so three XLA CPU settings, inherited by the
# subprocesses the tests start: no backend optimisation passes (they cost more compile time,
# ~16 %, than they save here); the classic emitters, not the fusion emitters (~40 % less
# compile time); and no FMA instructions (max ISA AVX). LLVM contracts a·b + c into one fused
# multiply-add wherever both sit in one fused loop, so with FMA the last bit of an update
# depends on how XLA fused the program around it: Streaming DiLoCo with P = 1, τ = 0 and plain
# DiLoCo, the same arithmetic in two graphs, then differ by one ulp at the first outer step
# under the classic emitters (not with FMA off). Without FMA each multiply and add rounds on
# its own, whatever the fusion.
_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
          "--xla_cpu_max_isa=AVX")
_SET = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_SET] + [f for f in _FLAGS
                                             if f.split("=")[0] not in _SET]).strip()
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
