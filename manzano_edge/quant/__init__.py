"""Quantization recipes (DESIGN.md §4) and their mapping onto each backend's native tooling."""
