"""ExecuTorch: runs the bundle's `executorch/` programs (XNNPACK) through `executorch.runtime`,
with the `llama::` kernels of the in-place KV cache registered."""

from __future__ import annotations

from pathlib import Path

import torch

from manzano_edge.runtime.backends.base import Backend, installed, register_backend, torch_threads
from manzano_edge.spec.graphs import GraphSpec
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
