"""`manzano-edge import`: build a checkpoint around local Hugging Face parts: a decoder (Llama,
SmolLM, Mistral, Qwen2/Qwen2.5, Qwen3) and/or a SigLIP or CLIP vision tower. `import-llama DIR` is
the deprecated spelling of `import --decoder DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from manzano_edge.cli.common import add_command, deprecated
from manzano_edge.fsutil import check_output_dir

HELP = "build a checkpoint from a local Hugging Face decoder and/or SigLIP/CLIP vision tower"


def add_parser(sub) -> None:
    p = add_command(sub, "import", HELP, [
        "import --decoder ~/models/Qwen2.5-0.5B -o runs/qwen-base --preset small",
        "import --decoder ~/models/SmolLM2-135M --vision ~/models/siglip-base-patch16-224 --image-size 192 "
        "-o runs/smol-siglip",
    ])
    p.add_argument("--decoder", metavar="DIR",
                   help="local Hugging Face decoder directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--vision", metavar="DIR", help="local SigLIP or CLIP directory (config.json, *.safetensors)")
    p.add_argument("--image-size", type=int,
                   help="the ViT's input size in pixels (default: the tower's): a multiple of 3 patches and of what the "
                        "VAE and DiT need; the import names sizes that work")
    _add_common(p)
    old = add_command(sub, "import-llama", "deprecated spelling of `import --decoder DIR`",
                      ["import-llama ~/models/TinyLlama-1.1B -o runs/llama-base"])
    old.add_argument("decoder", metavar="DIR", help="local Hugging Face decoder directory")
    _add_common(old)
    old.set_defaults(deprecated_command=True, vision=None, image_size=None)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", default="tiny", help="preset of the parts not imported (adapters, DiT, VAE, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parts")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.models.manzano import save_checkpoint
    from manzano_edge.train.compose import import_model

    if getattr(args, "deprecated_command", False):
        deprecated(args, "import-llama is deprecated; use `import --decoder DIR`")
    out = Path(args.output)
    check_output_dir(out, args.overwrite)  # before the import's work, not after it
    imported = import_model(args.decoder, args.vision, base_preset=args.preset, image_size=args.image_size,
                            seed=args.seed)
    save_checkpoint(imported.model, out, imported.tokenizer_json)
    cfg = imported.model.cfg
    parts = []
    if args.decoder:
        parts.append(f"decoder from {args.decoder} ({cfg.decoder.num_hidden_layers} layers, hidden "
                     f"{cfg.decoder.hidden_size}, vocab {cfg.vocab_size})")
    if args.vision:
        parts.append(f"ViT from {args.vision} ({cfg.vision.layers} layers, width {cfg.vision.width}, "
                     f"{cfg.vision.image_size} px, {cfg.vision.num_image_tokens} image tokens)")
    print(f"wrote {out}: {'; '.join(parts)}")
    if imported.left_out:
        groups = sorted({name.split(".")[0] for name in imported.left_out})
        print(f"not used: {len(imported.left_out)} tensors of the tower's pooled-output head ({', '.join(groups)}), "
              "which patch features never reach")
    print(f"train the new parts with: manzano-edge train -o RUN --init {out}")
