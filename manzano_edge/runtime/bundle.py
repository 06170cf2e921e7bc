"""Run an exported bundle: verify it against its manifest, load one program per graph on the
chosen backend(s), and expose them through the same `GraphRunner` interface the eager
reference uses, so `Pipeline.understand/generate` run unchanged on every backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from manzano_edge.config import ModelConfig
from manzano_edge.errors import UserError
from manzano_edge.fsutil import path_digest
from manzano_edge.models.manzano import CONFIG_FILE, TOKENIZER_FILE
from manzano_edge.runtime.backends import GraphProgram, get_backend
from manzano_edge.spec.graphs import GraphSpec, graph_specs

# The bundle's files besides the graphs and the model's config and tokenizer (`export` writes them).
MANIFEST_FILE = "manifest.json"
NULL_CONDITION_FILE = "diffusion_null_condition.safetensors"


class Bundle:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"bundle directory {self.path} does not exist; pass a directory written by `manzano-edge export`")
        if not self.path.is_dir():
            raise UserError(f"bundle {self.path} is a file; pass the directory written by `manzano-edge export`")
        manifest = self.path / MANIFEST_FILE
        if not manifest.is_file():
            raise UserError(f"{self.path} has no manifest.json; pass a directory written by `manzano-edge export`")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{manifest} is corrupt ({exc.msg}); re-export the bundle") from exc
        self.cfg = ModelConfig.load(self.path / CONFIG_FILE)
        if not (self.path / TOKENIZER_FILE).is_file():
            raise UserError(f"bundle {self.path} has no {TOKENIZER_FILE}; re-export the bundle")
        self.tokenizer_json = (self.path / TOKENIZER_FILE).read_text()
        held = self.manifest.get("graphs", {})
        # Every required graph, and the optional ones (decoder_cfg) this bundle holds.
        self.specs = {n: spec for n, spec in graph_specs(self.cfg).items() if not spec.optional or n in held}

    def entry(self, graph: str, fmt: str) -> dict:
        try:
            return self.manifest["graphs"][graph]["formats"][fmt]
        except KeyError as exc:
            raise UserError(f"bundle {self.path} has no {fmt} file for graph '{graph}'; "
                            f"re-export with --format {fmt}") from exc

    def verified_file(self, rel: str, sha256: str) -> Path:
        path = self.path / rel
        if not path.exists():
            raise UserError(f"bundle file {rel} is missing; re-export the bundle")
        digest, _ = path_digest(path)
        if digest != sha256:
            raise UserError(f"bundle file {rel} does not match its manifest checksum (corrupt or modified); "
                            "re-export the bundle")
        return path

    def program(self, graph: str, backend: str, threads: int = 0, compute_units: str | None = None) -> GraphProgram:
        runner = get_backend(backend)
        if runner.format is None:
            raise UserError(f"backend '{backend}' runs a checkpoint, not a bundle; choose a bundle backend")
        entry = self.entry(graph, runner.format)
        path = self.verified_file(entry["file"], entry["sha256"])
        for side in entry.get("external_data", []):
            self.verified_file(side["file"], side["sha256"])
        return runner.program(self.specs[graph], path, threads=threads, compute_units=compute_units)

    def formats(self) -> list[str]:
        """The formats this bundle holds files for."""
        return sorted({f for g in self.manifest.get("graphs", {}).values() for f in g.get("formats", {})})

    def verify_checksums(self) -> None:
        """Every file of the manifest against its sha256."""
        for graph in self.manifest.get("graphs", {}).values():
            for f in graph.get("formats", {}).values():
                self.verified_file(f["file"], f["sha256"])
                for side in f.get("external_data", []):
                    self.verified_file(side["file"], side["sha256"])
        for extra in self.manifest.get("extras", {}).values():
            self.verified_file(extra["file"], extra["sha256"])
        for runner in self.manifest.get("runners", {}).values():
            for f in runner.get("files", []):
                self.verified_file(f["file"], f["sha256"])

    def null_condition(self) -> torch.Tensor:
        info = self.manifest.get("extras", {}).get("null_condition")
        if not info:
            raise UserError("this bundle has no DiT null condition; re-export it to use --guidance")
        return load_file(str(self.verified_file(info["file"], info["sha256"])))["null_condition"]


class CheckedProgram:
    """Checks every input against the graph's declaration before it reaches the backend."""

    def __init__(self, spec: GraphSpec, program: GraphProgram) -> None:
        self.spec, self.program = spec, program

    def reset(self) -> None:
        self.program.reset()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.spec.check_inputs(inputs)
        return self.program.run(inputs)


# Image-token CFG decodes its conditional and unconditional rows as one batch of 2.
DECODER_BY_BATCH = {1: "decoder", 2: "decoder_cfg"}


class BundleGraphs:
    """`GraphRunner` over a bundle; `backends` maps graph name -> backend (mixing is allowed)."""

    def __init__(self, bundle: Bundle, backends: dict[str, str] | str, threads: int = 0,
                 compute_units: str | None = None) -> None:
        names = list(bundle.specs)
        chosen = {g: backends for g in names} if isinstance(backends, str) else {g: backends.get(g, "ort") for g in names}
        self._bind(bundle, {g: bundle.program(g, chosen[g], threads, compute_units) for g in names})

    @classmethod
    def from_programs(cls, bundle: Bundle, programs: dict[str, GraphProgram]) -> BundleGraphs:
        """Over programs the caller already loaded (e.g. the benchmark, which times each load)."""
        graphs = cls.__new__(cls)
        graphs._bind(bundle, programs)
        return graphs

    def _bind(self, bundle: Bundle, programs: dict[str, GraphProgram]) -> None:
        self.bundle = bundle
        self.p = {g: CheckedProgram(bundle.specs[g], programs[g]) for g in bundle.specs}
        self._null: torch.Tensor | None = None
        self._decoder: CheckedProgram | None = None

    def vision_embeddings(self, pixels):
        return self.p["tokenizer"].run({"pixels": pixels})["image_embeds"]

    def image_ids(self, pixels):
        return self.p["tokenizer"].run({"pixels": pixels})["image_ids"].long()

    def embed_tokens(self, tokens):
        # The graph takes one row: a lookup per row costs nothing next to a decode step.
        rows = [self.p["embed_tokens"].run({"tokens": row[None].to(torch.int32)})["embeds"] for row in tokens]
        return torch.cat(rows)

    def decoder_reset(self, batch_size: int) -> None:
        name = DECODER_BY_BATCH.get(batch_size)
        if name not in self.p:
            raise UserError(f"bundle {self.bundle.path} has no decoder for a batch of {batch_size}; image-token "
                            "guidance (--token-guidance) needs the decoder_cfg graph: re-export with "
                            "--graphs all (or add decoder_cfg to --graphs)")
        self._decoder = self.p[name]
        self._decoder.reset()

    def decoder_step(self, embeds, mask):
        if self._decoder is None:
            raise RuntimeError("decoder_reset() first")
        return self._decoder.run({"inputs_embeds": embeds, "causal_mask": mask.to(torch.float32)})["logits"]

    def code_features(self, ids):
        return self.p["code_features"].run({"image_ids": ids.to(torch.int32)})["condition"]

    def null_condition(self, batch, tokens):
        if self._null is None:
            self._null = self.bundle.null_condition()
        return self._null.expand(batch, tokens, -1)

    def denoise(self, latent, t, cond):
        return self.p["dit"].run({"latent": latent, "timestep": t.float(), "condition": cond})["velocity"]

    def vae_decode(self, latent):
        return self.p["vae_decoder"].run({"latent": latent})["pixels"]
