"""diloco_jax: DiLoCo and Streaming DiLoCo in JAX/Flax."""
