"""cabs_tf: placeholder package; the adapter lands with its issue."""
