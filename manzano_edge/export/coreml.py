"""Core ML: torch.export -> coremltools mlprogram (.mlpackage, iOS 18), weight compression
through `coremltools.optimize.coreml`, and verification that works on Linux.

Core ML cannot run on Linux (`predict` is macOS-only and coremltools has no MIL
interpreter), so a Linux export is verified two ways:
- structurally: inputs/outputs/states and flexible-shape ranges against the GraphSpec, the
  op histogram, and that each compressed weight decompresses (cto.coreml.decompress_weights)
  to within the recipe's quantization step of the float weight;
- numerically, by emulation: the same PyTorch graph run with the weights exactly as Core ML
  stores them (decompressed, fp16) and, for fp16 compute, in fp16 arithmetic.
On macOS, `CoreMLProgram` runs the real model with `predict` and a Core ML state.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from manzano_edge.data.images import PIXEL_HALF_RANGE
from manzano_edge.errors import UserError
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
from manzano_edge.quant import calibration as calib
from manzano_edge.quant import coreml_ptq
from manzano_edge.quant.recipes import GROUP_SIZE, PALETTE_GROUP_SIZE, Support, is_float
from manzano_edge.runtime.backends.coreml import CoreMLProgram, EmulatedProgram, image_inputs, predict_available
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import Dim, GraphSpec, GraphVariant
from manzano_edge.spec.modules import build_module
from manzano_edge.spec.tracing import export_program

SUFFIX = ".mlpackage"
PRECISIONS = ("fp16", "fp32")  # compute precision of float recipes (--coreml-precision)
# Deployment targets (--coreml-target): the stateful decoder needs Core ML states (iOS 18 / macOS 15).
TARGETS = ("iOS18", "macOS15", "iOS26", "macOS26")
DEFAULT_TARGET = "iOS18"
# The model name swift-transformers reads from a model's metadata.
MODEL_NAME_KEY = "co.huggingface.exporters.name"

SUPPORT = {
    "fp32": Support(True, "mlprogram, fp32 compute"),
    "fp16": Support(True, "mlprogram, fp16 compute"),
    "w8": Support(True, "coremltools.optimize.coreml linear_quantize_weights int8 per-channel"),
    "w4": Support(True, "coremltools.optimize.coreml linear_quantize_weights int4 per-block 32"),
    "palette4": Support(True, "coremltools.optimize.coreml palettize_weights 4-bit k-means"),
    "w8a8": Support(True, "pt2e CoreMLQuantizer (coremltools LinearQuantizerConfig) on Linear/Conv2d: int8 "
                          "per-channel weights, static int8 activations calibrated in PyTorch (coremltools' own "
                          "calibration needs predict() on macOS)"),
}
# What the converter and compressors append to a weight const's name.
_SUFFIXES = ("_to_fp16", "_to_fp32", "_quantized", "_palettized")
COMPRESSION = {"w8": "int8 per-channel", "w4": "int4 per-block 32", "palette4": "4-bit k-means LUT"}


def _ct():
    try:
        import coremltools as ct
    except ImportError as exc:
        raise UserError("coremltools is not installed; pip install 'manzano-edge[export]'") from exc
    return ct


def convert(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], fp16: bool = True,
            target: str = DEFAULT_TARGET):
    return convert_program(spec, export_program(spec, module, example), fp16, target)


def convert_program(spec: GraphSpec | GraphVariant, program: torch.export.ExportedProgram, fp16: bool = True,
                    target: str = DEFAULT_TARGET):
    ct = _ct()
    # Symbolic-shape broadcasting is logged as a warning per op; it is expected with flexible shapes.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct.convert(program.run_decompositions({}), convert_to="mlprogram",
                      minimum_deployment_target=getattr(ct.target, target),
                      compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                      inputs=input_types(spec),
                      outputs=[ct.TensorType(name=t.name) for t in spec.outputs])


def input_types(spec: GraphSpec | GraphVariant) -> list | None:
    """An image input becomes an RGB `ImageType` (an app passes a CVPixelBuffer or CGImage) that
    applies the pixel encoding in the model; None (the program's own inputs) when no input is an image."""
    if not any(t.image for t in spec.inputs):
        return None
    ct = _ct()
    return [ct.ImageType(name=t.name, shape=t.concrete({}), scale=1 / PIXEL_HALF_RANGE, bias=[-1.0] * 3,
                         color_layout=ct.colorlayout.RGB) if t.image else ct.TensorType(name=t.name)
            for t in spec.inputs]


def describe(mlmodel, spec: GraphSpec, model_name: str, recipe: str, target: str) -> None:
    """The metadata Xcode shows and Apple's and Hugging Face's Swift code read: author, license,
    version, a description of the graph and of each input, output and state, the model name."""
    from importlib import metadata

    version = metadata.version("manzano-edge")
    mlmodel.author = "manzano-edge"
    mlmodel.license = "Apache-2.0"
    mlmodel.version = version
    mlmodel.short_description = f"{model_name} {spec.name}: {spec.summary} ({recipe}, {target})"
    meta = mlmodel.user_defined_metadata
    meta[MODEL_NAME_KEY] = f"manzano-edge/{model_name}"
    meta.update({"manzano-edge.graph": spec.name, "manzano-edge.recipe": recipe, "manzano-edge.version": version,
                 "manzano-edge.contract": "the bundle's manifest.json, section pipeline"})
    described = mlmodel.get_spec().description
    for feature in (*described.input, *described.output):
        if feature.name in spec.docs:
            target_map = mlmodel.input_description if feature in described.input else mlmodel.output_description
            target_map[feature.name] = spec.docs[feature.name]
    for state in mlmodel._spec.description.state:
        if state.name in spec.docs:
            state.shortDescription = spec.docs[state.name]


def _weight_key(const_name: str) -> str:
    """A weight const's name as the torch parameter path with underscores ("p_" prefix and the
    converter's cast suffixes removed), the key `stored_weights` uses."""
    key = const_name[2:]
    for suffix in _SUFFIXES:
        key = key.split(suffix)[0]
    return key


def keep_float_configs(mlmodel, keep_float: list[str]) -> dict[str, None]:
    """op_name_configs that leave the weights of the named modules (paths inside the converted
    module) uncompressed. Every module must own a weight const: otherwise a renamed const would
    be quietly compressed with the rest."""
    wanted = {m.replace(".", "_") + "_weight": m for m in keep_float}
    found = {op.name: _weight_key(op.name) for op in mlmodel._mil_program.functions["main"].operations
             if op.op_type == "const" and op.name.startswith("p_") and _weight_key(op.name) in wanted}
    missing = sorted(m for key, m in wanted.items() if key not in found.values())
    if missing:
        raise RuntimeError(f"--keep-float: no Core ML weight const for {', '.join(missing)}")
    return {name: None for name in found}


def compress(mlmodel, recipe: str, keep_float: list[str] | None = None):
    """Weight-only compression through coremltools.optimize.coreml (no calibration data, so it
    works offline on Linux). `keep_float`: module paths whose weights stay fp16."""
    import coremltools.optimize.coreml as oc

    if recipe == "w8":
        op = oc.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif recipe == "w4":
        op = oc.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=GROUP_SIZE)
    elif recipe == "palette4":
        op = oc.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=PALETTE_GROUP_SIZE)
    else:
        raise UserError(f"recipe '{recipe}' is not a Core ML weight compression; "
                        f"choose one of {', '.join(COMPRESSION)}")
    config = oc.OptimizationConfig(global_config=op, op_name_configs=keep_float_configs(mlmodel, keep_float or []))
    if recipe == "palette4":
        return oc.palettize_weights(mlmodel, config)
    return oc.linear_quantize_weights(mlmodel, config)


