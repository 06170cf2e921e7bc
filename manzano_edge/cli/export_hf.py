"""`manzano-edge export-hf`: write the decoder as a Hugging Face checkpoint (Llama, Qwen2 or Qwen3 layout)."""

from __future__ import annotations

from pathlib import Path

from manzano_edge.cli.common import add_checkpoint, add_command

HELP = "write the decoder as a Hugging Face checkpoint (for transformers, llama.cpp's converter, genai's builder)"


def add_parser(sub) -> None:
    p = add_command(sub, "export-hf", HELP, [
        "export-hf -o out/decoder-hf",
        "export-hf --checkpoint runs/qwen-siglip-run/checkpoint -o out/qwen-hf --overwrite",
    ])
    add_checkpoint(p)
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.export.hf import write_hf_checkpoint
    from manzano_edge.models.hf_decoder import hf_model_type
    from manzano_edge.models.manzano import load_checkpoint

    model, tokenizer_json = load_checkpoint(args.checkpoint)
    out = write_hf_checkpoint(model, tokenizer_json, Path(args.output), overwrite=args.overwrite)
    print(f"wrote {out}: {hf_model_type(model.cfg.decoder)} decoder, {model.cfg.decoder.num_hidden_layers} layers, "
          f"vocab {model.cfg.vocab_size} (text tokens, then image codes <img_0>...)")
