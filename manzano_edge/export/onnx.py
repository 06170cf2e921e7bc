"""ONNX: torch.onnx.export(dynamo=True), opset 18, dynamic axes, explicit KV-cache I/O,
onnx.checker full check; runs in onnxruntime (and onnx.reference for small graphs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.export.common import initial_states, torch_dynamic_shapes, trace_args
from manzano_edge.export.spec import GraphSpec

OPSET = 18
SUFFIX = ".onnx"


def export(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    import onnx

    inputs, outputs = spec.io(explicit_state=True)
    with torch.no_grad():
        torch.onnx.export(module, trace_args(spec, example, True), str(path), dynamo=True, opset_version=OPSET,
                          input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                          dynamic_shapes=torch_dynamic_shapes(spec, inputs), external_data=_needs_external(module),
                          verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _needs_external(module: nn.Module) -> bool:
    # A protobuf file is capped at 2 GB: larger graphs keep weights in a side file.
    return sum(p.numel() * p.element_size() for p in module.parameters()) > 1.8e9


ORT_ALLOW_SPINNING = "0"  # bench records it per result, in `threads`


class OrtProgram:
    """An onnxruntime session that looks stateful to its caller: the explicit KV-cache outputs
    are fed back as the next call's inputs, and `reset` zeroes them."""

    def __init__(self, spec: GraphSpec, path: Path, threads: int = 0, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UserError("onnxruntime is not installed; pip install 'manzano-edge[export]'") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's pool threads spin after each run by default. The pipeline's own tensor work (and an
        # app's) then competes with them: on 2 cores an eager prefill right after an ORT call ran
        # 31.8 ms instead of 16.9, and the ORT prefill itself 12.3 ms instead of 10.0 (small preset).
        opts.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
        opts.log_severity_level = 3
        self.spec = spec
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self.state = {k: v.numpy() for k, v in initial_states(self.spec).items()}

    def _evaluate(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, feed)))

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {t.name: inputs[t.name].numpy() for t in self.spec.inputs}
        feed.update(self.state)
        values = self._evaluate(feed)
        for s in self.spec.states:
            self.state[s.name] = values.pop(f"{s.name}_out")
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}


class ReferenceProgram(OrtProgram):
    """onnx.reference.ReferenceEvaluator: the spec's own interpreter, independent of ORT."""

    def __init__(self, spec: GraphSpec, path: Path) -> None:
        from onnx.reference import ReferenceEvaluator

        self.spec = spec
        self.evaluator = ReferenceEvaluator(str(path))
        self.reset()

    def _evaluate(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.evaluator.output_names, self.evaluator.run(None, feed)))
