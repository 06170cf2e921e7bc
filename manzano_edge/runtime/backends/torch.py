"""Eager PyTorch: the float reference every exported graph is compared with, and the benchmark's
baseline. It runs the checkpoint's modules, not a bundle file."""

from __future__ import annotations

import torch
from torch import nn

from manzano_edge.runtime.backends.base import Backend, register_backend
from manzano_edge.spec.graphs import GraphSpec
from manzano_edge.spec.modules import reset_states


class TorchProgram:
    """Eager PyTorch on one graph's module."""

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


TORCH = register_backend(Backend(name="torch", format=None, verified_by="eager PyTorch"))
