"""Exporters: one module per format, all driven by the graph declarations in spec.py."""
