"""`manzano-edge validate`: per-graph and end-to-end accuracy of a bundle against its float reference."""
