"""ExecuTorch: torch.export -> to_edge_transform_and_lower -> .pte.

Two programs per graph:
- XNNPACK (runs here, on Android and iOS CPUs): KV cache as mutable buffers, memory planned
  for the largest dynamic size (ConstraintBasedSymShapeEvalPass, TOOLCHAIN gotcha 6);
- Core ML delegate (Apple only): lowers on Linux, runs only where CoreMLBackend is
  registered. The partitioner takes over the mutable KV buffers so the cache lives in the
  Core ML state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.export.common import export_program
from manzano_edge.export.spec import GraphSpec, TensorSpec
from manzano_edge.models.decoder import load_executorch_cache_ops

SUFFIX = ".pte"


def _exir():
    try:
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    except ImportError as exc:
        raise UserError("executorch is not installed; pip install 'manzano-edge[export]'") from exc
    return to_edge_transform_and_lower, ExecutorchBackendConfig, ConstraintBasedSymShapeEvalPass


def lower(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], partitioner) -> tuple[bytes, dict]:
    """Returns (program bytes, {"delegates": partitions, "non_delegated_ops": {op: count}})."""
    buffer, delegates, graph = lower_program(export_program(spec, module, example, explicit_state=False), partitioner)
    return buffer, {"delegates": delegates, "non_delegated_ops": non_delegated_ops(graph)}


def state_io(spec: GraphSpec, module: nn.Module) -> list[dict]:
    """The program's mutable state as it is laid out (the module's top-level buffers), for the
    manifest: ExecuTorch variants may split or transpose the spec's states."""
    if not spec.states:
        return []
    return [TensorSpec(name, tuple(buf.shape), str(buf.dtype).removeprefix("torch.")).to_json()
            for name, buf in module._buffers.items() if buf is not None]


def non_delegated_ops(graph: torch.fx.GraphModule) -> dict[str, int]:
    """The ops left on ExecuTorch's portable kernels, by count (ExecuTorch devtools): each one
    between two delegated ops is a partition boundary."""
    from executorch.devtools.backend_debug import get_delegation_info

    rows = get_delegation_info(graph).delegation_by_operator
    return {op: row.non_delegated for op, row in sorted(rows.items()) if row.non_delegated and op != "getitem"}


def lower_program(ep: torch.export.ExportedProgram, partitioner) -> tuple[bytes, int, torch.fx.GraphModule]:
    """(program bytes, delegated partitions, the lowered edge graph for inspection)."""
    to_edge_transform_and_lower, BackendConfig, SymShapePass = _exir()
    partitioners = partitioner if isinstance(partitioner, list) else [partitioner]
    edge = to_edge_transform_and_lower(ep, partitioner=partitioners)
    graph = edge.exported_program().graph_module
    delegates = sum(1 for n in graph.graph.nodes
                    if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    program = edge.to_executorch(BackendConfig(sym_shape_eval_pass=SymShapePass()))
    return program.buffer, delegates, graph


def xnnpack_partitioner(dynamic_quant: bool = False):
    """Dynamically quantized programs take ExecuTorch's two-pass recipe (its llama export's):
    the dynamically-quantized linears first, then everything else. One pass over the DiT's w8a8
    graph fails with "Invalid partition, found dependency cycles" (several dynamically quantized
    linears read the same condition tensor)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )

    if dynamic_quant:
        return [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()]
    return XnnpackPartitioner()


def coreml_partitioner(fp16: bool = True):
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
    return CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=True)


def export(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], path: Path,
           backend: str = "xnnpack", fp16: bool = True) -> dict:
    """Returns {"delegates": partitions, "non_delegated_ops": ...}; 0 partitions is legitimate
    (XNNPACK does not take `embedding`, so embed_tokens runs on the portable kernels) and is recorded."""
    partitioner = xnnpack_partitioner() if backend == "xnnpack" else coreml_partitioner(fp16)
    buffer, delegation = lower(spec, module, example, partitioner)
    path.write_bytes(buffer)
    return delegation


BUNDLED_SUFFIX = ".bpte"


def write_bundled_program(spec: GraphSpec, pte: Path, inputs: dict[str, torch.Tensor], path: Path) -> dict:
    """A bundled program for ExecuTorch's on-device runners (`executor_runner --bundleio`, the
    benchmark apps): the .pte plus one test case, the real example inputs with the outputs this
    host's ExecuTorch runtime produced for them. The device run then checks that it reproduces
    the host numbers. Stateful graphs start from their initial (zero) KV cache."""
    try:
        from executorch.devtools import BundledProgram
        from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
        from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer
    except ImportError as exc:
        raise UserError("executorch devtools are not installed; pip install 'manzano-edge[export]'") from exc
    outputs = EtProgram(spec, pte).run(inputs)
    case = MethodTestCase(inputs=[inputs[t.name].contiguous() for t in spec.inputs],
                          expected_outputs=[outputs[t.name] for t in spec.outputs])
    program = BundledProgram(None, [MethodTestSuite("forward", [case])], pte_file_path=str(pte))
    path.write_bytes(serialize_from_bundled_program_to_flatbuffer(program))
    verify_bundled_program(path)
    return {"test_cases": 1, "verified_on_host": True}


def verify_bundled_program(path: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Load the bundled program the way a device runner does, feed its bundled input, and check
    the outputs against the bundled expectation (raises if they differ)."""
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    load_executorch_cache_ops()
    bundle = _load_bundled_program_from_buffer(Path(path).read_bytes())
    try:  # executorch 1.5: loads the bundled input, executes, compares
        bundle.verify_result_with_bundled_expected_output("forward", 0, rtol, atol)
    except RuntimeError as exc:
        raise UserError(f"bundled program {Path(path).name} does not reproduce its expected outputs ({exc})") from exc


def runtime():
    """ExecuTorch's runtime, with the kernels of the `llama::` ops our decoder program calls
    registered (the Python runtime only knows them once their library is loaded; a device
    runner must link ExecuTorch's `custom_ops` library, which its `llm` CMake preset builds)."""
    load_executorch_cache_ops()  # raises the clear "not installed" error without executorch
    from executorch.runtime import Runtime

    return Runtime.get()


class EtProgram:
    """A loaded .pte method. Its mutable buffers (the KV cache) persist across `run` calls;
    `reset` loads the method afresh, which restores their initial (zero) values."""

    def __init__(self, spec: GraphSpec, path: Path) -> None:
        self.spec = spec
        self.program = runtime().load_program(Path(path))
        self.reset()

    def reset(self) -> None:
        self.method = self.program.load_method("forward")

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.method.execute([inputs[t.name].contiguous() for t in self.spec.inputs])
        return {t.name: o.clone() for t, o in zip(self.spec.outputs, out)}
