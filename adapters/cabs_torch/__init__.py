"""cabs_torch: placeholder package; the adapter lands with its issue."""
