"""Core ML: runs the bundle's `coreml/` .mlpackages through coremltools `predict` with a Core ML
state for the KV cache, on macOS only. Elsewhere a Core ML graph is checked by `EmulatedProgram`
(the reference graph with Core ML's stored weights and precision), and reported as emulated."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from manzano_edge.data.images import pixels_from_uint8, pixels_to_uint8
from manzano_edge.errors import UserError
from manzano_edge.runtime.backends.base import Backend, register_backend
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import GraphSpec

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


class EmulatedProgram(TorchProgram):
    """Linux stand-in for Core ML: the reference graph with Core ML's weights and precision. An
    image input (Core ML's ImageType) carries 8-bit values: its pixels are rounded to them first."""

    def __init__(self, spec: GraphSpec, module: nn.Module, fp16: bool, image_inputs: Iterable[str] = ()) -> None:
        super().__init__(spec, module)
        self.fp16 = fp16
        self.image_inputs = frozenset(image_inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {k: pixels_from_uint8(pixels_to_uint8(v)) if k in self.image_inputs else v for k, v in inputs.items()}
        if self.fp16:
            inputs = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}
        return {k: v.float() if v.is_floating_point() else v for k, v in super().run(inputs).items()}


def image_inputs(features) -> dict[str, str]:
    """The inputs of a Core ML model description that are images (`ImageType`): name -> color space."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    return {f.name: ft.ImageFeatureType.ColorSpace.Name(f.type.imageType.colorSpace)
            for f in features if f.type.WhichOneof("Type") == "imageType"}


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

    COMPUTE_UNITS = COMPUTE_UNITS

    def __init__(self, spec: GraphSpec, path: Path, compute_units: str = "ALL", function: str | None = None) -> None:
        """`function`: which function of a multifunction model (None: its default)."""
        ok, why = predict_available()
        if not ok:
            raise UserError(f"the coreml backend cannot run here: {why}; use --backend ort or executorch")
        if compute_units not in self.COMPUTE_UNITS:
            raise UserError(f"unknown compute unit '{compute_units}'; choose one of {', '.join(self.COMPUTE_UNITS)}")
        import coremltools as ct

        self.spec = spec
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units),
                                       **({"function_name": function} if function else {}))
        self.image_inputs = frozenset(image_inputs(self.model.get_spec().description.input))
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

    def feed(self, name: str, value: torch.Tensor):
        """An ImageType input takes a PIL image (predict converts it to the CVPixelBuffer Core ML reads)."""
        if name in self.image_inputs:
            return Image.fromarray(pixels_to_uint8(value)[0].permute(1, 2, 0).numpy(), "RGB")
        return value.numpy()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {t.name: self.feed(t.name, inputs[t.name]) for t in self.spec.inputs}
        out = self.model.predict(feed, state=self.state) if self.state is not None else self.model.predict(feed)
        return {t.name: torch.from_numpy(np.asarray(out[t.name])) for t in self.spec.outputs}


class AppleLLMProgram(CoreMLProgram):
    """macOS only: a function of the `coreml-llm` decoder (Apple's LLM convention) behind the decoder
    graph's own I/O: camelCase fp16 inputs, the last of the T logits rows out."""

    NAMES = {"inputs_embeds": "inputsEmbeds", "causal_mask": "causalMask"}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {self.NAMES[t.name]: inputs[t.name].numpy().astype(np.float16) for t in self.spec.inputs}
        logits = np.asarray(self.model.predict(feed, state=self.state)["logits"])
        return {"logits": torch.from_numpy(logits[:, -1:].astype(np.float32))}


def _load(spec: GraphSpec, path: Path, threads: int = 0, compute_units: str | None = None) -> CoreMLProgram:
    return CoreMLProgram(spec, path, compute_units=compute_units or "ALL")


COREML = register_backend(Backend(name="coreml", format="coreml", verified_by="coremltools predict", load=_load,
                                  runnable_here=predict_available, compute_units=COMPUTE_UNITS))
