"""ONNX: torch.onnx.export(dynamo=True), opset 18, dynamic axes, explicit KV-cache I/O (ONNX keeps
no state), onnx.checker full check; quantized through `onnxruntime.quantization`; checked in
onnxruntime (and, for the smallest float graph, in onnx.reference too)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from manzano_edge.export.base import BaseExporter, Entry, GraphJob, cannot_quantize, check_smaller, finish, register_exporter
from manzano_edge.export.parity import SKIPPED, judge, run_parity
from manzano_edge.fsutil import path_digest
from manzano_edge.quant import onnx_ptq
from manzano_edge.quant.recipes import Support, is_float
from manzano_edge.runtime.backends.ort import OrtProgram, ReferenceProgram
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import GraphKind, GraphSpec, StateLayout
from manzano_edge.spec.modules import build_module
from manzano_edge.spec.tracing import torch_dynamic_shapes, trace_args

OPSET = 18
SUFFIX = ".onnx"
LAYOUT = StateLayout.EXPLICIT
# The graph also run in ONNX's own reference interpreter: the smallest one (it is slow), and float
# only (it has no com.microsoft kernels such as MatMulNBits).
REFERENCE_INTERPRETER_KIND = GraphKind.CODE_FEATURES

SUPPORT = {
    "fp32": Support(True, "torch.onnx dynamo export, float32"),
    "fp16": Support(False, "onnxruntime's CPU provider has no fp16 kernels for most ops; use fp32"),
    "w8": Support(True, "onnxruntime MatMulNBits bits=8, block 32, symmetric (weight-only; MatMul weights)"),
    "w8a8": Support(True, "onnxruntime.quantization int8: dynamic (default) or static QDQ restricted to "
                          "MatMul/Gemm/Conv"),
    "w4": Support(True, "onnxruntime MatMulNBits bits=4, block 32, symmetric (weight-only; MatMul weights)"),
    "palette4": Support(False, "palettization is a Core ML format; ONNX has no LUT weights"),
}


def export(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    import onnx

    inputs, outputs = spec.io(LAYOUT)
    with torch.no_grad():
        torch.onnx.export(module, trace_args(spec, example, LAYOUT), str(path), dynamo=True, opset_version=OPSET,
                          input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                          dynamic_shapes=torch_dynamic_shapes(spec, inputs), external_data=_needs_external(module),
                          verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _needs_external(module: nn.Module) -> bool:
    # A protobuf file is capped at 2 GB: larger graphs keep weights in a side file.
    return sum(p.numel() * p.element_size() for p in module.parameters()) > 1.8e9


# Per-call (dynamic) activation scales beat MinMax-calibrated static ones on every graph
# (docs/guides/quantization-and-validation.md), so dynamic is the default.
W8A8_MODES = ("dynamic", "static")


@register_exporter("onnx", SUPPORT, W8A8_MODES)
class OnnxExporter(BaseExporter):
    name = "onnx"
    title = "ONNX"
    dependency = "onnxruntime"
    suffix = SUFFIX

    def quantized_layers(self, recipe: str) -> tuple[type, ...]:
        # Integer MatMul/Gemm/Conv for w8a8; MatMulNBits takes MatMul weights only.
        return {"w8a8": (nn.Linear, nn.Conv2d), "w8": (nn.Linear,), "w4": (nn.Linear,)}.get(recipe, ())

    def export(self, job: GraphJob) -> list[Entry]:
        spec, model, recipe, plan = job.spec, job.model, job.recipe, job.plan
        entry = Entry(spec.name, self.name)
        path = job.out / self.name / f"{spec.name}{SUFFIX}"
        module = build_module(spec, model, LAYOUT)
        if is_float(recipe):
            export(spec, module, job.examples[0], path)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                float_path = Path(tmp) / path.name
                export(spec, module, job.examples[0], float_path)
                mode = plan.modes[self.name] if recipe == "w8a8" else "nbits"
                info = onnx_ptq.quantize(spec, float_path, path, recipe, mode, plan.calibration.get(spec.name),
                                         plan.keep_modules(spec, model, LAYOUT))
                if not onnx_ptq.quantized_anything(info):
                    why = "MatMulNBits covers MatMul weights only" if mode == "nbits" else \
                        f"no {'/'.join(info['op_types'])} node with constant weights"
                    raise cannot_quantize(spec, self.name, recipe, why)
                entry.extra["quantization"] = info
                float_bytes = path_digest(float_path)[1]
        if not job.check:
            entry.parity = dict(SKIPPED)
        else:
            entry.parity = run_parity(spec, TorchProgram(spec, build_module(spec, model)), OrtProgram(spec, path),
                                      job.examples)
        if job.check and spec.kind == REFERENCE_INTERPRETER_KIND and is_float(recipe):
            ref = run_parity(spec, TorchProgram(spec, build_module(spec, model)), ReferenceProgram(spec, path),
                             job.examples)
            entry.extra["reference_evaluator_psnr_db"] = ref["psnr_db"]
        entry.extra["io"] = spec.manifest_io(LAYOUT)
        entry.extra["opset"] = OPSET
        entry.extra["verified_by"] = "onnxruntime"
        judge(entry, recipe, fp16_compute=False)
        entry = finish(entry, path, job.out)
        if not is_float(recipe):
            check_smaller(entry, float_bytes)
        return [entry]
