"""Argument groups and helpers that more than one command shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from manzano_edge.errors import UserError


def add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--token-guidance", type=float, default=1.0, help="CFG scale for image tokens (1 = off)")
    p.add_argument("--steps", type=int, default=20, help="flow-matching steps")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale for the DiT (1 = off)")


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="an exported bundle directory (for --backend ort|executorch|coreml)")
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "executorch", "coreml"])



def pipeline(checkpoint: str | None, bundle: str | None = None, backend: str = "torch"):
    """Eager PyTorch on a checkpoint (`--backend torch`), or a bundle's graphs on ort/executorch/coreml."""
    from manzano_edge.data.text import TextCodec
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.runtime.graphs import TorchGraphs
    from manzano_edge.runtime.pipeline import Pipeline

    if backend != "torch":
        from manzano_edge.runtime.bundle import Bundle, BundleGraphs

        if not bundle:
            raise UserError(f"--backend {backend} runs an exported bundle; pass --bundle DIR (see `manzano-edge export`)")
        b = Bundle(bundle)
        return Pipeline(BundleGraphs(b, backend), b.cfg, TextCodec(b.tokenizer_json, b.cfg.text))
    model, tokenizer_json = load_checkpoint(checkpoint)
    return Pipeline(TorchGraphs(model), model.cfg, TextCodec(tokenizer_json, model.cfg.text))


def sampling(args):
    from manzano_edge.runtime.pipeline import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          token_guidance=args.token_guidance, flow_steps=args.steps, flow_guidance=args.guidance)


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` through a temp file beside `path`, renamed onto it at the end (fsutil.atomic_file)."""
    from manzano_edge.fsutil import atomic_file

    with atomic_file(Path(path)) as tmp:
        write(str(tmp))
