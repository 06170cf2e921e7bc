"""Core ML W8A8 without `predict`: pt2e with ExecuTorch's `CoreMLQuantizer`, configured by a
`coremltools.optimize.torch` `LinearQuantizerConfig`, calibrated in PyTorch, then `ct.convert`.

coremltools' own activation calibration (`linear_quantize_activations`) runs the model through
`predict()`, which exists only on macOS (TOOLCHAIN gotcha 12). Calibrating the pt2e observers in
PyTorch instead gives the same kind of program (int8 per-channel weights, static per-tensor int8
activations as Core ML `quantize`/`dequantize` ops) on any OS.

As on ONNX and XNNPACK, only Linear and Conv2d are quantized: the quantizer's default patterns
also take the additive -inf attention mask, whose observer then sees NaN, and the norms.
Core ML has no dynamic activation quantization, so this recipe is static only. Graph inputs and
outputs stay float (the runtime feeds and reads float): quantized, the pixels moved by half a step
and the logits clipped (`keep_graph_inputs_float`, `keep_graph_outputs_float`).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.quant.calibration import Sequences
from manzano_edge.quant.pt2e import quantize_pt2e
from manzano_edge.spec.graphs import GraphSpec

OP_TYPES = (nn.Linear, nn.Conv2d)
# Core ML ops that carry activation quantization in the converted mlprogram.
ACTIVATION_QUANT_OPS = ("quantize", "dequantize")


def weighted_op_filter(keep_float: frozenset[str] = frozenset()):
    """Node filter: a node created inside a Linear/Conv2d that is not kept float, or a
    weight/bias (its partition's op decides). torch 2.13's export records each node's module as
    (qualified path, qualified type name) in nn_module_stack."""
    def accept(node: torch.fx.Node) -> bool:
        if node.op in ("get_attr", "placeholder"):
            return True
        stack = list(node.meta.get("nn_module_stack", {}).values())
        return bool(stack) and stack[-1][1] in _OP_TYPE_NAMES and stack[-1][0] not in keep_float

    return accept


_OP_TYPE_NAMES = {f"{t.__module__}.{t.__qualname__}" for t in OP_TYPES}
# The quantizer's registry has 24 annotators, each tracing its patterns with torch.export (405
# traces, 40-90 s per graph). Only these four annotate anything under the node filter above
# (checked: the same observers and scales as all 24 on the tiny decoder, 13 s instead of 41 s).
# linear_act matches the MLP's gate_proj + SiLU: its output observer sits after the SiLU, the
# pattern Core ML fuses.
_ANNOTATORS = ("conv_act", "conv", "linear_act", "linear")
# The conv annotators trace 81 patterns (conv 1-3D x activations) the first time they run in a process:
# a graph without a convolution skips them.
_CONV_OPS = ("conv1d", "conv2d", "conv3d", "convolution")


def _runs_on(annotator: str, model: torch.fx.GraphModule) -> bool:
    if not annotator.startswith("conv"):
        return True
    return any(n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in _CONV_OPS
               for n in model.graph.nodes)


def keep_graph_outputs_float(model: torch.fx.GraphModule) -> list[str]:
    """Drop the output quantization of the ops that produce the graph's outputs; returns their
    names. The `linear` pattern quantizes a Linear's output too, so the decoder's logits left the
    graph as uint8 with one per-tensor MinMax scale, too coarse for a wide, peaky logit range: export
    parity fell to about half the dB of float logits. The
    runtime reads outputs as float, so quantizing them only adds error, on every graph."""
    stripped = []
    for node in _output_nodes(model):
        # Walk back through unannotated single-input ops (views, casts) to the op that computed it.
        while "quantization_annotation" not in node.meta and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
        annotation = node.meta.get("quantization_annotation")
        if annotation is not None and annotation.output_qspec is not None:
            annotation.output_qspec = None
            stripped.append(node.name)
    return stripped


def keep_graph_inputs_float(model: torch.fx.GraphModule) -> list[str]:
    """Drop the input quantization of the ops that read the graph's inputs; returns their names.
    Symmetric uint8 puts the tokenizer's pixels in [-1, 1] on the grid (q - 128) * 2/255, half a
    step off the 8-bit pixel grid -1 + 2k/255, so every pixel moved by 1/255, nearly all in the
    same direction (mean -0.0038 on real scenes), enough to flip a large share of the tokenizer's
    FSQ ids. The runtime feeds float; the first op's weights stay int8."""
    stripped = []
    for placeholder in (n for n in model.graph.nodes if n.op == "placeholder"):  # parameters are get_attr
        frontier = [placeholder]
        while frontier:
            node = frontier.pop()
            for user in node.users:
                annotation = user.meta.get("quantization_annotation")
                if annotation is None:
                    # Follow unannotated single-input ops (views, casts) to the op that computes.
                    if len(user.all_input_nodes) == 1:
                        frontier.append(user)
                elif annotation.input_qspec_map.get(node) is not None:
                    del annotation.input_qspec_map[node]
                    stripped.append(user.name)
    return stripped


def _output_nodes(model: torch.fx.GraphModule) -> list[torch.fx.Node]:
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(model.graph.output_node().args, nodes.append)
    return nodes


# The pattern builders ExecuTorch's Core ML annotators call once per (op, activation, in-place)
# combination on every annotate.
_PATTERN_BUILDERS = ("get_conv_pattern", "get_conv_bn_pattern", "get_linear_pattern", "get_linear_bn_pattern",
                     "get_binary_op_act_pattern")


def _reuse_pattern_graphs() -> None:
    """Each builder traces a small pattern module with torch.export, which dominates the
    quantization of a small graph, for a pattern that depends only on the builder's arguments. Trace
    each once per process and hand out copies (the subgraph matcher rewrites a pattern's output node
    in place)."""
    from executorch.backends.apple.coreml.quantizer import _coreml_quantizer_utils as utils

    for name in _PATTERN_BUILDERS:
        build = getattr(utils, name)
        if hasattr(build, "traced"):
            continue
        traced = functools.cache(build)

        @functools.wraps(build)
        def pattern(*args, _traced=traced, **kwargs):
            return copy.deepcopy(_traced(*args, **kwargs))

        pattern.traced = traced
        setattr(utils, name, pattern)


def _quantizer(keep_float: frozenset[str] = frozenset()):
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    _reuse_pattern_graphs()

    class WeightedOpsCoreMLQuantizer(CoreMLQuantizer):
        """CoreMLQuantizer's own config filters cannot say "Linear/Conv2d only" here: class keys
        in `module_type_configs` never match torch 2.13's string-typed nn_module_stack (the
        program came out float), and per-module-name configs re-trace every pattern once per
        name (over 15 minutes for the tiny decoder). One pass with a node filter does it."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            from executorch.backends.apple.coreml.quantizer._annotation_config import AnnotationConfig
            from executorch.backends.apple.coreml.quantizer._coreml_quantizer import (
                _AnnotationPatternRegistry,
            )

            config = AnnotationConfig.from_quantization_config(self._config.global_config)
            annotators = _AnnotationPatternRegistry.get_annotators()
            accept = weighted_op_filter(keep_float)
            for name in (n for n in _ANNOTATORS if _runs_on(n, model)):
                annotators[name](model, config, accept)
            # The runtime feeds and reads float: quantizing a graph's inputs and outputs only adds error.
            keep_graph_inputs_float(model)
            keep_graph_outputs_float(model)
            return model

    # Plain MinMax observers: the config's default, a moving average, is a QAT observer. In PTQ
    # it weights each calibration call by its order, so a run of one-token decode steps shrank
    # the prefill's ranges (greedy match fell to 10/17 on the tiny decoder; 17/17 with MinMax).
    config = LinearQuantizerConfig.from_dict({"global_config": {
        "quantization_scheme": "symmetric", "activation_dtype": torch.quint8,
        "weight_dtype": torch.qint8, "weight_per_channel": True,
        "activation_observer": "min_max", "weight_observer": "min_max"}})
    return WeightedOpsCoreMLQuantizer(config)


def w8a8(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], calibration: Sequences | None,
         keep_float: list[str] | None = None) -> tuple[torch.export.ExportedProgram, torch.fx.GraphModule, dict]:
    """(program for ct.convert, the converted GraphModule for emulation, manifest details).
    `keep_float`: module paths inside `module` left unannotated, so they stay float."""
    if not calibration:
        raise UserError(f"{spec.name}: Core ML w8a8 has static activation scales and needs calibration data "
                        "(--calibration-samples >= 1)")
    keep = frozenset(keep_float or ())
    program, gm, steps = quantize_pt2e(spec, module, example, _quantizer(keep), calibration)
    info = {"tool": "pt2e CoreMLQuantizer + coremltools LinearQuantizerConfig", "mode": "static",
            "op_types": ["linear", "conv2d"], "weights": "int8 symmetric per-channel",
            "activations": "uint8 static per-tensor (MinMax, calibrated in PyTorch)", "calibration_steps": steps}
    return program, gm, info


def activation_quant_ops(ops: dict[str, int]) -> int:
    return sum(ops.get(name, 0) for name in ACTIVATION_QUANT_OPS)


# -- checking an emulation against the shipped mlprogram --------------------------------------
def graph_activation_scales(gm: torch.fx.GraphModule) -> list[float]:
    """Scales of the static activation quantize nodes in a converted pt2e graph."""
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    return sorted(float(n.args[1]) for n in gm.graph.nodes if n.target == quantize)


def mlprogram_activation_scales(mil_program) -> list[float]:
    """Scales of the `quantize` ops in a Core ML program (MIL, as loaded from the .mlpackage)."""
    return sorted(float(op.scale.val) for op in mil_program.functions["main"].operations if op.op_type == "quantize")


def same_scales(a: list[float], b: list[float], rtol: float = 1e-3) -> bool:
    """The same set of activation scales: every scale of one list is within `rtol` of some scale
    of the other. Core ML may merge quantize ops that share an input (so counts can differ) and
    stores scales in fp16 (relative error <= 2**-11, hence the tolerance). Matching each scale to
    its nearest neighbour, rather than de-duplicating first, does not depend on where two nearly
    equal scales happen to fall."""
    def covered(xs: list[float], ys: list[float]) -> bool:
        return all(any(abs(x - y) <= rtol * abs(x) for y in ys) for x in xs)

    return bool(a) == bool(b) and covered(a, b) and covered(b, a)
