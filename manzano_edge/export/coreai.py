"""Core AI (Apple's OS 27 runtime): torch.export -> coreai-torch -> .aimodel, compressed through
coreai-opt, and checked by *running* the asset in coreai-core's runtime (bundled in its Linux
wheel), against eager PyTorch over prefill and decode steps like every other format.

- One function per graph (`main`) with the graph's dynamic shapes: the decoder's one step serves
  prefill (T > 1) and decode (T = 1), its KV cache in Core AI state. A graph whose batch is
  dynamic (the DiT) ships one static function per batch size instead (`runtime/backends/coreai.py`).
- fp16 is a torch-side cast (`cast_fp32_to_fp16`): weights, activations, state and float I/O
  are fp16. w8 / w4 / palette4 are coreai-opt's post-conversion weight passes, which compress
  every weight of 1024+ elements feeding a matmul, conv, gather or transpose.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.export.base import (
    BaseExporter,
    Entry,
    GraphJob,
    cannot_quantize,
    check_smaller,
    finish,
    register_exporter,
)
from manzano_edge.export.parity import SKIPPED, judge, run_parity
from manzano_edge.quant import coreai_ptq
from manzano_edge.quant.recipes import GROUP_SIZE, PALETTE_GROUP_SIZE, Support, is_float
from manzano_edge.quiet import third_party_output
from manzano_edge.runtime.backends.coreai import (
    BATCH_DIM,
    INSTALL,
    PLATFORMS,
    VERIFIED_BY,
    CoreAIProgram,
    asset_info,
    batch_axes,
    batch_sizes,
    function_name,
    platform_supported,
)
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import GraphSpec
from manzano_edge.spec.modules import build_module
from manzano_edge.spec.tracing import torch_dynamic_shapes, trace_args

SUFFIX = ".aimodel"
# The OS that loads an .aimodel (coreai-torch's default `minimum_os`).
MINIMUM_OS = "iOS 27 / macOS 27"

SUPPORT = {
    "fp32": Support(True, "coreai-torch, float32"),
    "fp16": Support(True, "coreai-opt cast_fp32_to_fp16 before conversion: fp16 weights, activations, state and "
                          "float I/O"),
    "w8": Support(True, "coreai-opt quantize_weights int8 per-channel, symmetric (weight-only)"),
    "w8a8": Support(True, "coreai-opt Quantizer on Linear/Conv2d: int8 per-channel weights, static int8 input "
                          "activations calibrated in PyTorch"),
    "w4": Support(True, f"coreai-opt quantize_weights int4 per-block {GROUP_SIZE}, symmetric (weight-only)"),
    "palette4": Support(True, f"coreai-opt palettize_weights 4-bit k-means, one LUT per {PALETTE_GROUP_SIZE} output "
                              "channels (weight-only)"),
}
# The IR ops a compressed weight decompresses through: counted to prove a recipe compressed anything.
COMPRESSION_OPS = ("coreai.blockwise_shift_scale", "coreai.lut_to_dense")
ACTIVATION_QUANT_OP = "coreai.quantize"
W8A8_MODES = ("static",)


def decompositions() -> dict:
    """coreai-torch's table, plus `remainder`, which it cannot lower (FSQ's level parity)."""
    import coreai_torch

    table = coreai_torch.get_decomp_table()
    table[torch.ops.aten.remainder.Scalar] = _remainder
    table[torch.ops.aten.remainder.Tensor] = _remainder
    return table


def _remainder(x: torch.Tensor, other) -> torch.Tensor:
    return x - torch.div(x, other, rounding_mode="floor") * other


def static_batch(spec: GraphSpec, example: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """The example at batch size `batch` (its first row repeated)."""
    axes = batch_axes(spec)
    return {t.name: example[t.name].narrow(axes[t.name], 0, 1).repeat_interleave(batch, dim=axes[t.name])
            if t.name in axes else example[t.name] for t in spec.inputs}


def exported_function(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], batch: int | None,
                      fp16: bool) -> torch.export.ExportedProgram:
    """One function's program: the graph's dynamic shapes, the batch fixed where `batch` is given."""
    from coreai_opt.casting.casting import cast_fp32_to_fp16

    shapes = torch_dynamic_shapes(spec, spec.inputs)
    if batch is not None:
        example = static_batch(spec, example, batch)
        shapes = {name: ({i: d for i, d in dims.items() if d.__name__ != BATCH_DIM} or None) if dims else None
                  for name, dims in shapes.items()}
    with torch.no_grad():
        program = torch.export.export(module, trace_args(spec, example), dynamic_shapes=shapes, strict=False)
    program = program.run_decompositions(decompositions())
    return cast_fp32_to_fp16(program) if fp16 else program


def convert(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], fp16: bool = False):
    """The graph as a Core AI program (`coreai.authoring.AIProgram`), one function per batch size
    where the batch is dynamic, else one `main`. Release mode: the asset records op ids, not the
    stack traces (and source paths) of the machine that exported it."""
    from coreai_torch import TorchConverter

    converter = TorchConverter(mode=TorchConverter.Mode.RELEASE)
    for batch in batch_sizes(spec):
        converter.add_exported_program(exported_function(spec, module, example, batch, fp16),
                                       input_names=[t.name for t in spec.inputs],
                                       output_names=[t.name for t in spec.outputs],
                                       state_names=[s.name for s in spec.states],
                                       entrypoint_name=function_name(batch))
    return converter.to_coreai()


class _SkippedWeights(logging.Handler):
    """coreai-opt logs, and skips, each weight it cannot compress (a channel count its LUT
    groups do not divide): counted so that the manifest says how many stayed float."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.skipped: list[str] = []
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().splitlines()[0]
        if "Skipped this op" in message:
            self.skipped.append(message)
        elif message.startswith("Can't perform") or "Failed to" in message:
            self.reasons.append(message)


