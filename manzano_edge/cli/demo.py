"""`manzano-edge demo`: the whole job on the embedded model, end to end."""

from __future__ import annotations

from pathlib import Path

from manzano_edge.cli.common import add_checkpoint, add_command


def add_parser(sub) -> None:
    p = add_command(sub, "demo", "the whole job on the embedded model: caption, generate, evaluate, export, validate int8, "
                       "benchmark", [
        "demo -o out/demo --overwrite",
        "demo -o out/demo-mine --checkpoint runs/mine/checkpoint --no-export",
    ])
    p.add_argument("-o", "--output", default="out/demo", help="directory for the demo's images, reports and bundles")
    add_checkpoint(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--eval-size", type=int, default=40, help="held-out scenes in the quick evaluation")
    p.add_argument("--no-export", action="store_true", help="skip the export to Core ML / ONNX / ExecuTorch")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.data.text import TextCodec
    from manzano_edge.demo import print_summary, run_demo
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.runtime.graphs import TorchGraphs
    from manzano_edge.runtime.pipeline import Pipeline

    out = Path(args.output)
    model, tok = load_checkpoint(args.checkpoint)
    pipe = Pipeline(TorchGraphs(model), model.cfg, TextCodec(tok, model.cfg.text))
    summary = run_demo(pipe, out, overwrite=args.overwrite, eval_size=args.eval_size,
                       export=None if args.no_export else (model, tok), checkpoint=args.checkpoint,
                       show=not args.quiet)
    print_summary(summary, out)