# -- structure ------------------------------------------------------------------------------
def _main_ops(spec_proto) -> list:
    blocks = spec_proto.mlProgram.functions["main"].block_specializations
    return list(blocks[next(iter(blocks))].operations)


def structure(path: Path) -> dict:
    ct = _ct()
    from coremltools.proto import FeatureTypes_pb2 as ft

    proto = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    ops = Counter(op.type for op in _main_ops(proto))

    def shape_of(feature) -> list:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            return [1, 3, image.height, image.width]
        arr = feature.type.multiArrayType
        ranges = list(arr.shapeRange.sizeRanges)
        if ranges:
            return [[r.lowerBound, r.upperBound] if r.lowerBound != r.upperBound else r.lowerBound for r in ranges]
        return list(arr.shape)

    def dtype_of(array) -> str:
        return ft.ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()

    features = (*proto.description.input, *proto.description.output)
    return {"inputs": {f.name: shape_of(f) for f in proto.description.input},
            "outputs": [f.name for f in proto.description.output],
            "states": {s.name: list(s.type.stateType.arrayType.shape) for s in proto.description.state},
            "images": image_inputs(proto.description.input),
            "dtypes": {**{f.name: dtype_of(f.type.multiArrayType) for f in features
                          if f.type.WhichOneof("Type") == "multiArrayType"},
                       **{s.name: dtype_of(s.type.stateType.arrayType) for s in proto.description.state}},
            "ops": dict(ops), "op_count": sum(ops.values()),
            "spec_version": proto.specificationVersion}


