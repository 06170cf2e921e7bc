"""ExecuTorch: runs the bundle's `executorch/` programs (XNNPACK) through `executorch.runtime`,
with the `llama::` kernels of the in-place KV cache registered."""

from __future__ import annotations

from pathlib import Path

import torch

from manzano_edge.data.images import pixels_to_uint8
from manzano_edge.errors import UserError
from manzano_edge.runtime.backends.base import Backend, installed, register_backend, torch_threads
from manzano_edge.spec.decoding import causal_mask
from manzano_edge.spec.graphs import GraphKind, GraphSpec
from manzano_edge.spec.modules import load_executorch_cache_ops


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


class RunnerMethodProgram:
    """One method of an LLM-runner program (`Convention.STOCK_LLM_RUNNER`) behind its graph's own I/O,
    so export parity compares it with the reference step by step: pixels -> the uint8 image the
    runner passes, tokens -> int64, an unpadded causal mask [1, 1, T, E] -> input_pos = E - T."""

    def __init__(self, spec: GraphSpec, path: Path, method: str) -> None:
        self.spec, self.name = spec, method
        self.program = runtime().load_program(Path(path))
        self.reset()

    def reset(self) -> None:
        self.method = self.program.load_method(self.name)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.spec.kind == GraphKind.IMAGE_TOKENIZER:
            return {"image_embeds": self.method.execute([pixels_to_uint8(inputs["pixels"])])[0].clone()}
        if self.spec.kind == GraphKind.TOKEN_EMBEDDING:
            return {"embeds": self.method.execute([inputs["tokens"].long()])[0].clone()}
        mask = inputs["causal_mask"]
        t, end = mask.shape[-2], mask.shape[-1]
        if mask.shape[0] != 1 or not torch.equal(mask, causal_mask(end - t, t)):
            raise UserError(f"{self.spec.name}: the runner's decoder takes one unpadded row")
        out = self.method.execute([inputs["inputs_embeds"].contiguous(), torch.tensor([end - t])])
        return {"logits": out[0].clone()}


def _threads(threads: int) -> dict:
    info = torch_threads(threads)
    try:
        from executorch.extension.pybindings import portable_lib as et

        et._unsafe_reset_threadpool(threads)  # XNNPACK's shared pthreadpool
        info["executorch_threadpool"] = int(et._threadpool_get_thread_count())
    except (ImportError, AttributeError) as exc:
        info["executorch_threadpool"] = f"not settable ({type(exc).__name__}); ExecuTorch default"
    return info


def _load(spec: GraphSpec, path: Path, threads: int = 0, compute_units: str | None = None) -> EtProgram:
    return EtProgram(spec, path)


EXECUTORCH = register_backend(Backend(name="executorch", format="executorch", verified_by="executorch.runtime",
                                      load=_load, runnable_here=installed("executorch"), apply_threads=_threads))
