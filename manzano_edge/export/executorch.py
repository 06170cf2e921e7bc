"""ExecuTorch: torch.export -> to_edge_transform_and_lower -> .pte.

Two programs per graph:
- XNNPACK (runs here, on Android and iOS CPUs): KV cache as mutable buffers (the decoder's in
  `StateLayout.INPLACE` by default), memory planned for the largest dynamic size
  (ConstraintBasedSymShapeEvalPass, TOOLCHAIN gotcha 6); quantized through pt2e / torchao;
- Core ML delegate (Apple only): lowers on Linux, runs only where CoreMLBackend is
  registered. The partitioner takes over the mutable KV buffers so the cache lives in the
  Core ML state.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

from manzano_edge.errors import UserError
from manzano_edge.export import executorch_llm
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
from manzano_edge.fsutil import path_digest
from manzano_edge.quant import xnnpack_ptq
from manzano_edge.quant.recipes import Support, is_float
from manzano_edge.runtime.backends.executorch import EtProgram
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import GraphSpec, StateLayout, TensorSpec
from manzano_edge.spec.modules import build_module, load_executorch_cache_ops
from manzano_edge.spec.tracing import export_program

SUFFIX = ".pte"
BUNDLED_SUFFIX = ".bpte"
COREML_DELEGATE_FOLDER = "executorch-coreml"
# The decoder's KV cache: "llm-ops" (llama::update_cache + custom_sdpa, StateLayout.INPLACE; the device
# runner must link ExecuTorch's custom_ops) or "slice" (slice-assigned cache, core kernels only, slower).
KV_CACHES = {"llm-ops": StateLayout.INPLACE, "slice": StateLayout.STATEFUL}

SUPPORT = {
    "fp32": Support(True, "XNNPACK fp32 (+ Core ML delegate program)"),
    "fp16": Support(False, "XNNPACK fp16 kernels do not run on x86 hosts; use fp32"),
    "w8": Support(False, "torchao weight-only int8 lowered to XNNPACK gives wrong numbers (TOOLCHAIN gotcha 3); "
                         "use w8a8"),
    "w8a8": Support(True, "pt2e XNNPACKQuantizer int8 per-channel on linear/conv, dynamic (default) or static "
                          "activations"),
    "w4": Support(True, "torchao Int8DynamicActivationIntxWeightConfig int4 group 32 (8da4w) on Linear"),
    "palette4": Support(False, "palettization is a Core ML format; XNNPACK has no LUT weights"),
}


def exir():
    try:
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    except ImportError as exc:
        raise UserError("executorch is not installed; pip install 'manzano-edge[export]'") from exc
    return to_edge_transform_and_lower, ExecutorchBackendConfig, ConstraintBasedSymShapeEvalPass


def lower(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], partitioner) -> tuple[bytes, dict]:
    """Returns (program bytes, {"delegates": partitions, "non_delegated_ops": {op: count}})."""
    buffer, delegates, graph = lower_program(export_program(spec, module, example), partitioner)
    return buffer, {"delegates": delegates, "non_delegated_ops": non_delegated_ops(graph)}


def state_io(spec: GraphSpec, module: nn.Module) -> list[dict]:
    """The program's mutable state as it is laid out (the module's top-level buffers), for the
    manifest: the INPLACE layout splits the spec's states per layer."""
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
    to_edge_transform_and_lower, BackendConfig, SymShapePass = exir()
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


# Per-call (dynamic) activation scales beat MinMax-calibrated static ones on every graph
# (docs/guides/quantization-and-validation.md), so dynamic is the default.
W8A8_MODES = ("dynamic", "static")