def verify_structure(spec: GraphSpec, info: dict) -> list[str]:
    """Mismatches between the .mlpackage and the declaration (empty list = OK)."""
    problems = []
    for t in spec.inputs:
        got = info["inputs"].get(t.name)
        if got is None:
            problems.append(f"input {t.name} missing")
            continue
        color = info["images"].get(t.name)
        if t.image and color != "RGB":
            problems.append(f"input {t.name} is {'a ' + color + ' image' if color else 'not an image'}, declared an "
                            "RGB image")
        elif not t.image and color:
            problems.append(f"input {t.name} is an image, declared a tensor")
        for i, (want, have) in enumerate(zip(t.shape, got)):
            # Core ML may widen a flexible dim's lower bound to 1; the upper bound must match.
            if isinstance(want, Dim):
                upper = have[1] if isinstance(have, list) else have
                if upper < want.max:
                    problems.append(f"input {t.name} dim {i} allows up to {upper}, declared {want.max}")
            elif (have if not isinstance(have, list) else have[0]) != want:
                problems.append(f"input {t.name} dim {i} is {have}, declared {want}")
    missing_out = [t.name for t in spec.outputs if t.name not in info["outputs"]]
    problems += [f"output {n} missing" for n in missing_out]
    for s in spec.states:
        if info["states"].get(s.name) != list(s.concrete({})):
            problems.append(f"state {s.name} is {info['states'].get(s.name)}, declared {list(s.concrete({}))}")
    return problems


def image_encoding_problems(spec: GraphSpec, mil_program) -> list[str]:
    """Each image input must feed the pixel encoding, x = u * (1 / 127.5) - 1, before anything else
    reads it: the ImageType's scale and bias as the converter wrote them into the program."""
    ops = list(mil_program.functions["main"].operations)
    problems = []
    for t in (t for t in spec.inputs if t.image):
        readers = [op for op in ops if any(getattr(v, "name", None) == t.name for v in op.inputs.values())]
        scale = readers[0] if len(readers) == 1 and readers[0].op_type == "mul" else None
        bias = next((op for op in ops if scale is not None and op.op_type == "add" and op.x is scale.outputs[0]), None)
        if scale is None or bias is None or not np.allclose(scale.y.val, 1 / PIXEL_HALF_RANGE) \
                or not np.allclose(bias.y.val, -1.0):
            problems.append(f"input {t.name} does not go through the pixel encoding x / {PIXEL_HALF_RANGE} - 1 "
                            f"(read by {[op.op_type for op in readers]})")
    return problems


def coreml_io(spec: GraphSpec, info: dict) -> dict:
    """The graph's I/O as the .mlpackage declares it: Core ML's dtypes (fp16 states and, in Apple's
    convention, fp16 tensors) and image inputs, with the spec's symbolic shapes."""
    io = spec.manifest_io()
    for t in (*io["inputs"], *io["outputs"], *io["states"]):
        t["dtype"] = info["dtypes"].get(t["name"], t["dtype"])
        if t["name"] in info["images"]:
            t.update({"dtype": "uint8", "coreml_type": "image", "color_layout": info["images"][t["name"]],
                      "in_model": f"x = u / {PIXEL_HALF_RANGE} - 1"})
    return io


# -- weights as Core ML sees them --------------------------------------------------------------


def stored_weights(mlmodel) -> dict[str, np.ndarray]:
    """Parameter tensors as Core ML stores them, decompressed to dense floats, keyed by the
    torch parameter path with dots replaced by underscores."""
    import coremltools.optimize.coreml as oc

    ops = mlmodel._mil_program.functions["main"].operations
    # decompress_weights re-serialises the whole model: only a compressed one needs it.
    if any(op.op_type.startswith("constexpr_") for op in ops):
        ops = oc.decompress_weights(mlmodel)._mil_program.functions["main"].operations
    out = {}
    for op in ops:
        if op.op_type != "const" or not op.name.startswith(("p_", "b_")):
            continue
        key = _weight_key(op.name)
        value = op.outputs[0].val
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            out[key] = value
    return out


