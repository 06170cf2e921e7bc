"""The quantization plan of one export: the recipe per graph, the layers kept float
(`--keep-float`), the w8a8 activation mode per format and the calibration samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import Manzano
from manzano_edge.quant import calibration as calib
from manzano_edge.quant.overrides import KeepFloat, check_all_matched, parse_keep_float, resolve_layers
from manzano_edge.quant.recipes import check_mode, default_w8a8_modes, is_float
from manzano_edge.spec.graphs import GraphSpec, StateLayout
from manzano_edge.spec.modules import build_module

if TYPE_CHECKING:
    from manzano_edge.export.bundle import ExportOptions


@dataclass
class QuantPlan:
    """What a quantized export needs per graph: the recipe, layers kept float, calibration."""

    recipe: str
    keep: KeepFloat
    modes: dict[str, str]
    calibration: dict[str, list] = field(default_factory=dict)
    calibration_source: str = ""
    calibration_samples: int | None = None  # generated (seeded, so validate can rebuild them); None for a file
    layer_modules: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (graph, layout) -> names
    # (graph, format) -> why the recipe cannot quantize it there: exported float without being asked
    automatic: dict[tuple[str, str], str] = field(default_factory=dict)

    def recipe_for(self, graph: str, fmt: str | None = None) -> str:
        if graph in self.keep.graphs or (graph, fmt) in self.automatic:
            return "fp32"
        return self.recipe

    def keep_modules(self, spec: GraphSpec, model: Manzano, layout: str = StateLayout.STATEFUL) -> list[str]:
        key = (spec.name, layout)
        if key not in self.layer_modules:
            module = build_module(spec, model, layout)
            self.layer_modules[key] = resolve_layers(module, self.keep).modules
        return self.layer_modules[key]

    def manifest(self, graph: str, fmt: str, info: dict) -> dict:
        """The manifest's recipe record of one graph as exported by format `fmt`."""
        out = {"name": self.recipe_for(graph, fmt), "requested": self.recipe}
        if graph in self.keep.graphs:
            out["kept_float"] = f"--keep-float graph:{graph}"
        elif (graph, fmt) in self.automatic:
            out["kept_float"] = f"automatic: {self.automatic[(graph, fmt)]}"
        # Every backend resolves per-layer overrides through keep_modules, so they are recorded
        # here once (validate's Core ML w8a8 rebuild reads them back).
        kept_layers = sorted({n for (g, _), names in self.layer_modules.items() if g == graph for n in names})
        details = {**info, **({"kept_float_layers": kept_layers} if kept_layers else {})}
        if details:
            out["details"] = details
        if not self.keep.empty:
            out["keep_float"] = self.keep.to_json()
        return out


def plan_quantization(model: Manzano, codec: TextCodec, specs: dict[str, GraphSpec], graphs: list[str],
                      opts: ExportOptions) -> QuantPlan | None:
    if is_float(opts.recipe):
        if opts.keep_float:
            raise UserError(f"--keep-float only applies to quantized recipes; '{opts.recipe}' is float already")
        return None
    keep = parse_keep_float(opts.keep_float, list(specs))
    defaults = default_w8a8_modes()
    modes = {fmt: check_mode(fmt, opts.w8a8_mode.get(fmt, defaults.get(fmt, "static"))) for fmt in opts.formats}
    plan = QuantPlan(opts.recipe, keep, modes)
    matched: set[str] = set()
    for name in graphs:
        if name not in keep.graphs:
            matched |= resolve_layers(build_module(specs[name], model), keep).matched_items
    check_all_matched(keep, matched, [g for g in graphs if g not in keep.graphs])
    plan.automatic = unquantizable(model, specs, [g for g in graphs if g not in keep.graphs], opts)
    needs_calibration = opts.recipe == "w8a8" and any(modes.get(f) == "static" for f in opts.formats)
    if needs_calibration:
        if opts.calibration_file:
            plan.calibration = calib.from_file(opts.calibration_file, specs)
            plan.calibration_source = f"file {Path(opts.calibration_file).name}"
        else:
            plan.calibration = calib.generated(model, codec, opts.calibration_samples)
            plan.calibration_samples = opts.calibration_samples
            plan.calibration_source = f"generated: {opts.calibration_samples} samples (seeds from {calib.CALIBRATION_SEED})"
        for name in graphs:
            if name not in keep.graphs:
                if not plan.calibration.get(name):
                    raise UserError(f"calibration data has no samples for graph '{name}'")
                calib.check_shapes(specs[name], plan.calibration[name])
    return plan


def unquantizable(model: Manzano, specs: dict[str, GraphSpec], graphs: list[str],
                  opts: ExportOptions) -> dict[tuple[str, str], str]:
    """(graph, format) -> why the recipe cannot quantize the graph on that format: it has none of the
    layers the format's recipe quantizes (an embedding table, an all-conv decoder under a Linear-only
    recipe). Such a graph stays float, recorded, unless the user named it in --graphs: then the
    refusal comes now, before any conversion."""
    from manzano_edge.export.base import EXPORTERS, cannot_quantize

    named = set(opts.graphs or []) - {"all"}
    found: dict[tuple[str, str], str] = {}
    for name in graphs:
        module = build_module(specs[name], model)
        for fmt in opts.formats:
            layers = EXPORTERS[fmt].quantized_layers(opts.recipe)
            if not layers or any(isinstance(m, layers) for m in module.modules()):
                continue
            why = f"{fmt} {opts.recipe} quantizes {'/'.join(t.__name__ for t in layers)} layers and {name} has none"
            if name in named:
                raise cannot_quantize(specs[name], fmt, opts.recipe, why)
            found[(name, fmt)] = why
    return found
