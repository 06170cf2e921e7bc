"""Calibration inputs for PTQ: real inputs from the procedural data generator.

Each calibration sample is one call of `spec.real_examples` with its own seed (two scenes, a
generation prompt with its greedy decode, a noisy DiT step, a VAE latent), drawn from seeds
the parity/validation examples never use. Per graph the result is a list of *sequences*:
stateless graphs get one-step sequences; the decoder gets prefill + decode steps, run in order
with the KV cache so calibration sees real cache contents.

A user file (`--calibration FILE.safetensors`) may replace the generated inputs; its tensors
are named `<graph>.<sample>.<input>` and are checked against the graph declarations.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import Manzano
from manzano_edge.spec.examples import real_examples
from manzano_edge.spec.graphs import GraphSpec, graph_specs
from manzano_edge.spec.modules import reset_states

CALIBRATION_SEED = 10_000  # parity/validation use seed 7 and held-out streams
Sequences = list[list[dict[str, torch.Tensor]]]


def calibrate(module: torch.nn.Module, spec: GraphSpec, sequences: Sequences) -> int:
    """Feed every sequence through an observed module in order, its KV-cache states zeroed before
    each sequence and after the last; returns the steps run."""
    steps = 0
    with torch.no_grad():
        for sequence in sequences:
            reset_states(module, spec)
            for step in sequence:
                module(*(step[t.name] for t in spec.inputs))
                steps += 1
        reset_states(module, spec)
    return steps


def generated(model: Manzano, codec: TextCodec, samples: int, decode_steps: int = 8) -> dict[str, Sequences]:
    if samples < 1:
        raise UserError(f"--calibration-samples must be at least 1, got {samples}")
    return example_sequences(model, codec, samples, decode_steps, CALIBRATION_SEED)


def example_sequences(model: Manzano, codec: TextCodec, samples: int, decode_steps: int,
                      first_seed: int) -> dict[str, Sequences]:
    """Per graph, a list of sequences from `samples` real-example seeds (decoder: prefill +
    greedy decode steps, in order; every other graph: one step per sequence)."""
    out: dict[str, Sequences] = {}
    stateful = {name for name, spec in graph_specs(model.cfg).items() if spec.states}
    for i in range(samples):
        per_graph = real_examples(model, codec, decode_steps=decode_steps, seed=first_seed + i).per_graph
        for name, examples in per_graph.items():
            seqs = out.setdefault(name, [])
            if name in stateful:
                seqs.append(examples)
            else:
                seqs.extend([e] for e in examples)
    return out


def from_file(path: str | Path, specs: dict[str, GraphSpec]) -> dict[str, Sequences]:
    """Load `<graph>.<sample>.<input>` tensors; a decoder sample is one step of one sequence."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on a corrupt header
        raise UserError(f"calibration file {path} is not a safetensors file ({exc})") from exc
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"([a-z_]+)\.(\d+)\.([a-z_]+)", key)
        if not m or m.group(1) not in specs:
            raise UserError(f"calibration tensor '{key}' is not named <graph>.<sample>.<input> with graph in "
                            f"{', '.join(specs)}")
        grouped.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
    out: dict[str, Sequences] = {}
    for name, samples in grouped.items():
        steps = [samples[i] for i in sorted(samples)]
        for step in steps:
            specs[name].check_inputs(step)  # wrong shape/dtype -> one-line UserError
        out[name] = [steps] if specs[name].states else [[s] for s in steps]
    return out


def check_shapes(spec: GraphSpec, sequences: Sequences) -> None:
    for seq in sequences:
        for step in seq:
            try:
                spec.check_inputs(step)
            except UserError as exc:
                raise UserError(f"calibration data: {exc}") from exc
