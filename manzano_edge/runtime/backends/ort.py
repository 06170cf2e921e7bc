"""ONNX Runtime: runs the bundle's `onnx/` graphs (CPU provider), with the explicit KV-cache I/O
hidden behind the same stateful `run`/`reset` as every other backend; `onnx.reference` as an
interpreter independent of ORT for small float graphs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from manzano_edge.errors import UserError
from manzano_edge.runtime.backends.base import Backend, installed, register_backend, torch_threads
from manzano_edge.spec.decoding import causal_mask
from manzano_edge.spec.graphs import Convention, GraphKind, GraphSpec
from manzano_edge.spec.tracing import initial_states

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
        # ORT's pool threads spin after each run by default, competing with the pipeline's own tensor
        # work (and an app's) between calls; docs/results/small-preset-bench.md has the measured cost.
        opts.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
        opts.log_severity_level = 3
        self.spec = spec
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self.state = {k: v.numpy() for k, v in initial_states(self.spec).items()}

    def evaluate(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, feed)))

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The session's inputs for one call: the graph's inputs and the cache carried so far."""
        return {**{t.name: inputs[t.name].numpy() for t in self.spec.inputs}, **self.state}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = self.evaluate(self.feed(inputs))
        for s in self.spec.states:
            self.state[s.name] = values.pop(f"{s.name}_out")
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}


class StockVlmProgram:
    """A graph's `Convention.STOCK_VLM` file run in onnxruntime behind the graph's own I/O, so export
    parity and tests compare it with the reference step by step: pixels -> pixel_values,
    tokens -> input_ids with no image rows, an unpadded causal mask -> the integer attention
    mask, and the per-layer cache grown between calls as onnxruntime-genai grows it."""

    def __init__(self, spec: GraphSpec, path: Path, threads: int = 0) -> None:
        self.spec = spec
        self.variant = spec.variants[Convention.STOCK_VLM]
        self.session = OrtProgram(replace(spec, states=()), path, threads)
        self.past = [t for t in self.variant.inputs if t.name.startswith("past_key_values.")]
        self.reset()

    def reset(self) -> None:
        self.cache = {t.name: np.zeros(t.concrete({"past": 0}), np.float32) for t in self.past}

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The runner file's inputs for one call of the graph's own I/O."""
        kind = self.spec.kind
        if kind == GraphKind.IMAGE_TOKENIZER:
            return {"pixel_values": inputs["pixels"].numpy()}
        if kind == GraphKind.TOKEN_EMBEDDING:
            width = self.variant.inputs[1].shape[-1]
            return {"input_ids": inputs["tokens"].long().numpy(), "image_features": np.zeros((0, width), np.float32)}
        mask = inputs["causal_mask"]
        if mask.shape[0] != 1 or not torch.equal(mask, causal_mask(mask.shape[-1] - mask.shape[-2], mask.shape[-2])):
            raise UserError(f"{self.spec.name}: the stock VLM decoder takes one unpadded row")
        return {"inputs_embeds": inputs["inputs_embeds"].numpy(),
                "attention_mask": np.ones((1, mask.shape[-1]), np.int64), **self.cache}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.session.evaluate(self.feed(inputs))
        kind = self.spec.kind
        if kind == GraphKind.IMAGE_TOKENIZER:
            return {"image_embeds": torch.from_numpy(out["image_features"])[None]}
        if kind == GraphKind.TOKEN_EMBEDDING:
            return {"embeds": torch.from_numpy(out["inputs_embeds"])}
        for t in self.past:
            self.cache[t.name] = out[t.name.replace("past_key_values.", "present.")]
        return {"logits": torch.from_numpy(out["logits"])}


class ReferenceProgram(OrtProgram):
    """onnx.reference.ReferenceEvaluator: the spec's own interpreter, independent of ORT."""

    def __init__(self, spec: GraphSpec, path: Path) -> None:
        from onnx.reference import ReferenceEvaluator

        self.spec = spec
        self.evaluator = ReferenceEvaluator(str(path))
        self.reset()

    def evaluate(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.evaluator.output_names, self.evaluator.run(None, feed)))


def _threads(threads: int) -> dict:
    return {**torch_threads(threads), "ort_intra_op": threads, "ort_allow_spinning": ORT_ALLOW_SPINNING == "1"}


def _load(spec: GraphSpec, path: Path, threads: int = 0, compute_units: str | None = None) -> OrtProgram:
    return OrtProgram(spec, path, threads=threads)


ORT = register_backend(Backend(name="ort", format="onnx", verified_by="onnxruntime", load=_load,
                               runnable_here=installed("onnxruntime"), apply_threads=_threads))