def compress(program, recipe: str):
    """(compressed program, {"tool", "skipped"}) through coreai-opt's weight passes."""
    from coreai_opt.coreai_utils import CompressionGranularity, DType, palettize_weights, quantize_weights

    handler = _SkippedWeights()
    log = logging.getLogger("coreai_opt")
    level = log.level
    log.setLevel(logging.WARNING)  # the quiet mode raises the root logger's level, which this inherits
    log.addHandler(handler)
    try:
        if recipe == "w8":
            program = quantize_weights(coreai_program=program, dtype=DType.INT8,
                                       granularity=CompressionGranularity.PER_CHANNEL, in_place=True)
        elif recipe == "w4":
            program = quantize_weights(coreai_program=program, dtype=DType.INT4,
                                       granularity=CompressionGranularity.PER_BLOCK, block_size=GROUP_SIZE,
                                       in_place=True)
        elif recipe == "palette4":
            # In-process k-means: coreai-opt's worker pool deadlocks after torch has started its threads.
            program = palettize_weights(coreai_program=program, lut_dtype=None, n_bits=4,
                                        granularity=CompressionGranularity.PER_GROUPED_CHANNEL,
                                        group_size=PALETTE_GROUP_SIZE, num_kmeans_workers=1, in_place=True)
        else:
            raise UserError(f"recipe '{recipe}' is not a Core AI weight compression; choose w8, w4 or palette4")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return program, {"tool": "coreai-opt", "skipped_weights": len(handler.skipped),
                     "skipped_because": sorted(set(handler.reasons))}


def op_histogram(program) -> dict[str, int]:
    """Core AI ops by count, over every function: a walk of the IR (printing it would write out
    every weight)."""
    from coreai._compiler.ir import WalkResult

    ops: Counter[str] = Counter()

    def count(op) -> WalkResult:
        ops[op.name] += 1
        return WalkResult.ADVANCE

    program._module._mlir_module.operation.walk(count)
    return dict(sorted((name, n) for name, n in ops.items() if name.startswith("coreai.")))


