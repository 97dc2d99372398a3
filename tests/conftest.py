"""Simulated host devices for the whole suite; set before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from diloco_jax import mesh  # noqa: E402  (sets XLA flags before any backend starts)

NUM_DEVICES = 8
mesh.set_cpu_device_count(NUM_DEVICES)

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests build the same small programs again (a fresh algorithm object is a fresh jit): a
# persistent compilation cache, private to this session, turns those recompiles into lookups.
_CACHE = tempfile.mkdtemp(prefix="diloco_jax_test_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
