"""ONNX: torch.onnx.export(dynamo=True), opset 18, dynamic axes, explicit KV-cache I/O (ONNX keeps
no state), onnx.checker full check; quantized through `onnxruntime.quantization`; checked in
onnxruntime (and, for the smallest float graph, in onnx.reference too).

It also writes `onnx-genai/`, a folder onnxruntime-genai opens as it is (`og.Model(folder)`): the
tokenizer, embedding and decoder graphs in their `Convention.STOCK_VLM` variants, quantized by the
same recipe and checked against the same reference, plus `genai_config.json`, a tokenizer
onnxruntime-genai reads as `tokenizers` does, and `tokenizer_config.json`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from manzano_edge.export import onnx_genai
from manzano_edge.export.base import (
    BaseExporter,
    Entry,
    GraphJob,
    RunnerProgram,
    cannot_quantize,
    check_smaller,
    finish,
    register_exporter,
)
from manzano_edge.export.parity import SKIPPED, judge, run_parity
from manzano_edge.fsutil import path_digest
from manzano_edge.quant import onnx_ptq
from manzano_edge.quant.recipes import Support, is_float
from manzano_edge.runtime.backends.ort import OrtProgram, ReferenceProgram, StockVlmProgram
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import Convention, GraphKind, GraphSpec, GraphVariant, StateLayout, TensorSpec
from manzano_edge.spec.modules import build_module
from manzano_edge.spec.tracing import torch_dynamic_shapes, trace_args, variant_dynamic_shapes, variant_example

if TYPE_CHECKING:
    from manzano_edge.runtime.backends import GraphProgram

OPSET = 18
SUFFIX = ".onnx"
LAYOUT = StateLayout.EXPLICIT
# The graph also run in ONNX's own reference interpreter: the smallest one (it is slow), and float
# only (it has no com.microsoft kernels such as MatMulNBits).
REFERENCE_INTERPRETER_KIND = GraphKind.CODE_FEATURES

SUPPORT = {
    "fp32": Support(True, "torch.onnx dynamo export, float32"),
    "fp16": Support(False, "onnxruntime's CPU provider has no fp16 kernels for most ops; use fp32"),
    "w8": Support(True, "onnxruntime MatMulNBits bits=8, block 32, symmetric, int8 compute (accuracy_level 4; MatMul weights)"),
    "w8a8": Support(True, "onnxruntime.quantization int8: dynamic (default) or static QDQ on the inputs of "
                          "weighted MatMul/Gemm/Conv"),
    "w4": Support(True, "onnxruntime MatMulNBits bits=4, block 32, symmetric, int8 compute (accuracy_level 4; MatMul weights)"),
    "palette4": Support(False, "palettization is a Core ML format; ONNX has no LUT weights"),
}


def export(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    inputs, outputs = spec.io(LAYOUT)
    return _write(module, trace_args(spec, example, LAYOUT), inputs, outputs, torch_dynamic_shapes(spec, inputs), path)


def export_variant(spec: GraphSpec, variant: GraphVariant, module: nn.Module, path: Path) -> Path:
    return _write(module, variant_example(spec, variant), variant.inputs, variant.outputs,
                  variant_dynamic_shapes(spec, variant, module), path)


def _write(module: nn.Module, args: tuple, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
           dynamic_shapes: dict | tuple, path: Path) -> Path:
    import onnx

    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET,
                          input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                          dynamic_shapes=dynamic_shapes, external_data=_needs_external(module), verbose=False)
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

    def folders(self, opts) -> list[str]:
        return [self.name, onnx_genai.FOLDER]

    def quantized_layers(self, recipe: str) -> tuple[type, ...]:
        # Integer MatMul/Gemm/Conv for w8a8; MatMulNBits takes MatMul weights only.
        return {"w8a8": (nn.Linear, nn.Conv2d), "w8": (nn.Linear,), "w4": (nn.Linear,)}.get(recipe, ())

    def export(self, job: GraphJob) -> list[Entry]:
        spec = job.spec
        path = job.out / self.name / f"{spec.name}{SUFFIX}"
        entry = self._convert(job, lambda p: export(spec, build_module(spec, job.model, LAYOUT), job.examples[0], p),
                              path, LAYOUT, partial(OrtProgram, spec), spec)
        if job.check and spec.kind == REFERENCE_INTERPRETER_KIND and is_float(job.recipe):
            ref = run_parity(spec, TorchProgram(spec, build_module(spec, job.model)), ReferenceProgram(spec, path),
                             job.examples)
            entry.extra["reference_evaluator_psnr_db"] = ref["psnr_db"]
        entry.extra["io"] = spec.manifest_io(LAYOUT)
        entry.extra["opset"] = OPSET
        entries = [entry]
        variant = spec.variants.get(Convention.STOCK_VLM)
        if variant is not None:
            entries.append(self._export_variant(job, variant))
        return entries

    def _export_variant(self, job: GraphJob, variant: GraphVariant) -> Entry:
        """The graph in onnxruntime-genai's I/O, checked through the graph's own I/O (`StockVlmProgram`)."""
        spec = job.spec
        path = job.out / onnx_genai.FOLDER / f"{variant.file}{SUFFIX}"
        # A variant wraps the reference build's submodules under the same names, so --keep-float
        # layers resolve against the reference build.
        entry = self._convert(job, lambda p: export_variant(spec, variant, variant.build(job.model).eval(), p), path,
                              StateLayout.STATEFUL, partial(StockVlmProgram, spec), spec.float_outputs())
        entry.fmt = onnx_genai.FOLDER
        entry.extra["io"] = variant.manifest_io(spec.variant_dims)
        entry.extra["opset"] = OPSET
        entry.extra["runner"] = onnx_genai.RUNNER
        return entry

    def _convert(self, job: GraphJob, write_float: Callable[[Path], Path], path: Path, layout: str,
                 program_at: Callable[[Path], GraphProgram], checked: GraphSpec) -> Entry:
        """Write the float file (quantized by the job's recipe when it is not float), check it against
        the reference build on the job's examples, and return its manifest entry. `program_at` runs a
        file of this layout behind the graph's own I/O: static calibration and parity go through it."""
        spec, recipe, plan = job.spec, job.recipe, job.plan
        entry = Entry(spec.name, self.name)
        if is_float(recipe):
            write_float(path)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                float_path = write_float(Path(tmp) / path.name)
                mode = job.w8a8_mode(self.name) or "nbits"
                info = onnx_ptq.quantize(spec, float_path, path, recipe, mode, plan.calibration.get(spec.name),
                                         plan.keep_modules(spec, job.model, layout), program_at)
                if not onnx_ptq.quantized_anything(info):
                    why = "MatMulNBits covers MatMul weights only" if mode == "nbits" else \
                        f"no {'/'.join(info['op_types'])} node with constant weights"
                    raise cannot_quantize(spec, self.name, recipe, why)
                entry.extra["quantization"] = info
                float_bytes = path_digest(float_path)[1]
        if not job.check:
            entry.parity = dict(SKIPPED)
        else:
            entry.parity = run_parity(checked, TorchProgram(checked, build_module(spec, job.model)), program_at(path),
                                      job.examples)
        entry.extra["verified_by"] = "onnxruntime"
        judge(entry, recipe, fp16_compute=False)
        entry = finish(entry, path, job.out)
        if not is_float(recipe):
            check_smaller(entry, float_bytes)
        return entry

    def finish_bundle(self, out: Path, jobs: dict[str, GraphJob], entries: list[Entry], tokenizer_json: str) -> dict:
        cfg = next(iter(jobs.values())).model.cfg
        return {onnx_genai.RUNNER: onnx_genai.write_folder(out, cfg, tokenizer_json, entries)}

    def runner_programs(self, bundle, spec: GraphSpec) -> list[RunnerProgram]:
        entry = bundle.manifest["graphs"][spec.name]["formats"].get(onnx_genai.FOLDER)
        if entry is None:
            return []
        path = bundle.verified_file(entry["file"], entry["sha256"])
        return [RunnerProgram(onnx_genai.FOLDER, spec.float_outputs(), StockVlmProgram(spec, path),
                              entry["recipe"]["name"], entry["bytes"])]