def emulated_module(module: nn.Module, weights: dict[str, np.ndarray], fp16: bool) -> tuple[nn.Module, int, int]:
    """A copy of `module` with Core ML's stored weights swapped in (and cast to fp16 when Core ML
    computes in fp16). Returns (module, tensors replaced, tensors total)."""
    emu = copy.deepcopy(module)
    state = emu.state_dict()
    replaced = 0
    with torch.no_grad():
        for name, tensor in state.items():
            stored = weights.get(name.replace(".", "_"))
            if stored is not None and tuple(stored.shape) == tuple(tensor.shape):
                tensor.copy_(torch.from_numpy(stored.astype(np.float32)))
                replaced += 1
    emu.load_state_dict(state)
    return (emu.half() if fp16 else emu), replaced, len(state)


def decompression_errors(module: nn.Module, weights: dict[str, np.ndarray], recipe: str) -> dict:
    """Check the decompressed weights against the float ones: each must lie within about half
    a quantization step (int8: max|w|/127, int4: max|w|/7, per output channel); the palette
    gets no closed-form bound, so its relative error is reported."""
    worst, checked = 0.0, 0
    for name, tensor in module.state_dict().items():
        stored = weights.get(name.replace(".", "_"))
        if stored is None or tensor.dim() < 2 or tuple(stored.shape) != tuple(tensor.shape):
            continue
        w = tensor.float().numpy()
        err = np.abs(stored.astype(np.float32) - w).reshape(w.shape[0], -1)
        if recipe in ("w8", "w4"):
            # Step per output channel from the row max: a block's max never exceeds it, so this
            # bounds per-block (w4) quantization too, whatever axis Core ML blocks along.
            levels = 127.0 if recipe == "w8" else 7.0
            step = np.abs(w).reshape(w.shape[0], -1).max(1, keepdims=True) / levels
            ratio = float((err / np.maximum(step, 1e-12)).max())
        else:
            ratio = float(err.max() / max(np.abs(w).max(), 1e-12))
        worst, checked = max(worst, ratio), checked + 1
    # Half a step, plus fp16 rounding of the scale and of the decompressed product (~0.06 step each).
    bound = {"w8": 0.65, "w4": 0.65}.get(recipe)
    return {"checked": checked, "worst": worst, "bound": bound, "ok": checked > 0 and (bound is None or worst <= bound)}


