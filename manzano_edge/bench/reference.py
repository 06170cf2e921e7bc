"""The PyTorch eager fp32 baseline for a bundle. Bundles hold no float weights, so the baseline
comes from (in order): `--reference CHECKPOINT`; the embedded model when the bundle's config is
the embedded one; or a random-weight preset re-created exactly as `export --preset` does
(torch.manual_seed(seed), then Manzano(preset)). Each is checked against the bundle's own
graph outputs, so a wrong seed or checkpoint is refused rather than silently compared."""

from __future__ import annotations

from pathlib import Path

import torch

from manzano_edge.config import PRESETS, ModelConfig, preset
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import CONFIG_FILE, EMBEDDED_DEFAULT, Manzano, load_checkpoint

MATCH_DB = 15.0  # quantized recipes stay well above this; unrelated weights sit near 0 dB


def reference_spec(cfg: ModelConfig, reference: str | None, seed: int) -> dict:
    if reference:
        return {"kind": "checkpoint", "path": str(Path(reference).resolve())}
    if ModelConfig.load(EMBEDDED_DEFAULT / CONFIG_FILE).to_dict() == cfg.to_dict():
        return {"kind": "checkpoint", "path": None, "note": "embedded default model"}
    if cfg.name in PRESETS and preset(cfg.name).to_dict() == cfg.to_dict():
        return {"kind": "preset", "name": cfg.name, "seed": seed,
                "note": f"random-weight preset re-created as `export --preset {cfg.name} --seed {seed}` does"}
    raise UserError(f"the bundle's model '{cfg.name}' is neither the embedded model nor a preset; "
                    "pass --reference CHECKPOINT (the checkpoint it was exported from)")


def load_reference(spec: dict, tokenizer_json: str) -> tuple[Manzano, str]:
    if spec["kind"] == "checkpoint":
        return load_checkpoint(spec["path"])
    torch.manual_seed(spec["seed"])  # same order of RNG draws as cli._load_for_export
    return Manzano(preset(spec["name"])).eval(), tokenizer_json


def spec_key(spec: dict) -> str:
    return f"{spec['kind']}:{spec.get('path') or spec.get('name')}:{spec.get('seed', '')}"
