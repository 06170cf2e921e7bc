"""manzano-edge."""
