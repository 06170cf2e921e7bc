"""ExecuTorch XNNPACK recipes through pt2e and torchao (no hand-written quantizer).

- w8a8: pt2e with `XNNPACKQuantizer`, int8 symmetric per-channel weights, restricted to
        linear and conv (as on ONNX: the additive -inf attention mask, norms and residual
        adds stay float). Activations either `dynamic` (per-token, computed per call) or
        `static` (per-tensor, MinMax-calibrated on real inputs).
- w4:   torchao `Int8DynamicActivationIntxWeightConfig` (int4 weights, group 32, int8 dynamic
        activations: "8da4w", what ExecuTorch's llama export uses) on every Linear.
- w8 (weight-only) is refused: torchao's weight-only int8 lowered to XNNPACK gives silently
  wrong numbers (TOOLCHAIN gotcha 3).

`delegation` reports, per quantized op, how often it sits inside an XNNPACK delegate versus
on the portable kernels: a quantized program whose integer ops are not delegated is refused.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.quant.calibration import Sequences
from manzano_edge.quant.pt2e import quantize_pt2e
from manzano_edge.quant.recipes import GROUP_SIZE, W8A8_MODES
from manzano_edge.spec.graphs import GraphSpec
from manzano_edge.spec.tracing import export_program

QUANT_OP_MARKERS = ("quantize_per", "dequantize_per", "choose_qparams", "quantize_affine", "dequantize_affine",
                    "choose_qparams_affine")


def _quantizer(mode: str, keep_modules: list[str]):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "dynamic")
    q = XNNPACKQuantizer()
    for op in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
        q.set_operator_type(op, config)
    for name in keep_modules:
        q.set_module_name(name, None)  # None = leave float; excluded from the operator configs too
    return q


def pt2e_w8a8(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], mode: str,
              calibration: Sequences | None, keep_modules: list[str]) -> tuple[torch.export.ExportedProgram, dict]:
    if mode not in W8A8_MODES:
        raise UserError(f"unknown ExecuTorch w8a8 activation mode '{mode}'; choose from {', '.join(W8A8_MODES)}")
    if mode == "static" and not calibration:
        raise UserError(f"{spec.name}: static w8a8 needs calibration data (--calibration-samples >= 1)")
    program, _, steps = quantize_pt2e(spec, module, example, _quantizer(mode, keep_modules), calibration)
    info = {"tool": "pt2e XNNPACKQuantizer (torchao.quantization.pt2e)", "mode": mode, "op_types": ["linear", "conv2d"],
            "weights": "int8 symmetric per-channel",
            "activations": "int8 dynamic per-token" if mode == "dynamic" else "int8 static per-tensor (MinMax)",
            "calibration_steps": steps}
    return program, info


def torchao_8da4w(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor],
                  keep_modules: list[str]) -> tuple[torch.export.ExportedProgram, dict]:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    module = copy.deepcopy(module)
    keep = set(keep_modules)
    bad = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in keep
           and m.in_features % GROUP_SIZE]
    if bad:
        raise UserError(f"{spec.name}: w4 group {GROUP_SIZE} needs Linear in_features divisible by {GROUP_SIZE}; "
                        f"'{bad[0]}' is not (keep it float with --keep-float {bad[0]})")

    def wanted(m: nn.Module, fqn: str) -> bool:
        return isinstance(m, nn.Linear) and fqn not in keep

    quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE)),
              filter_fn=wanted)
    program = export_program(spec, module, example)
    info = {"tool": "torchao Int8DynamicActivationIntxWeightConfig (8da4w)", "mode": "8da4w", "op_types": ["linear"],
            "weights": f"int4 symmetric, group {GROUP_SIZE}", "activations": "int8 dynamic per-token"}
    return program, info


def quantize(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], recipe: str, mode: str,
             calibration: Sequences | None, keep_modules: list[str]) -> tuple[torch.export.ExportedProgram, dict]:
    if recipe == "w8a8":
        return pt2e_w8a8(spec, module, example, mode, calibration, keep_modules)
    if recipe == "w4":
        return torchao_8da4w(spec, module, example, keep_modules)
    raise UserError(f"recipe '{recipe}' has no XNNPACK implementation")


def delegation(edge_graph: torch.fx.GraphModule) -> dict:
    """Quantized-op counts inside vs outside the XNNPACK delegates."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge_graph)
    inside = outside = 0
    for name, row in info.delegation_by_operator.items():
        if any(m in name for m in QUANT_OP_MARKERS):
            inside += row.delegated
            outside += row.non_delegated
    return {"quant_ops_delegated": inside, "quant_ops_not_delegated": outside,
            "delegated_ops": info.num_delegated_nodes, "non_delegated_ops": info.num_non_delegated_nodes}
