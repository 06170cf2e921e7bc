"""ONNX recipes through onnxruntime.quantization (no hand-written quantizer).

- w8a8 static:  quant_pre_process + quantize_static, QDQ, int8 per-channel symmetric weights,
                uint8 activations calibrated (MinMax) on real inputs, at the inputs of the
                MatMul/Gemm/Conv nodes with weights only, their outputs float (as Core ML's and
                Core AI's static recipes): quantizing every op type (the mask add, softmax, norms,
                the KV-cache I/O) ruins the decoder (TOOLCHAIN gotcha 2).
- w8a8 dynamic: quantize_dynamic, int8 per-channel weights, activations quantized per call
                (DynamicQuantizeLinear + MatMulInteger / ConvInteger).
- w8 / w4:      MatMulNBits (bits 8 / 4, block 32, symmetric) with accuracy_level 4: ORT quantizes
                each MatMul's input to int8 per block when it runs (as onnxruntime-genai's CPU builder).
                Only MatMul weights are covered: Conv/Gemm stay float.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import torch

from manzano_edge.errors import UserError
from manzano_edge.quant.calibration import Sequences
from manzano_edge.quant.recipes import GROUP_SIZE
from manzano_edge.runtime.backends.ort import OrtProgram
from manzano_edge.spec.graphs import GraphSpec

STATIC_OP_TYPES = ["MatMul", "Gemm", "Conv"]
# int8 weights in 7 bits: ORT's x86 u8s8 integer GEMM adds pairs of products in 16 bits, which saturate
# on full-range weights (ORT's docs recommend reduce_range there); 7 bits cost one bit on other CPUs and
# give the same numbers on all of them (CHANGELOG has the measurement).
REDUCE_RANGE = True
WEIGHT_RANGE = ", 7-bit range (reduce_range)" if REDUCE_RANGE else ""
# MatMulNBits' compute type. 0 (the quantizer's default) dequantizes the weights and multiplies in fp32:
# the 8-bit decoder then ran slower than fp32. 4 multiplies int8 by int8 after quantizing the input per
# block, as onnxruntime-genai's CPU builder does (CHANGELOG has the measured speed and parity).
NBITS_ACCURACY_LEVEL = 4
DYNAMIC_OP_TYPES = ["MatMul", "Conv"]  # Gemm has no integer kernel in ORT's dynamic path
INTEGER_OPS = ("QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
               "MatMulNBits", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul")


# -- calibration feeds ----------------------------------------------------------------------------
class CalibrationProgram(Protocol):
    """An onnxruntime file behind a graph's own I/O (`OrtProgram`, `StockVlmProgram`)."""

    def reset(self) -> None: ...

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def calibration_feeds(program: CalibrationProgram, sequences: Sequences) -> list[dict[str, np.ndarray]]:
    """The session feeds of every calibration step, in the layout of the float file `program` runs (the
    reference's explicit cache, or a runner's per-layer one): `program` is run over each sequence, so
    the cache inputs hold real values."""
    feeds = []
    for seq in sequences:
        program.reset()
        for step in seq:
            feeds.append(program.feed(step))
            program.run(step)
    return feeds


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over precomputed feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


# -- keep-float ------------------------------------------------------------------------------------
def nodes_in_modules(model: onnx.ModelProto, modules: list[str], op_types: tuple[str, ...]) -> list[str]:
    """Names of `op_types` nodes that the dynamo exporter attributes to one of `modules` (its
    `pkg.torch.onnx.name_scopes` metadata lists the module path of each node)."""
    wanted = set(modules)
    out = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(f"'{m}'" in scopes for m in wanted):
            out.append(node.name)
    return out


