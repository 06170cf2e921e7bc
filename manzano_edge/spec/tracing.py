"""Tracing a graph from its declaration: the arguments in declared order, the dynamic shapes,
the initial states, and the `torch.export` program every converter starts from."""

from __future__ import annotations

import torch
from torch import nn

from manzano_edge.spec.graphs import Dim, GraphSpec, StateLayout, TensorSpec


def torch_dynamic_shapes(spec: GraphSpec, inputs: tuple[TensorSpec, ...]) -> dict:
    dims = {n: torch.export.Dim(d.name, min=d.min, max=d.max) for n, d in spec.dims.items()}
    return {t.name: ({i: dims[d.name] for i, d in enumerate(t.shape) if isinstance(d, Dim)} or None) for t in inputs}


def initial_states(spec: GraphSpec) -> dict[str, torch.Tensor]:
    return {s.name: torch.zeros(s.concrete({}), dtype=torch.float32) for s in spec.states}


def trace_args(spec: GraphSpec, example: dict[str, torch.Tensor],
               layout: str = StateLayout.STATEFUL) -> tuple[torch.Tensor, ...]:
    inputs, _ = spec.io(layout)
    values = {**initial_states(spec), **example}
    return tuple(values[t.name] for t in inputs)


def export_program(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor],
                   layout: str = StateLayout.STATEFUL) -> torch.export.ExportedProgram:
    inputs, _ = spec.io(layout)
    with torch.no_grad():
        return torch.export.export(module, trace_args(spec, example, layout),
                                   dynamic_shapes=torch_dynamic_shapes(spec, inputs), strict=False)
