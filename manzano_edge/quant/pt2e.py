"""The pt2e post-training flow every pt2e backend shares (XNNPACK, Core ML): export, insert the
backend quantizer's observers, calibrate on real inputs, convert, re-export.

The converted GraphModule is returned too: it computes with exactly the scales and zero points
the backend receives, which is what Core ML's Linux emulation runs.
"""

from __future__ import annotations

import torch
from torch import nn

from manzano_edge.quant.calibration import Sequences, calibrate
from manzano_edge.spec.graphs import GraphSpec
from manzano_edge.spec.tracing import export_program, torch_dynamic_shapes, trace_args


def quantize_pt2e(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], quantizer,
                  calibration: Sequences | None) -> tuple[torch.export.ExportedProgram, torch.fx.GraphModule, int]:
    """Returns (re-exported program, converted GraphModule, calibration steps run)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = prepare_pt2e(export_program(spec, module, example).module(), quantizer)
    # Weight observers only see weights during a forward pass: dynamic modes need one too.
    steps = calibrate(gm, spec, calibration or [[example]])
    with torch.no_grad():
        gm = convert_pt2e(gm)
        inputs, _ = spec.io()
        program = torch.export.export(gm, trace_args(spec, example, False),
                                      dynamic_shapes=torch_dynamic_shapes(spec, inputs), strict=False)
    return program, gm, steps
