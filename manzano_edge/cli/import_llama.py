"""`manzano-edge import-llama`: use a local Hugging Face Llama checkpoint as the decoder backbone."""

from __future__ import annotations

from pathlib import Path

from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("import-llama", help="use a local Hugging Face Llama checkpoint as the decoder backbone")
    p.add_argument("directory")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--preset", default="tiny", help="preset for the vision and diffusion parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
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
