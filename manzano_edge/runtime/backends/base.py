"""What a runtime backend is, and the registry the runtime, validate and bench look backends up in.

A backend is one module under `runtime/backends/`: its program class (one loaded graph), what it
needs to run here, how its threads are set, and what a result run on it is verified by. Adding a
runtime means adding one module and registering it; nothing else names it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from manzano_edge.errors import UserError
from manzano_edge.quiet import third_party_output
from manzano_edge.spec.graphs import GraphSpec


class GraphProgram(Protocol):
    """One loaded graph. Stateful graphs keep their KV cache between `run` calls until `reset`."""

    def reset(self) -> None: ...
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def always_runnable() -> tuple[bool, str]:
    return True, ""


def installed(module: str, extra: str = "export") -> Callable[[], tuple[bool, str]]:
    """`runnable_here` of a backend that needs only its Python package."""

    def check() -> tuple[bool, str]:
        if importlib.util.find_spec(module) is None:
            return False, f"{module} is not installed (pip install 'manzano-edge[{extra}]')"
        return True, ""

    return check


def torch_threads(threads: int) -> dict:
    """Eager graphs, and the pipeline's own tensor ops on every backend."""
    torch.set_num_threads(threads)
    return {"torch": torch.get_num_threads()}


@dataclass(frozen=True)
class Backend:
    name: str  # the --backend value
    format: str | None  # the bundle format it runs; None: eager PyTorch on a checkpoint
    verified_by: str  # what a result run on this backend was checked with
    load: Callable[..., GraphProgram] | None = None  # (spec, path, threads=0, compute_units=None)
    runnable_here: Callable[[], tuple[bool, str]] = always_runnable  # (ok, why not)
    apply_threads: Callable[[int], dict] = torch_threads  # sets what the runtime lets us set; returns what holds
    compute_units: tuple[str, ...] = ()  # devices a run may be pinned to (each benchmarked separately)
    runtime_note: str = ""  # what a report must say about numbers this runtime produced here

    def program(self, spec: GraphSpec, path: Path, threads: int = 0, compute_units: str | None = None) -> GraphProgram:
        ok, why = self.runnable_here()
        if not ok:
            raise UserError(f"the {self.name} backend cannot run here: {why}; "
                            f"use --backend {' or '.join(n for n, b in BACKENDS.items() if b.format and n != self.name)}")
        if self.load is None:
            raise UserError(f"the {self.name} backend runs a checkpoint, not a bundle file")
        with third_party_output():  # runtimes log as they import and initialise
            return self.load(spec, path, threads=threads, compute_units=compute_units)


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in BACKENDS:
        raise ValueError(f"backend '{backend.name}' is registered twice")
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend '{name}'; choose from {', '.join(BACKENDS)}") from None


def backend_for_format(fmt: str) -> Backend | None:
    """The backend that runs a bundle format's files, if any runtime here knows the format."""
    return next((b for b in BACKENDS.values() if b.format == fmt), None)