def load_with_program(path: Path):
    """A saved .mlpackage without compiling it (Linux), with its MIL program read back."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    mlmodel = _ct().models.MLModel(str(path), skip_model_load=True)
    proto = mlmodel.get_spec()
    mlmodel._mil_program = load_mil(proto, proto.specificationVersion, mlmodel.weights_dir)
    return mlmodel


def _checked_structure(spec: GraphSpec, path: Path, mlmodel) -> dict:
    info = structure(path)
    problems = verify_structure(spec, info) + image_encoding_problems(spec, mlmodel._mil_program)
    if problems:
        raise RuntimeError("structure differs from the declaration: " + "; ".join(problems))
    return info


def _predict_parity(job: GraphJob, module: nn.Module, path: Path, entry: Entry) -> None:
    """On macOS, the real .mlpackage through predict; elsewhere, say why not."""
    ok, why = predict_available()
    if ok and job.check:
        entry.parity["predict"] = run_parity(job.spec, TorchProgram(job.spec, module), CoreMLProgram(job.spec, path),
                                             job.examples)
        entry.extra["verified_by"] = "coremltools predict"
    else:
        entry.extra["predict_skipped"] = why


# Core ML has no dynamic activation quantization: its w8a8 is static (calibrated).
W8A8_MODES = ("static",)


@register_exporter("coreml", SUPPORT, W8A8_MODES)
class CoreMLExporter(BaseExporter):
    name = "coreml"
    title = "Core ML"
    dependency = "coremltools"
    suffix = SUFFIX

    def quantized_layers(self, recipe: str) -> tuple[type, ...]:
        # w8a8's activations are quantized around Linear/Conv2d; weight-only recipes compress every weight.
        return coreml_ptq.OP_TYPES if recipe == "w8a8" else ()

    def check_options(self, opts) -> None:
        if opts.coreml_precision not in PRECISIONS:
            raise UserError(f"unknown Core ML compute precision '{opts.coreml_precision}'; choose fp16 or fp32")
        if opts.coreml_target not in TARGETS:
            raise UserError(f"unknown Core ML target '{opts.coreml_target}'; choose from {', '.join(TARGETS)} (the "
                            "decoder keeps its KV cache in Core ML states, which need iOS 18 / macOS 15)")

    def export(self, job: GraphJob) -> list[Entry]:
        spec, model, recipe, plan = job.spec, job.model, job.recipe, job.plan
        entry = Entry(spec.name, self.name)
        path = job.out / self.name / f"{spec.name}{SUFFIX}"
        module = build_module(spec, model)
        if recipe == "w8a8":
            return [self._w8a8(job, module, path, entry)]
        # A graph kept float inside a quantized export computes in fp16, like the quantized ones.
        fp16 = job.opts.coreml_precision == "fp16" or recipe != job.requested_recipe or recipe == "fp16"
        target = job.opts.coreml_target
        mlmodel = convert(spec, module, job.examples[0], fp16=fp16 if is_float(recipe) else True, target=target)
        if not is_float(recipe):
            kept = plan.keep_modules(spec, model) if plan else []
            mlmodel = compress(mlmodel, recipe, kept)
            entry.extra["quantization"] = {"tool": "coremltools.optimize.coreml"}
        describe(mlmodel, spec, model.cfg.name, recipe, target)
        entry.extra["deployment_target"] = target
        mlmodel.save(str(path))
        info = _checked_structure(spec, path, mlmodel)
        weights = stored_weights(mlmodel)
        compute_fp16 = fp16 or not is_float(recipe)
        emu, replaced, total = emulated_module(module, weights, fp16=compute_fp16)
        if job.check:
            entry.parity = run_parity(spec, TorchProgram(spec, module),
                                      EmulatedProgram(spec, emu, compute_fp16, image_inputs=info["images"]), job.examples)
            entry.parity["emulated"] = True
        else:
            entry.parity = dict(SKIPPED)
        entry.extra.update({"io": coreml_io(spec, info), "ops": info["ops"],
                            "op_count": info["op_count"], "states": info["states"],
                            "compute_precision": "fp16" if compute_fp16 else "fp32",
                            "weights_emulated": f"{replaced}/{total}",
                            "verified_by": "emulation (PyTorch with Core ML's stored weights and precision)"})
        if is_float(recipe):
            entry.how = f"mlprogram, {entry.extra['compute_precision']} compute"
        else:
            entry.extra["decompression"] = decompression_errors(module, weights, recipe)
        _predict_parity(job, module, path, entry)
        judge(entry, recipe, fp16_compute=compute_fp16)
        if "decompression" in entry.extra and not entry.extra["decompression"]["ok"]:
            entry.passed = False
        return [finish(entry, path, job.out)]

    def _w8a8(self, job: GraphJob, module: nn.Module, path: Path, entry: Entry) -> Entry:
        """Calibrated in PyTorch (coreml_ptq), converted, then checked: the mlprogram must carry
        activation quantize/dequantize ops, and the emulation is the quantized PyTorch graph itself."""
        spec, plan = job.spec, job.plan
        program, quantized, info = coreml_ptq.w8a8(spec, module, job.examples[0], plan.calibration.get(spec.name),
                                                   plan.keep_modules(spec, job.model))
        target = job.opts.coreml_target
        mlmodel = convert_program(spec, program, fp16=True, target=target)
        del program
        describe(mlmodel, spec, job.model.cfg.name, "w8a8", target)
        entry.extra["deployment_target"] = target
        mlmodel.save(str(path))
        info_structure = _checked_structure(spec, path, mlmodel)
        info["activation_quant_ops"] = coreml_ptq.activation_quant_ops(info_structure["ops"])
        if info["activation_quant_ops"] == 0:
            raise cannot_quantize(spec, self.name, "w8a8", "the converted mlprogram has no quantize/dequantize op, "
                                  "so it would run float")
        # The emulation stands for the mlprogram only if the conversion kept every activation scale.
        if not coreml_ptq.same_scales(coreml_ptq.graph_activation_scales(quantized),
                                      coreml_ptq.mlprogram_activation_scales(mlmodel._mil_program)):
            raise RuntimeError("the mlprogram's activation scales differ from the calibrated PyTorch graph's")
        entry.parity = dict(SKIPPED) if not job.check else {
            **run_parity(spec, TorchProgram(spec, module),
                         EmulatedProgram(spec, quantized, fp16=False, image_inputs=info_structure["images"]),
                         job.examples),
            "emulated": True}
        entry.extra.update({"io": coreml_io(spec, info_structure), "ops": info_structure["ops"],
                            "op_count": info_structure["op_count"], "states": info_structure["states"],
                            "compute_precision": "fp16", "quantization": info,
                            "verified_by": "emulation (the pt2e-quantized PyTorch graph: Core ML's weights and "
                                           "activation scales, fp32 between quantize/dequantize where Core ML "
                                           "computes fp16)"})
        _predict_parity(job, module, path, entry)
        judge(entry, "w8a8", fp16_compute=True)
        entry = finish(entry, path, job.out)
        # Core ML stores float weights as fp16: int8 must come in well under that.
        check_smaller(entry, sum(t.numel() * 2 for t in module.state_dict().values() if t.is_floating_point()))
        return entry

    def finish_bundle(self, out: Path, jobs: dict[str, GraphJob], entries: list[Entry], tokenizer_json: str) -> dict:
        from manzano_edge.export import coreml_llm  # it converts through this module

        if coreml_llm.GRAPH not in jobs:
            return {coreml_llm.RUNNER: {"folder": None, "not_written": "it needs the decoder graph: add it to --graphs"}}
        return {coreml_llm.RUNNER: coreml_llm.write_file(out, jobs[coreml_llm.GRAPH], tokenizer_json)}

    def runner_programs(self, bundle, spec: GraphSpec) -> list[RunnerProgram]:
        from manzano_edge.export import coreml_llm

        return coreml_llm.runner_programs(bundle, spec)

    def emulated_program(self, bundle, spec, model, codec, entry) -> EmulatedProgram:
        """The .mlpackage's stored weights (decompressed) in the PyTorch graph, fp16 compute; for
        w8a8, the pt2e-quantized graph rebuilt with the export's own calibration."""
        mlmodel = load_with_program(bundle.verified_file(entry["file"], entry["sha256"]))
        proto = mlmodel.get_spec()
        images = list(image_inputs(proto.description.input))
        if entry["recipe"]["name"] == "w8a8":
            return _emulated_w8a8(bundle, spec, model, codec, entry, mlmodel._mil_program, images)
        module = build_module(spec, model)
        fp16 = entry.get("compute_precision", "fp16") == "fp16"
        emu, replaced, total = emulated_module(module, stored_weights(mlmodel), fp16=fp16)
        if replaced == 0:
            raise UserError(f"could not read the stored weights of {entry['file']} for emulation")
        return EmulatedProgram(spec, emu, fp16, image_inputs=images)

    def emulation_notes(self, recipe: str, exported_from: str | None) -> list[str]:
        """What a report must say about the graphs `emulated_program` stood in for."""
        return _emulation_notes(recipe, exported_from)


