"""Core AI: runs the bundle's `coreai/` .aimodel assets. On macOS 27 the OS framework loads them;
on Linux x86_64 (glibc 2.34+) and macOS 26 arm64, the runtime bundled in the `coreai-core` wheel
does, so a Core AI graph is checked by executing it, not by emulation. The bundled runtime is
not a device measurement: its latency says nothing about an iPhone's. Only the OS framework
specializes an asset for a preferred compute unit (CPU, GPU, Neural Engine), so `bench` has one
row per compute unit on macOS 27 and one row elsewhere.

A graph whose batch is dynamic ships one static function per batch size (`batch_1`, `batch_2`):
coreai-torch folds the reshape that merges a dynamic batch into the attention heads and the
model then fails to run. Every other graph has one function, `main`, with dynamic shapes."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import platform
from pathlib import Path

import numpy as np
import torch

from manzano_edge.errors import UserError
from manzano_edge.runtime.backends.base import Backend, register_backend
from manzano_edge.spec.graphs import DTYPES, GraphSpec

MAIN_FUNCTION = "main"
BATCH_DIM = "batch"
# Where a coreai-core wheel exists, and so where .aimodel assets convert and run.
PLATFORMS = "Linux x86_64 with glibc 2.34+, or macOS 26+ on Apple silicon"
INSTALL = "pip install 'manzano-edge[coreai]'"
VERIFIED_BY = "coreai-core runtime (the wheel's own build off macOS 27: not a device measurement)"


def platform_supported() -> tuple[bool, str]:
    system, machine = platform.system(), platform.machine()
    if system == "Linux" and machine == "x86_64":
        libc, version = platform.libc_ver()
        if libc == "glibc" and tuple(int(p) for p in version.split(".")[:2]) < (2, 34):
            return False, f"Core AI needs {PLATFORMS}; this is glibc {version}"
        return True, ""
    if system == "Darwin" and machine == "arm64":
        major = _macos_major()
        return (True, "") if major >= 26 else (False, f"Core AI needs {PLATFORMS}; this is macOS {major}")
    return False, f"Core AI needs {PLATFORMS}; this is {system} {machine}"


def _macos_major() -> int:
    return int(platform.mac_ver()[0].split(".")[0] or 0) if platform.system() == "Darwin" else 0


# Compute units an app can prefer (`SpecializationOptions`): only Apple's OS framework (macOS 27+)
# specializes; the runtime bundled in the wheel runs on the CPU it is on.
SPECIALIZES = _macos_major() >= 27
COMPUTE_UNITS = ("CPU", "GPU", "NEURAL_ENGINE") if SPECIALIZES else ()
DEFAULT_UNIT = "ALL"  # no preference: Core AI's own placement


def specialization(compute_units: str | None):
    """`SpecializationOptions` preferring `compute_units`, or None for Core AI's default placement."""
    if compute_units in (None, DEFAULT_UNIT):
        return None
    if not SPECIALIZES:
        raise UserError(f"Core AI compute unit '{compute_units}' needs Apple's Core AI framework (macOS 27+); "
                        "this runtime runs on the CPU it is on, so leave the compute unit out")
    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"unknown Core AI compute unit '{compute_units}'; choose from {', '.join(COMPUTE_UNITS)}")
    from coreai.runtime import ComputeUnitKind, SpecializationOptions

    kind = {"CPU": ComputeUnitKind.cpu, "GPU": ComputeUnitKind.gpu, "NEURAL_ENGINE": ComputeUnitKind.neural_engine}
    return SpecializationOptions.from_preferred_compute_unit_kind(kind[compute_units]())


def runnable() -> tuple[bool, str]:
    ok, why = platform_supported()
    if not ok:
        return ok, why
    if importlib.util.find_spec("coreai") is None:
        return False, f"coreai-core is not installed ({INSTALL})"
    return True, ""


def function_name(batch: int | None) -> str:
    return MAIN_FUNCTION if batch is None else f"{BATCH_DIM}_{batch}"


