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
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.export.common import TorchProgram, export_program
from manzano_edge.export.spec import Dim, GraphSpec

SUFFIX = ".mlpackage"
# What the converter and compressors append to a weight const's name.
_SUFFIXES = ("_to_fp16", "_to_fp32", "_quantized", "_palettized")
COMPRESSION = {"w8": "int8 per-channel", "w4": "int4 per-block 32", "palette4": "4-bit k-means LUT"}


def _ct():
    try:
        import coremltools as ct
    except ImportError as exc:
        raise UserError("coremltools is not installed; pip install 'manzano-edge[export]'") from exc
    return ct


def convert(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], fp16: bool = True):
    return convert_program(spec, export_program(spec, module, example, explicit_state=False), fp16)


def convert_program(spec: GraphSpec, program: torch.export.ExportedProgram, fp16: bool = True):
    ct = _ct()
    # Symbolic-shape broadcasting is logged as a warning per op; it is expected with flexible shapes.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct.convert(program.run_decompositions({}), convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                      compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                      outputs=[ct.TensorType(name=t.name) for t in spec.outputs])


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
        op = oc.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32)
    elif recipe == "palette4":
        op = oc.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16)
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
    proto = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    ops = Counter(op.type for op in _main_ops(proto))

    def shape_of(feature) -> list:
        arr = feature.type.multiArrayType
        ranges = list(arr.shapeRange.sizeRanges)
        if ranges:
            return [[r.lowerBound, r.upperBound] if r.lowerBound != r.upperBound else r.lowerBound for r in ranges]
        return list(arr.shape)

    return {"inputs": {f.name: shape_of(f) for f in proto.description.input},
            "outputs": [f.name for f in proto.description.output],
            "states": {s.name: list(s.type.stateType.arrayType.shape) for s in proto.description.state},
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


# -- weights as Core ML sees them --------------------------------------------------------------


def stored_weights(mlmodel) -> dict[str, np.ndarray]:
    """Parameter tensors as Core ML stores them, decompressed to dense floats, keyed by the
    torch parameter path with dots replaced by underscores."""
    import coremltools.optimize.coreml as oc

    dense = oc.decompress_weights(mlmodel)
    out = {}
    for op in dense._mil_program.functions["main"].operations:
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


class EmulatedProgram(TorchProgram):
    """Linux stand-in for Core ML: the reference graph with Core ML's weights and precision."""

    def __init__(self, spec: GraphSpec, module: nn.Module, fp16: bool) -> None:
        super().__init__(spec, module)
        self.fp16 = fp16

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.fp16:
            inputs = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}
        return {k: v.float() if v.is_floating_point() else v for k, v in super().run(inputs).items()}


def predict_available() -> tuple[bool, str]:
    if platform.system() != "Darwin":
        return False, f"Core ML predict needs macOS; this is {platform.system()}"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False, "coremltools was installed without its macOS runtime (libcoremlpython)"
    return True, ""


class CoreMLProgram:
    """macOS only: the real .mlpackage through `predict`, with a Core ML state for the KV cache."""

    COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")

    def __init__(self, spec: GraphSpec, path: Path, compute_units: str = "ALL") -> None:
        ok, why = predict_available()
        if not ok:
            raise UserError(f"the coreml backend cannot run here: {why}; use --backend ort or executorch")
        if compute_units not in self.COMPUTE_UNITS:
            raise UserError(f"unknown compute unit '{compute_units}'; choose one of {', '.join(self.COMPUTE_UNITS)}")
        ct = _ct()
        self.spec = spec
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.reset()

    def reset(self) -> None:
        self.state = self.model.make_state() if self.spec.states else None

    def compute_plan(self) -> dict:
        """Where Core ML plans to run each op for this compute unit (MLComputePlan, macOS 14.4+):
        op counts and Core ML's estimated share of the work per device (CPU / GPU / NeuralEngine)."""
        from coremltools.models.compute_plan import MLComputePlan

        plan = MLComputePlan.load_from_path(self.model.get_compiled_model_path(),
                                            compute_units=self.model.compute_unit)
        ops: dict[str, int] = {}
        cost: dict[str, float] = {}
        for function in plan.model_structure.program.functions.values():
            for op in function.block.operations:
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                if usage is None:  # constants carry no device
                    continue
                device = type(usage.preferred_compute_device).__name__.removeprefix("ML").removesuffix("ComputeDevice")
                ops[device] = ops.get(device, 0) + 1
                estimate = plan.get_estimated_cost_for_mlprogram_operation(op)
                cost[device] = cost.get(device, 0.0) + (estimate.weight if estimate else 0.0)
        return {"ops_per_device": ops, "estimated_cost_share": cost}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {t.name: inputs[t.name].numpy() for t in self.spec.inputs}
        out = self.model.predict(feed, state=self.state) if self.state is not None else self.model.predict(feed)
        return {t.name: torch.from_numpy(np.asarray(out[t.name])) for t in self.spec.outputs}