def _emulation_notes(recipe: str, exported_from: str | None) -> list[str]:
    notes = ["Core ML was validated by EMULATION on this machine (Core ML predict needs macOS): the "
             "PyTorch graph with the .mlpackage's stored, decompressed weights in fp16. It checks the "
             "weight compression, not Core ML's kernels."]
    if recipe == "w8a8":
        notes.append("Core ML w8a8 emulation is the pt2e-quantized PyTorch graph rebuilt from "
                     f"{exported_from or 'the reference'} with "
                     "the export's seeded calibration; its activation scales were checked equal to the "
                     ".mlpackage's. Between quantize/dequantize it computes in fp32 where Core ML uses fp16.")
    return notes


def _emulated_w8a8(bundle, spec: GraphSpec, model, codec, entry: dict, mil_program,
                   images: list[str]) -> EmulatedProgram:
    """Activation scales are not stored as weights: rebuild the pt2e-quantized graph from the
    reference with the export's own seeded calibration, and use it only if its scales are the
    shipped program's."""
    samples = bundle.manifest.get("quantization", {}).get("calibration_samples")
    if not samples:
        raise UserError(f"{entry['file']} was calibrated from a user file, so its activation scales cannot be "
                        "rebuilt for emulation here; validate it on macOS, where Core ML runs it")
    calibration = calib.generated(model, codec, samples)[spec.name]
    kept = entry["recipe"].get("details", {}).get("kept_float_layers")
    _, quantized, _ = coreml_ptq.w8a8(spec, build_module(spec, model), calibration[0][0], calibration, kept)
    ours, shipped = coreml_ptq.graph_activation_scales(quantized), coreml_ptq.mlprogram_activation_scales(mil_program)
    if not coreml_ptq.same_scales(ours, shipped):
        raise UserError(f"cannot emulate {entry['file']}: its activation scales differ from a re-calibration of the "
                        "reference checkpoint; if it was exported from a QAT checkpoint, pass that with --exported-from")
    return EmulatedProgram(spec, quantized, fp16=False, image_inputs=images)
