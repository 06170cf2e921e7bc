"""`manzano-edge sensitivity`: rank layers by the accuracy a recipe costs; propose --keep-float."""

from __future__ import annotations

from manzano_edge.cli.common import add_checkpoint, add_command


def add_parser(sub) -> None:
    p = add_command(sub, "sensitivity", "rank layers by the accuracy a recipe costs; propose --keep-float", [
        "sensitivity --recipe w4 -o out/sens-w4",
        "sensitivity --checkpoint runs/mine/checkpoint --recipe w8a8 -o out/sens-w8a8 --granularity block --graphs decoder",
    ])
    add_checkpoint(p, positional=True)
    p.add_argument("--recipe", required=True, help="w8a8 | w4")
    p.add_argument("-o", "--output", required=True, help="report directory: report.json, report.md, sensitivity.png")
    p.add_argument("--graphs", help="comma-separated subset of tokenizer,decoder,code_features,dit")
    p.add_argument("--granularity", default="layer", help="layer (each Linear) | block (layers.N / blocks.N)")
    p.add_argument("--samples", type=int, default=4, help="validation samples per graph")
    p.add_argument("--target-psnr", type=float, help="dB per graph output (default 35 for w8a8, 20 for w4)")
    p.add_argument("--target-top1", type=float, default=0.99,
                   help="decoder top-1 agreement where float decides by >= 0.3 nats (validate's gate)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.data.text import TextCodec
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.quant.overrides import LAYERED_GRAPHS
    from manzano_edge.quant.recipes import PSNR_BAR_DB, RECIPE_CONFIGS
    from manzano_edge.validate.sensitivity import Target, sensitivity, write_report

    model, tok = load_checkpoint(args.checkpoint)
    graphs = [g.strip() for g in (args.graphs or ",".join(LAYERED_GRAPHS)).split(",") if g.strip()]
    default_db = RECIPE_CONFIGS[args.recipe].psnr_bar_db if args.recipe in RECIPE_CONFIGS else PSNR_BAR_DB
    target = Target(psnr_db=args.target_psnr if args.target_psnr is not None else default_db, top1=args.target_top1)
    report = sensitivity(model, TextCodec(tok, model.cfg.text), args.recipe, graphs, samples=args.samples,
                         granularity=args.granularity, target=target, source=args.checkpoint or "embedded default",
                         show=not args.quiet)
    write_report(report, args.output, overwrite=args.overwrite)
    for g in report["graphs"]:
        p = g["proposal"]
        print(f"{g['graph']:>14}: all quantized {g['all_quantized']['psnr_db']:.1f} dB -> keep "
              f"{len(p['keep_float'])} float -> {p['after']['psnr_db']:.1f} dB "
              f"({'meets' if p['meets_target'] else 'MISSES'} target)")
    print(f"--keep-float {report['keep_float'] or '(none needed)'}; wrote {args.output}/report.json, report.md")
