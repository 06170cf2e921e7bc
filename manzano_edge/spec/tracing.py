"""Tracing a graph from its declaration: the arguments in declared order, the dynamic shapes,
the initial states, and the `torch.export` program every converter starts from."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from manzano_edge.spec.graphs import DTYPES, Dim, GraphSpec, GraphVariant, StateLayout, TensorSpec


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


def variant_dynamic_shapes(spec: GraphSpec, variant: GraphVariant, module: nn.Module) -> tuple:
    """In the order of the module's forward arguments, a trailing `*args` as one nested tuple
    (torch.export matches dynamic shapes to the signature's structure)."""
    dims = {n: torch.export.Dim(d.name, min=d.min, max=d.max) for n, d in spec.variant_dims.items()}
    shapes = [{i: dims[d.name] for i, d in enumerate(t.shape) if isinstance(d, Dim)} or None for t in variant.inputs]
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(params) - 1
        return (*shapes[:fixed], tuple(shapes[fixed:]))
    return tuple(shapes)


def variant_example(spec: GraphSpec, variant: GraphVariant) -> tuple[torch.Tensor, ...]:
    """Tracing inputs for a variant: each dynamic dim at a size inside its range and away from 0 and 1
    (torch.export specialises those), negative image slots in the ids to splice."""
    sizes = {name: min(max(2, d.min), d.max) + 1 for name, d in spec.variant_dims.items()}
    if "total" in sizes:  # the decoder's attention mask spans the past and the new positions
        sizes["total"] = sizes["past"] + sizes["seq"]
    args = []
    for t in variant.inputs:
        shape = t.concrete(sizes)
        if t.name == "input_ids":
            ids = torch.arange(shape[1]).remainder(4).unsqueeze(0)
            ids[0, :-1] = -1  # image slots, then a text token
            args.append(ids.to(DTYPES[t.dtype]))
        elif t.dtype.startswith("int"):
            args.append(torch.ones(shape, dtype=DTYPES[t.dtype]))
        else:
            args.append(torch.randn(shape).to(DTYPES[t.dtype]))
    return tuple(args)
