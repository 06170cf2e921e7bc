"""Core AI w8a8 through coreai-opt's graph-mode `Quantizer`: int8 per-channel weights and static
int8 per-tensor input activations on Linear and Conv2d (the layers the other formats' w8a8
quantizes), calibrated in PyTorch on the plan's samples, then finalized for Core AI.

Layer outputs stay float: also quantizing them costs the decoder most of its accuracy
(docs/toolchain-notes.md, gotcha 14), and the next layer quantizes its own input anyway."""

from __future__ import annotations

import re

import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.quant.calibration import Sequences, calibrate
from manzano_edge.spec.graphs import GraphSpec
from manzano_edge.spec.tracing import torch_dynamic_shapes, trace_args

OP_TYPES = (nn.Linear, nn.Conv2d)


def quantizer_config(keep_float: list[str]):
    from coreai_opt.quantization.config import ModuleQuantizerConfig, QuantizerConfig

    layer = ModuleQuantizerConfig(op_output_spec={"*": None})
    return QuantizerConfig(global_config=None,
                           module_type_configs={f"{t.__module__}.{t.__name__}": layer for t in OP_TYPES},
                           module_name_configs={re.escape(name): None for name in keep_float})


def w8a8(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], calibration: Sequences | None,
         keep_float: list[str] | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """(the finalized GraphModule to convert, manifest details). `keep_float`: module paths inside
    `module` left unquantized."""
    from coreai_opt import ExportBackend
    from coreai_opt.quantization.quantizer import Quantizer

    if not calibration:
        raise UserError(f"{spec.name}: Core AI w8a8 has static activation scales and needs calibration data "
                        "(--calibration-samples >= 1)")
    quantizer = Quantizer(module, quantizer_config(list(keep_float or ())))
    prepared = quantizer.prepare(trace_args(spec, example), dynamic_shapes=torch_dynamic_shapes(spec, spec.inputs))
    with quantizer.calibration_mode(prepared):
        steps = calibrate(prepared, spec, calibration)
    final = quantizer.finalize(prepared, backend=ExportBackend.CoreAI)
    info = {"tool": "coreai-opt Quantizer (graph mode)", "mode": "static", "op_types": ["linear", "conv2d"],
            "weights": "int8 symmetric per-channel", "activations": "int8 symmetric per-tensor, static (MinMax, "
            "calibrated in PyTorch) on layer inputs", "calibration_steps": steps}
    return final, info