# -- the recipes -----------------------------------------------------------------------------------
def quantize(spec: GraphSpec, float_path: Path, out_path: Path, recipe: str, mode: str,
             calibration: Sequences | None, keep_modules: list[str],
             program_at: Callable[[Path], CalibrationProgram] | None = None) -> dict:
    """Quantize `float_path` into `out_path`; returns what was done (for the manifest). `program_at`
    runs a file behind the graph's own I/O (default: the reference layout's `OrtProgram`); static
    calibration feeds the float file through it."""
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    float_path, out_path = Path(float_path).resolve(), Path(out_path).resolve()  # the quantizers run in a scratch cwd
    model = onnx.load(str(float_path))
    with tempfile.TemporaryDirectory() as tmp, _working_directory(tmp):
        pre = Path(tmp) / "pre.onnx"
        _pre_process(float_path, pre)
        if recipe == "w8a8" and mode == "static":
            exclude = nodes_in_modules(model, keep_modules, tuple(STATIC_OP_TYPES))
            _static(spec, (program_at or partial(OrtProgram, spec))(float_path), pre, out_path, calibration,
                    weighted_nodes(model, STATIC_OP_TYPES), exclude)
        elif recipe == "w8a8" and mode == "dynamic":
            exclude = nodes_in_modules(model, keep_modules, tuple(DYNAMIC_OP_TYPES))
            _dynamic(pre, out_path, exclude)
        elif recipe in ("w8", "w4"):
            exclude = nodes_in_modules(model, keep_modules, ("MatMul",))
            _nbits(pre, out_path, 8 if recipe == "w8" else 4, exclude)
        else:
            raise UserError(f"recipe '{recipe}' (mode {mode}) has no onnxruntime implementation")
    onnx.checker.check_model(str(out_path))
    ops = integer_ops(onnx.load(str(out_path)))
    info = {"tool": "onnxruntime.quantization", "mode": mode, "integer_ops": ops, "kept_float_nodes": exclude}
    if recipe == "w8a8" and mode == "static":
        info.update(op_types=STATIC_OP_TYPES, activations="uint8 per-tensor, MinMax calibration",
                    weights=f"int8 symmetric per-channel{WEIGHT_RANGE}", calibration_steps=sum(len(s) for s in calibration or []))
    elif recipe == "w8a8":
        info.update(op_types=DYNAMIC_OP_TYPES, activations="uint8 dynamic per-call", weights=f"int8 per-channel{WEIGHT_RANGE}")
    else:
        info.update(op_types=["MatMul"], activations=f"int8 dynamic per block (MatMulNBits accuracy_level "
                    f"{NBITS_ACCURACY_LEVEL})", weights=f"int{8 if recipe == 'w8' else 4} symmetric, block {GROUP_SIZE} "
                    "(MatMulNBits)", accuracy_level=NBITS_ACCURACY_LEVEL)
    return info


@contextlib.contextmanager
def _working_directory(path: str):
    """ORT's shape inference writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data) into
    the current directory; keep them in our temporary directory instead of the user's."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _pre_process(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # skip_optimization keeps node names, which keep-float exclusions refer to.
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True)
    except Exception:  # symbolic shape inference gives up on some dynamo graphs: quantize the export as is
        shutil.copy(src, dst)


def _static(spec: GraphSpec, program: CalibrationProgram, pre: Path, out: Path, calibration: Sequences | None,
            nodes: list[str], exclude: list[str]) -> None:
    """QDQ on the inputs of `nodes` (names are the float file's: pre-processing keeps them)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise UserError(f"{spec.name}: static w8a8 needs calibration data (--calibration-samples >= 1)")
    feeds = calibration_feeds(program, calibration)
    quantize_static(str(pre), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=STATIC_OP_TYPES,
                    nodes_to_quantize=nodes, nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
                    reduce_range=REDUCE_RANGE,
                    extra_options={"WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": STATIC_OP_TYPES})


def weighted_nodes(model: onnx.ModelProto, op_types: list[str]) -> list[str]:
    """The `op_types` nodes whose second input is a stored weight: the layers. Attention's two
    MatMuls multiply activations (queries by keys, probabilities by values); one uint8 scale per
    tensor over softmax probabilities and scores cost the tiny decoder most of its dB."""
    weights = {t.name for t in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in weights]


def _dynamic(pre: Path, out: Path, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(pre), str(out), op_types_to_quantize=DYNAMIC_OP_TYPES, per_channel=True,
                     reduce_range=REDUCE_RANGE, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)


def _nbits(pre: Path, out: Path, bits: int, exclude: list[str]) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(pre)), bits=bits, block_size=GROUP_SIZE, is_symmetric=True,
                             accuracy_level=NBITS_ACCURACY_LEVEL,
                             nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


# -- inspection ------------------------------------------------------------------------------------
def integer_ops(model: onnx.ModelProto) -> dict:
    """Op histogram of the integer machinery plus how many initializers are stored as integers
    (a 'quantized' graph with none of these is float in disguise)."""
    ops = Counter(n.op_type for n in model.graph.node if n.op_type in INTEGER_OPS)
    int_inits = [i for i in model.graph.initializer
                 if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                                    onnx.TensorProto.UINT4)]
    return {"ops": dict(ops), "integer_initializers": len(int_inits),
            "integer_weight_bytes": int(sum(np.prod(i.dims) for i in int_inits))}


def quantized_anything(info: dict) -> bool:
    ops = info["integer_ops"]["ops"]
    compute = {"QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "MatMulNBits",
               "DynamicQuantizeMatMul", "DequantizeLinear"}
    return bool(compute & set(ops)) and info["integer_ops"]["integer_initializers"] > 0
