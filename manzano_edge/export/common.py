"""Helpers every exporter shares: tracing arguments and dynamic shapes from a GraphSpec, the
program interface the parity check (and the runtime) drives, and file hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from manzano_edge.export.spec import Dim, GraphSpec, TensorSpec
from manzano_edge.models.manzano import Manzano


class GraphProgram(Protocol):
    """One loaded graph. Stateful graphs keep their KV cache between `run` calls until `reset`."""

    def reset(self) -> None: ...
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def torch_dynamic_shapes(spec: GraphSpec, inputs: tuple[TensorSpec, ...]) -> dict:
    dims = {n: torch.export.Dim(d.name, min=d.min, max=d.max) for n, d in spec.dims.items()}
    return {t.name: ({i: dims[d.name] for i, d in enumerate(t.shape) if isinstance(d, Dim)} or None) for t in inputs}


def initial_states(spec: GraphSpec) -> dict[str, torch.Tensor]:
    return {s.name: torch.zeros(s.concrete({}), dtype=torch.float32) for s in spec.states}


def trace_args(spec: GraphSpec, example: dict[str, torch.Tensor], explicit_state: bool) -> tuple[torch.Tensor, ...]:
    inputs, _ = spec.io(explicit_state)
    values = {**initial_states(spec), **example}
    return tuple(values[t.name] for t in inputs)


def build_module(spec: GraphSpec, model: Manzano, explicit_state: bool, executorch: bool = False) -> nn.Module:
    """The graph's module: stateful (Core ML, eager), explicit-state (ONNX) or, with
    `executorch`, the ExecuTorch XNNPACK variant where the spec has one."""
    if explicit_state and spec.build_explicit:
        builder = spec.build_explicit
    elif executorch and spec.build_executorch:
        builder = spec.build_executorch
    else:
        builder = spec.build
    module = builder(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)  # ExecuTorch refuses in-place buffer writes next to grad-requiring leaves
    return module


def export_program(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor],
                   explicit_state: bool) -> torch.export.ExportedProgram:
    inputs, _ = spec.io(explicit_state)
    with torch.no_grad():
        return torch.export.export(module, trace_args(spec, example, explicit_state),
                                   dynamic_shapes=torch_dynamic_shapes(spec, inputs), strict=False)


def reset_states(module: nn.Module, spec: GraphSpec) -> None:
    """Zero a module's KV-cache buffers: the spec's states, or their per-layer split (`k_cache_3`)
    in the ExecuTorch build. Works on exported/quantized GraphModules, which have no `reset()`."""
    names = {s.name for s in spec.states}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            leaf = name.split(".")[-1]
            if leaf in names or leaf.rstrip("0123456789").rstrip("_") in names:
                buf.zero_()


class TorchProgram:
    """Eager PyTorch on the same module: the parity reference."""

    def __init__(self, spec: GraphSpec, module: nn.Module) -> None:
        self.spec, self.module = spec, module

    def reset(self) -> None:
        if hasattr(self.module, "reset"):
            self.module.reset()
        else:
            reset_states(self.module, self.spec)

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.module(*(inputs[t.name] for t in self.spec.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(self.spec.outputs, out)}


def path_digest(path: Path) -> tuple[str, int]:
    """sha256 and byte size of a file, or of a directory (.mlpackage) over its sorted files."""
    h, size = hashlib.sha256(), 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        size += f.stat().st_size
    return h.hexdigest(), size
