"""Recipes and which backend implements each one natively.

| recipe   | weights                     | activations                     |
|----------|-----------------------------|---------------------------------|
| fp32     | float32                     | float32                         |
| fp16     | float16                     | float16                         |
| w8       | int8 per-channel / block 32 | float                           |
| w8a8     | int8 per-channel            | int8 (dynamic per-token/static) |
| w4       | int4 per-group (group 32)   | int8 dynamic (XNNPACK) / float  |
| palette4 | 4-bit k-means LUT           | float                           |

A combination a backend cannot do raises a clear error; it is never silently exported in float.
"""

from __future__ import annotations

from dataclasses import dataclass

from manzano_edge.errors import UserError

RECIPES = ("fp32", "fp16", "w8", "w8a8", "w4", "palette4")
FORMATS = ("coreml", "onnx", "executorch")
FLOAT_RECIPES = ("fp32", "fp16")


@dataclass(frozen=True)
class Support:
    ok: bool
    how: str  # the native mechanism, or why not


SUPPORT: dict[tuple[str, str], Support] = {
    ("coreml", "fp32"): Support(True, "mlprogram, fp32 compute"),
    ("coreml", "fp16"): Support(True, "mlprogram, fp16 compute"),
    ("coreml", "w8"): Support(True, "coremltools.optimize.coreml linear_quantize_weights int8 per-channel"),
    ("coreml", "w4"): Support(True, "coremltools.optimize.coreml linear_quantize_weights int4 per-block 32"),
    ("coreml", "palette4"): Support(True, "coremltools.optimize.coreml palettize_weights 4-bit k-means"),
    ("coreml", "w8a8"): Support(True, "pt2e CoreMLQuantizer (coremltools LinearQuantizerConfig) on Linear/Conv2d: "
                                      "int8 per-channel weights, static int8 activations calibrated in PyTorch "
                                      "(coremltools' own calibration needs predict() on macOS)"),
    ("onnx", "fp32"): Support(True, "torch.onnx dynamo export, float32"),
    ("onnx", "fp16"): Support(False, "onnxruntime's CPU provider has no fp16 kernels for most ops; use fp32"),
    ("onnx", "w8"): Support(True, "onnxruntime MatMulNBits bits=8, block 32, symmetric (weight-only; MatMul weights)"),
    ("onnx", "w8a8"): Support(True, "onnxruntime.quantization int8: dynamic (default) or static QDQ restricted to "
                                    "MatMul/Gemm/Conv"),
    ("onnx", "w4"): Support(True, "onnxruntime MatMulNBits bits=4, block 32, symmetric (weight-only; MatMul weights)"),
    ("onnx", "palette4"): Support(False, "palettization is a Core ML format; ONNX has no LUT weights"),
    ("executorch", "fp32"): Support(True, "XNNPACK fp32 (+ Core ML delegate program)"),
    ("executorch", "fp16"): Support(False, "XNNPACK fp16 kernels do not run on x86 hosts; use fp32"),
    ("executorch", "w8"): Support(False, "torchao weight-only int8 lowered to XNNPACK gives wrong numbers "
                                         "(TOOLCHAIN gotcha 3); use w8a8"),
    ("executorch", "w8a8"): Support(True, "pt2e XNNPACKQuantizer int8 per-channel on linear/conv, dynamic (default) "
                                          "or static activations"),
    ("executorch", "w4"): Support(True, "torchao Int8DynamicActivationIntxWeightConfig int4 group 32 (8da4w) on "
                                        "Linear"),
    ("executorch", "palette4"): Support(False, "palettization is a Core ML format; XNNPACK has no LUT weights"),
}


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise UserError(f"unknown {what} '{unknown[0] if unknown else value}'; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def check_supported(fmt: str, recipe: str) -> None:
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}'; choose from {', '.join(RECIPES)}")
    support = SUPPORT[(fmt, recipe)]
    if not support.ok:
        raise UserError(f"recipe '{recipe}' is not available for {fmt}: {support.how}")


# Measured on the embedded tiny model (README "Quantization"): per-call (dynamic) activation
# scales beat MinMax-calibrated static ones on every graph, on both backends.
# Core ML has no dynamic activation quantization: its w8a8 is always static (calibrated).
DEFAULT_W8A8_MODE = {"onnx": "dynamic", "executorch": "dynamic", "coreml": "static"}
W8A8_MODES = ("dynamic", "static")


def check_mode(fmt: str, mode: str) -> str:
    if mode not in W8A8_MODES:
        raise UserError(f"unknown w8a8 activation mode '{mode}' for {fmt}; choose from {', '.join(W8A8_MODES)}")
    if fmt == "coreml" and mode != "static":
        raise UserError("Core ML has no dynamic activation quantization; coreml w8a8 is static (calibrated)")
    return mode
