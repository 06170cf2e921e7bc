"""What an exporter is, and the registry `export` loops over.

A format is one module under `export/` that registers one `Exporter`: it builds each graph's
module in the state layout its runtime needs, converts and quantizes it (through `quant/`),
checks parity against eager PyTorch (`parity.py`) and returns the manifest entries it wrote.
`bundle.py` knows no format by name; adding one means adding one module and importing it in
`export/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from manzano_edge.errors import UserError
from manzano_edge.fsutil import path_digest
from manzano_edge.models.manzano import Manzano
from manzano_edge.quant.recipes import Support, register_support
from manzano_edge.quiet import third_party_output
from manzano_edge.spec.graphs import GraphSpec

if TYPE_CHECKING:
    from manzano_edge.data.text import TextCodec
    from manzano_edge.export.bundle import ExportOptions
    from manzano_edge.export.plan import QuantPlan
    from manzano_edge.runtime.backends import GraphProgram
    from manzano_edge.runtime.bundle import Bundle


@dataclass
class Entry:
    """One graph x format in the manifest."""

    graph: str
    fmt: str
    file: str = ""
    sha256: str = ""
    bytes: int = 0
    seconds: float = 0.0
    parity: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    passed: bool = True
    error: str = ""
    how: str = ""  # the mechanism, when it is more specific than the recipe table's
    exporter: str = ""  # the format that wrote it (`fmt` is its folder: one exporter may write two)


@dataclass
class GraphJob:
    """Everything an exporter needs for one graph."""

    spec: GraphSpec
    model: Manzano
    examples: list[dict[str, torch.Tensor]]
    out: Path  # the bundle's temporary directory
    recipe: str  # this graph's recipe (fp32 when --keep-float keeps the graph float)
    opts: ExportOptions
    plan: QuantPlan | None = None

    @property
    def check(self) -> bool:
        return self.opts.parity

    @property
    def requested_recipe(self) -> str:
        return self.opts.recipe

    def w8a8_mode(self, fmt: str) -> str | None:
        """The activation mode `fmt` quantizes this graph's w8a8 with (None: the recipe is not w8a8)."""
        return self.plan.modes[fmt] if self.recipe == "w8a8" else None


class Exporter(Protocol):
    name: str  # the --format value and the bundle's subfolder
    title: str  # how reports name the format ("Core ML")
    dependency: str  # the module the format needs installed
    suffix: str  # the graph file's suffix

    def folders(self, opts: ExportOptions) -> list[str]:
        """The bundle subfolders this export writes into."""
        ...

    def quantized_layers(self, recipe: str) -> tuple[type, ...]:
        """The module types `recipe` quantizes on this format; a graph with none of them stays float.
        Empty: the recipe compresses any weight."""
        ...

    def check_options(self, opts: ExportOptions) -> None:
        """Refuse this format's options that make no sense, with one line."""
        ...

    def export(self, job: GraphJob) -> list[Entry]:
        """Convert one graph, check it, and return the manifest entries of the files written."""
        ...

    def emulated_program(self, bundle: Bundle, spec: GraphSpec, model: Manzano, codec: TextCodec,
                         entry: dict) -> GraphProgram | None:
        """A stand-in that runs this format's file where its runtime cannot (None: none exists)."""
        ...

    def emulation_notes(self, recipe: str, exported_from: str | None) -> list[str]:
        """What a report must say about the graphs `emulated_program` stood in for."""
        ...

    def finish_bundle(self, out: Path, jobs: dict[str, GraphJob], entries: list[Entry], tokenizer_json: str) -> dict:
        """After every graph (`jobs`: this format's, by graph): write the files that span graphs (a
        stock runner's program or config) and return the manifest's `runners` records of them."""
        ...

    def runner_programs(self, bundle: Bundle, spec: GraphSpec) -> list[RunnerProgram]:
        """The bundle's stock-runner files of this format that compute graph `spec`, each behind the
        graph's own I/O, for `validate` ([]: none)."""
        ...


@dataclass
class RunnerProgram:
    """One stock-runner file (or program method) that computes a graph, as `validate` scores it."""

    label: str  # the report's format column: the runner folder, and the method where one file has several
    spec: GraphSpec  # the graph's declaration restricted to what the runner's file computes
    program: GraphProgram
    recipe: str
    bytes: int


class BaseExporter:
    """The defaults of the `Exporter` protocol: one folder named after the format, no options of its
    own, no emulation. A format module overrides what it does differently."""

    name: str

    def folders(self, opts: ExportOptions) -> list[str]:
        return [self.name]

    def check_options(self, opts: ExportOptions) -> None:
        return None

    def emulated_program(self, bundle: Bundle, spec: GraphSpec, model: Manzano, codec: TextCodec,
                         entry: dict) -> GraphProgram | None:
        return None

    def emulation_notes(self, recipe: str, exported_from: str | None) -> list[str]:
        return []

    def finish_bundle(self, out: Path, jobs: dict[str, GraphJob], entries: list[Entry], tokenizer_json: str) -> dict:
        return {}

    def runner_programs(self, bundle: Bundle, spec: GraphSpec) -> list[RunnerProgram]:
        return []


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, support: dict[str, Support],
                      w8a8_modes: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: registers one instance of the exporter under `name`, and the recipes it
    implements (and refuses, with why) in the one recipe table, with its w8a8 activation modes."""

    def wrap(cls: type) -> type:
        if name in EXPORTERS:
            raise ValueError(f"format '{name}' is registered twice")
        register_support(name, support, w8a8_modes)
        instance = cls()
        instance.name = name
        EXPORTERS[name] = instance
        return cls

    return wrap


def get_exporter(name: str) -> Exporter:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise UserError(f"unknown format '{name}'; choose from {', '.join(EXPORTERS)}") from None


def check_dependency(exporter: Exporter) -> None:
    try:
        with third_party_output():  # converters warn about versions as they import
            __import__(exporter.dependency)
    except ImportError as exc:
        hint = getattr(exporter, "install_hint", "pip install 'manzano-edge[export]'")
        raise UserError(f"format '{exporter.name}' needs {exporter.dependency}, which is not installed; {hint}") from exc


def cannot_quantize(spec: GraphSpec, fmt: str, recipe: str, why: str) -> UserError:
    return UserError(f"recipe '{recipe}' cannot quantize graph '{spec.name}' on {fmt}: {why}; keep it float with "
                     f"--keep-float graph:{spec.name} or leave it out with --graphs")


def check_smaller(entry: Entry, float_bytes: int) -> None:
    """A quantized file must come in under the float one, or the recipe silently ran float."""
    entry.extra["float_bytes"] = float_bytes
    if entry.bytes >= float_bytes:
        entry.passed = False
        entry.error = f"quantized file ({entry.bytes} B) is not smaller than the float one ({float_bytes} B)"


def finish(entry: Entry, path: Path, out: Path) -> Entry:
    """Record the written file (and any side files) with hash and size."""
    entry.file = str(path.relative_to(out))
    entry.sha256, entry.bytes = path_digest(path)
    side = sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file())  # ONNX external weights (> 2 GB)
    if side:
        entry.extra["external_data"] = []
        for p in side:
            digest, size = path_digest(p)
            entry.extra["external_data"].append({"file": str(p.relative_to(out)), "sha256": digest, "bytes": size})
            entry.bytes += size
    return entry
