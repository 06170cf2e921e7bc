"""`manzano-edge export`: export graphs to Core ML / ONNX / ExecuTorch as one verified bundle."""

from __future__ import annotations

from manzano_edge.cli.common import add_checkpoint, add_command
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "export", "export graphs to Core ML / ONNX / ExecuTorch as one verified bundle", [
        "export -o out/bundle --recipe w8a8 --format onnx,executorch",
        "export --checkpoint runs/qat-w8a8/checkpoint -o out/qat-w8a8 --format onnx,executorch --recipe w8a8 "
        "--keep-float graph:embed_tokens",
    ])
    add_checkpoint(p, positional=True)
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--format", default="coreml,onnx,executorch",
                   help="comma-separated, from: coreml,onnx,executorch,coreai (coreai needs manzano-edge[coreai])")
    p.add_argument("--recipe", default="fp32", help="fp32|fp16|w8|w8a8|w4|palette4")
    p.add_argument("--graphs", help="comma-separated graphs, or 'all' (default: every graph but the optional "
                                    "decoder_cfg, the batch-of-2 decoder that --token-guidance needs)")
    p.add_argument("--coreml-precision", default="fp16", help="Core ML compute precision for float recipes")
    p.add_argument("--coreml-target", default="iOS18",
                   help="Core ML minimum deployment target: iOS18 | macOS15 | iOS26 | macOS26")
    p.add_argument("--preset", help="export a randomly initialised preset instead of a checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of --preset's random weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the numeric parity check (structure only); for random-weight paper-sized presets")
    p.add_argument("--bundled-io", action="store_true",
                   help="also write ExecuTorch bundled programs (.bpte: inputs + expected outputs) for on-device runners")
    p.add_argument("--keep-float", help="quantized recipes: keep layers/graphs float, e.g. lm_head,graph:vae_decoder")
    p.add_argument("--calibration-samples", type=int, default=8, help="generated calibration samples (static w8a8)")
    p.add_argument("--calibration", help="safetensors file of <graph>.<sample>.<input> calibration tensors")
    p.add_argument("--onnx-w8a8", help="ONNX w8a8 activations: dynamic (default) | static (QDQ, calibrated)")
    p.add_argument("--xnnpack-w8a8", help="ExecuTorch w8a8 activations: dynamic (default) | static (calibrated)")
    p.add_argument("--executorch-kv-cache", default="llm-ops",
                   help="ExecuTorch decoder cache: llm-ops (default; llama::update_cache + custom_sdpa, the device "
                        "runner must link ExecuTorch's custom_ops) | slice (core kernels only, slower)")
    p.add_argument("--no-executorch-coreml", action="store_true",
                   help="write only the XNNPACK .pte, not the Core ML-delegate one (lowering the paper-sized DiT "
                        "through CoreMLBackend after the other graphs ran out of 24 GB of RAM)")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.export import FORMATS
    from manzano_edge.export.bundle import ExportOptions, export_bundle, print_summary
    from manzano_edge.quant.recipes import RECIPES, parse_list

    opts = ExportOptions(formats=parse_list(args.format, FORMATS, "format"), recipe=args.recipe,
                         graphs=args.graphs.split(",") if args.graphs else None,
                         coreml_precision=args.coreml_precision, coreml_target=args.coreml_target,
                         overwrite=args.overwrite,
                         show_progress=not args.quiet, parity=not args.no_parity, keep_float=args.keep_float,
                         calibration_samples=args.calibration_samples, calibration_file=args.calibration,
                         w8a8_mode=_w8a8_modes(args), bundled_io=args.bundled_io,
                         executorch_kv_cache=args.executorch_kv_cache,
                         executorch_coreml=not args.no_executorch_coreml)
    if args.recipe not in RECIPES:
        raise UserError(f"unknown recipe '{args.recipe}'; choose from {', '.join(RECIPES)}")
    model, tokenizer_json = _load_for_export(args)
    manifest = export_bundle(model, tokenizer_json, args.output, opts)
    print_summary(manifest)
    print(f"wrote {args.output}")


def _w8a8_modes(args) -> dict[str, str]:
    from manzano_edge.export import FORMATS  # noqa: F401  (registers the formats' w8a8 modes)
    from manzano_edge.quant.recipes import check_mode, default_w8a8_modes

    modes = default_w8a8_modes()
    if args.onnx_w8a8:
        modes["onnx"] = check_mode("onnx", args.onnx_w8a8)
    if args.xnnpack_w8a8:
        modes["executorch"] = check_mode("executorch", args.xnnpack_w8a8)
    return modes


def _load_for_export(args):
    """A checkpoint, the embedded default, or (--preset) a randomly initialised preset for
    export/latency work on shapes that have no trained weights."""
    import torch

    from manzano_edge.config import preset
    from manzano_edge.models.manzano import EMBEDDED_DEFAULT, TOKENIZER_FILE, Manzano, load_checkpoint

    if args.preset:
        if args.checkpoint:
            raise UserError("pass either --checkpoint or --preset (random weights), not both")
        torch.manual_seed(args.seed)
        return Manzano(preset(args.preset)).eval(), (EMBEDDED_DEFAULT / TOKENIZER_FILE).read_text()
    return load_checkpoint(args.checkpoint)