@register_exporter("coreai", SUPPORT, W8A8_MODES)
class CoreAIExporter(BaseExporter):
    name = "coreai"
    title = "Core AI"
    dependency = "coreai_torch"
    suffix = SUFFIX
    install_hint = f"{INSTALL} (coreai-core has wheels for {PLATFORMS} only)"

    def quantized_layers(self, recipe: str) -> tuple[type, ...]:
        # w8a8 quantizes Linear/Conv2d; the weight passes compress any large enough weight.
        return coreai_ptq.OP_TYPES if recipe == "w8a8" else ()

    def check_options(self, opts) -> None:
        ok, why = platform_supported()
        if not ok:
            raise UserError(f"format 'coreai' cannot convert here: {why}")
        layers = [item.strip() for item in (opts.keep_float or "").split(",")
                  if item.strip() and not item.strip().startswith("graph:")]
        if layers and getattr(opts.recipe, "name", opts.recipe) != "w8a8":
            raise UserError(f"--keep-float {','.join(layers)}: coreai-opt's weight passes compress a whole graph, "
                            "so coreai keeps layers float only under w8a8; keep whole graphs float with "
                            "--keep-float graph:NAME")

    def export(self, job: GraphJob) -> list[Entry]:
        spec, recipe = job.spec, job.recipe
        entry = Entry(spec.name, self.name)
        path = job.out / self.name / f"{spec.name}{SUFFIX}"
        module = build_module(spec, job.model)
        fp16 = recipe == "fp16"
        with third_party_output():
            self._write(job, module, path, entry)
        if job.check:
            entry.parity = run_parity(spec, TorchProgram(spec, build_module(spec, job.model)),
                                      CoreAIProgram(spec, path), job.examples)
        else:
            entry.parity = dict(SKIPPED)
        entry.extra.update({"io": spec.manifest_io(), "io_dtype": "float16" if fp16 else "float32",
                            "functions": [function_name(b) for b in batch_sizes(spec)],
                            "compute_precision": "fp16" if fp16 else "fp32", "minimum_os": MINIMUM_OS,
                            "asset": asset_info(path), "verified_by": VERIFIED_BY})
        judge(entry, recipe, fp16_compute=fp16)
        entry = finish(entry, path, job.out)
        if not is_float(recipe):
            # Float weights at fp32: every recipe must come in under them, or it silently ran float.
            check_smaller(entry, sum(t.numel() * 4 for t in module.state_dict().values() if t.is_floating_point()))
        return [entry]

    def _write(self, job: GraphJob, module: nn.Module, path: Path, entry: Entry) -> None:
        """Quantize (w8a8, before conversion), convert, compress (weight-only recipes, after) and save
        the asset; refuse a quantized recipe whose program shows no quantization."""
        spec, recipe = job.spec, job.recipe
        converted = module
        if recipe == "w8a8":
            converted, entry.extra["quantization"] = coreai_ptq.w8a8(
                spec, module, job.examples[0], job.plan.calibration.get(spec.name), job.plan.keep_modules(spec, job.model))
        program = convert(spec, converted, job.examples[0], fp16=recipe == "fp16")
        del converted
        if recipe in ("w8", "w4", "palette4"):
            program, entry.extra["quantization"] = compress(program, recipe)
        program.save_asset(path)
        entry.extra["ops"] = ops = op_histogram(program)
        if is_float(recipe):
            return
        info = entry.extra["quantization"]
        if recipe == "w8a8" and not ops.get(ACTIVATION_QUANT_OP):
            raise cannot_quantize(spec, self.name, recipe, "the converted program has no quantize op, so it would "
                                  "run float")
        info["compressed_weights"] = sum(ops.get(op, 0) for op in COMPRESSION_OPS)
        info["activation_quant_ops"] = ops.get(ACTIVATION_QUANT_OP, 0)
        if not info["compressed_weights"]:
            why = "; ".join(r.rstrip(".") for r in info.get("skipped_because", [])) or \
                "every weight is under 1024 elements or feeds no matmul/conv/gather"
            raise cannot_quantize(spec, self.name, recipe, f"coreai-opt compressed no weight ({why})")
