"""Exporters, one module per format, registered by name (`base.EXPORTERS`)."""

# Registration order is the order users see, and the order `export` writes the formats in.
from manzano_edge.export import coreml, onnx, executorch, coreai  # noqa: F401, I001  (registers each exporter)
from manzano_edge.export.base import EXPORTERS, Entry, Exporter, GraphJob, get_exporter, register_exporter

FORMATS = tuple(EXPORTERS)

__all__ = ["EXPORTERS", "FORMATS", "Entry", "Exporter", "GraphJob", "get_exporter", "register_exporter"]
