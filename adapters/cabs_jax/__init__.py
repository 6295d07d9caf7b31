"""cabs_jax: placeholder package; the adapter lands with its issue."""
