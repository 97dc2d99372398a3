"""Simulated host devices for the whole suite; set before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from diloco_jax import mesh  # noqa: E402  (sets XLA flags before any backend starts)

NUM_DEVICES = 8
mesh.set_cpu_device_count(NUM_DEVICES)