@register_exporter("executorch", SUPPORT, W8A8_MODES)
class ExecuTorchExporter(BaseExporter):
    name = "executorch"
    title = "ExecuTorch"
    dependency = "executorch"
    suffix = SUFFIX

    def folders(self, opts) -> list[str]:
        return [self.name] + ([COREML_DELEGATE_FOLDER] if opts.executorch_coreml else [])

    def quantized_layers(self, recipe: str) -> tuple[type, ...]:
        # XNNPACKQuantizer annotates linear and conv2d; torchao's 8da4w takes Linear only.
        return {"w8a8": (nn.Linear, nn.Conv2d), "w4": (nn.Linear,)}.get(recipe, ())

    def check_options(self, opts) -> None:
        if opts.executorch_kv_cache not in KV_CACHES:
            raise UserError(f"unknown ExecuTorch KV cache '{opts.executorch_kv_cache}'; "
                            f"choose from {', '.join(KV_CACHES)}")

    def export(self, job: GraphJob) -> list[Entry]:
        spec, model, recipe, opts = job.spec, job.model, job.recipe, job.opts
        layout = KV_CACHES[opts.executorch_kv_cache]
        xnn = Entry(spec.name, self.name)
        path = job.out / self.name / f"{spec.name}{SUFFIX}"
        module = build_module(spec, model, layout)
        if spec.states:  # a stateful graph without an in-place build keeps the slice-assigned cache
            xnn.extra["kv_cache"] = opts.executorch_kv_cache if spec.has_layout(layout) else "slice"
        if is_float(recipe):
            xnn.extra.update(export(spec, module, job.examples[0], path, "xnnpack"))
        else:
            self._quantized(job, module, path, xnn)
        # Parity against the graph's reference build (the slice-assigned cache), so the in-place
        # layout is checked against the module every other format exports.
        xnn.parity = dict(SKIPPED) if not job.check else run_parity(
            spec, TorchProgram(spec, build_module(spec, model)), EtProgram(spec, path), job.examples)
        xnn.extra["io"] = {**spec.manifest_io(), "states": state_io(spec, module)}
        del module
        xnn.extra["backend"] = "xnnpack"
        xnn.extra["verified_by"] = "executorch.runtime"
        judge(xnn, recipe, fp16_compute=False)
        if opts.bundled_io:
            bpte = path.with_suffix(BUNDLED_SUFFIX)
            info = write_bundled_program(spec, path, job.examples[0], bpte)
            digest, size = path_digest(bpte)
            xnn.extra["bundled_program"] = {"file": str(bpte.relative_to(job.out)), "sha256": digest, "bytes": size,
                                            **info}
        entries = [finish(xnn, path, job.out)]
        if not is_float(recipe):
            check_smaller(xnn, xnn.extra.pop("_float_bytes"))
            return entries  # the Core ML delegate program is float-only here; Core ML recipes go through `coreml`
        if opts.executorch_coreml:
            # FX graphs hold reference cycles: free the XNNPACK program's weight copies before the
            # second lowering (the bundle's loop collects after each graph).
            gc.collect()
            entries.append(self.coreml_delegate(job))
        return entries

    def finish_bundle(self, out: Path, jobs: dict[str, GraphJob], entries: list[Entry], tokenizer_json: str) -> dict:
        return {executorch_llm.RUNNER: executorch_llm.write_program(out, tokenizer_json, jobs)}

    def runner_programs(self, bundle, spec: GraphSpec) -> list[RunnerProgram]:
        return executorch_llm.method_programs(bundle, spec)

    def _quantized(self, job: GraphJob, module: nn.Module, path: Path, entry: Entry) -> None:
        spec, recipe, plan = job.spec, job.recipe, job.plan
        mode = plan.modes[self.name] if recipe == "w8a8" else "8da4w"
        program, info = xnnpack_ptq.quantize(spec, module, job.examples[0], recipe, mode,
                                             plan.calibration.get(spec.name), plan.keep_modules(spec, job.model))
        partitioner = xnnpack_partitioner(dynamic_quant=mode in ("dynamic", "8da4w"))
        buffer, delegates, graph = lower_program(program, partitioner)
        info["delegation"] = xnnpack_ptq.delegation(graph)
        entry.extra["non_delegated_ops"] = non_delegated_ops(graph)
        if info["delegation"]["quant_ops_delegated"] == 0:
            raise cannot_quantize(spec, self.name, recipe, "no quantized op ends up inside an XNNPACK delegate "
                                  f"({info['delegation']['quant_ops_not_delegated']} left on portable kernels)")
        path.write_bytes(buffer)
        entry.extra.update({"delegates": delegates, "quantization": info})
        # An fp32 .pte is its float weights plus a small program: compare against that.
        entry.extra["_float_bytes"] = sum(t.numel() * 4 for t in module.state_dict().values() if t.is_floating_point())

    def coreml_delegate(self, job: GraphJob) -> Entry:
        """The float program lowered to ExecuTorch's Core ML delegate, checked for structure only."""
        spec = job.spec
        apple = Entry(spec.name, COREML_DELEGATE_FOLDER)
        path = job.out / COREML_DELEGATE_FOLDER / f"{spec.name}{SUFFIX}"
        apple.extra.update(export(spec, build_module(spec, job.model), job.examples[0], path, "coreml"))
        apple.extra["io"] = spec.manifest_io()
        apple.extra["backend"] = "coreml"
        apple.extra["verified_by"] = "structure only: CoreMLBackend runs on Apple hardware"
        return finish(apple, path, job.out)
