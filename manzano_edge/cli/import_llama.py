"""`manzano-edge import-llama`: use a local Hugging Face Llama checkpoint as the decoder backbone."""

from __future__ import annotations

from pathlib import Path

from manzano_edge.cli.common import add_command
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "import-llama", "use a local Hugging Face Llama checkpoint as the decoder backbone", [
        "import-llama ~/models/TinyLlama-1.1B -o runs/llama-base --preset small",
        "import-llama ~/models/TinyLlama-1.1B -o runs/llama-base --overwrite",
    ])
    p.add_argument("directory", help="local Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", default="tiny", help="preset for the vision and diffusion parts")
    p.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised vision and diffusion parts")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.models.hf_llama import import_llama
    from manzano_edge.models.manzano import save_checkpoint

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite or choose another")
    model, tokenizer_json = import_llama(args.directory, base_preset=args.preset, seed=args.seed)
    save_checkpoint(model, out, tokenizer_json)
    print(f"wrote {out} (decoder from {args.directory}, vocab {model.cfg.vocab_size}); "
          f"train the vision/diffusion parts with: manzano-edge train -o RUN --preset {args.preset}")
