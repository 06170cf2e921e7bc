"""Runtime backends, one module each, registered by name (`base.BACKENDS`)."""

# Registration order is the order users see (torch, ort, executorch, coreml, coreai).
from manzano_edge.runtime.backends import torch, ort, executorch, coreml, coreai  # noqa: F401, I001  (registers each backend)
from manzano_edge.runtime.backends.base import (
    BACKENDS,
    Backend,
    GraphProgram,
    backend_for_format,
    get_backend,
    register_backend,
)

__all__ = ["BACKENDS", "Backend", "GraphProgram", "backend_for_format", "get_backend", "register_backend"]