def batch_sizes(spec: GraphSpec) -> list[int | None]:
    """The functions a graph's asset has: one per batch size where the batch is dynamic."""
    dim = spec.dims.get(BATCH_DIM)
    return [None] if dim is None else list(range(dim.min, dim.max + 1))


def batch_axes(spec: GraphSpec) -> dict[str, int]:
    """Input name -> the axis of its dynamic batch dim, for the inputs that have one."""
    return {t.name: i for t in spec.inputs for i, d in enumerate(t.shape) if getattr(d, "name", None) == BATCH_DIM}


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype("float16" if name in ("float16", "fp16", "f16") else name)


class CoreAIProgram:
    """One .aimodel behind its graph's I/O: inputs cast to the dtypes the function declares (an
    fp16 asset takes fp16), outputs back to the graph's dtypes, the KV cache in Core AI state
    arrays that persist across `run` calls until `reset`."""

    def __init__(self, spec: GraphSpec, path: Path, compute_units: str | None = None) -> None:
        ok, why = runnable()
        if not ok:
            raise UserError(f"the coreai backend cannot run here: {why}")
        options = specialization(compute_units)
        from coreai.authoring import AIModelAsset

        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._stack = contextlib.AsyncExitStack()
        asset = AIModelAsset.load(Path(path))
        # On Linux `executable()` lowers the asset for the bundled runtime in a temporary
        # directory that lives as long as the context; on macOS 27 it loads it in the OS framework.
        self.model = self._loop.run_until_complete(self._stack.enter_async_context(asset.executable(options)))
        self.functions = {name: self.model.load_function(name) for name in self.model.function_names}
        self.reset()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._stack.aclose())
            self._loop.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def reset(self) -> None:
        from coreai.runtime import NDArray

        self.states = {}
        for name, fn in self.functions.items():
            desc = fn.desc
            self.states[name] = {s: NDArray(np.zeros(self._state_shape(s), _numpy_dtype(desc.state_descriptor(s).dtype)))
                                 for s in desc.state_names}

    def _state_shape(self, name: str) -> tuple[int, ...]:
        return next(s.concrete({}) for s in self.spec.states if s.name == name)

    def _function(self, inputs: dict[str, torch.Tensor]) -> str:
        axes = batch_axes(self.spec)
        if not axes:
            return MAIN_FUNCTION
        name, axis = next(iter(axes.items()))
        return function_name(int(inputs[name].shape[axis]))

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from coreai.runtime import NDArray

        name = self._function(inputs)
        fn = self.functions[name]
        desc = fn.desc
        feed = {t.name: NDArray(np.ascontiguousarray(inputs[t.name].numpy(),
                                                     dtype=_numpy_dtype(desc.input_descriptor(t.name).dtype)))
                for t in self.spec.inputs}
        out = self._loop.run_until_complete(fn(feed, state=self.states[name]))
        return {t.name: torch.from_numpy(np.array(out[t.name].numpy())).to(DTYPES[t.dtype]) for t in self.spec.outputs}


def asset_info(path: Path) -> dict:
    """What an .aimodel directory records about itself (producer, date, asset version)."""
    meta = Path(path) / "metadata.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _load(spec: GraphSpec, path: Path, threads: int = 0, compute_units: str | None = None) -> CoreAIProgram:
    return CoreAIProgram(spec, path, compute_units)


def runtime_note() -> str:
    """coreai-core runs an asset in Apple's OS framework on macOS 27+, elsewhere in its own build."""
    if SPECIALIZES:
        return ""
    return ("Core AI ran in the runtime bundled with the coreai-core wheel, not Apple's OS framework: its numbers "
            "check the .aimodel's numerics; its latency is not a device measurement.")


COREAI = register_backend(Backend(name="coreai", format="coreai", verified_by=VERIFIED_BY, load=_load,
                                  runnable_here=runnable, runtime_note=runtime_note(), compute_units=COMPUTE_UNITS))
