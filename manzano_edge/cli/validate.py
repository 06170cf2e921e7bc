"""`manzano-edge validate`: accuracy of a bundle vs its float reference, per graph and end to end."""

from __future__ import annotations

from manzano_edge.cli.common import add_command, add_deprecated_alias
from manzano_edge.errors import UserError


class ThresholdFailed(UserError):
    """A bundle validated but missed a threshold: exit status 1, not 2."""

    exit_code = 1


def add_parser(sub) -> None:
    p = add_command(sub, "validate", "accuracy of a bundle vs its float reference, per graph and end to end", [
        "validate out/w8a8 -o out/w8a8-report          # exit 1 if a threshold fails",
        "validate out/qat-w8a8 -o out/qat-w8a8-report --exported-from runs/qat-w8a8/checkpoint --generation 100",
    ])
    p.add_argument("bundle", help="bundle directory written by `manzano-edge export`")
    p.add_argument("--checkpoint", "--reference", dest="checkpoint", metavar="PATH",
                   help="float checkpoint the bundle came from, the reference (default: the embedded tiny model)")
    p.add_argument("--exported-from", help="checkpoint the bundle was exported from, if not --checkpoint (a QAT run's "
                                           "checkpoint): Core ML w8a8 emulation rebuilds its activation scales from it")
    p.add_argument("-o", "--output", required=True, help="report directory: report.json, report.md, plots")
    p.add_argument("--thresholds", help="e.g. psnr_db=35,top1=0.99,top1_tie_nats=0.3,e2e_drop_w8a8=1,e2e_drop_w4=3,psnr_db_w4=20 "
                   "(top1 is judged where float's top token leads by >= top1_tie_nats; 0 judges every position)")
    p.add_argument("--format", help="comma-separated subset of the bundle's formats")
    p.add_argument("--samples", type=int, default=4, help="validation samples per graph")
    p.add_argument("--greedy-tokens", type=int, default=16, help="greedy decode steps after each prefill in the decoder samples")
    p.add_argument("--vqa", type=int, default=24, help="end-to-end VQA questions")
    p.add_argument("--captions", type=int, default=12, help="end-to-end captions")
    p.add_argument("--generation", type=int, default=8, help="end-to-end text-to-image prompts scored by ShapesEval")
    p.add_argument("--flow-steps", type=int, default=10, help="flow-matching steps in end-to-end generation")
    add_deprecated_alias(p, "--steps", "--flow-steps", "flow_steps", type=int)
    p.add_argument("--token-guidance", type=float, default=1.0,
                   help="image-token CFG in end-to-end generation (1 = off; else the bundle needs decoder_cfg)")
    p.add_argument("--guidance", type=float, default=1.0, help="DiT CFG in end-to-end generation (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the end-to-end scenes, prompts and sampling")
    p.add_argument("--no-end-to-end", action="store_true", help="per-graph metrics only")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.export import FORMATS
    from manzano_edge.quant.recipes import parse_list
    from manzano_edge.validate.core import Settings, Thresholds, validate
    from manzano_edge.validate.report import write_report

    th = Thresholds.parse(args.thresholds)
    st = Settings(samples=args.samples, greedy_tokens=args.greedy_tokens, vqa=args.vqa, captions=args.captions,
                  generation=args.generation, flow_steps=args.flow_steps, token_guidance=args.token_guidance,
                  flow_guidance=args.guidance, seed=args.seed,
                  formats=parse_list(args.format, FORMATS, "format") if args.format else None,
                  end_to_end=not args.no_end_to_end)
    if min(st.samples, st.greedy_tokens, st.vqa + st.captions, st.generation) < 1 and st.end_to_end:
        raise UserError("--samples, --greedy-tokens, --generation and --vqa + --captions must be at least 1")
    result = validate(args.bundle, args.checkpoint, th, st, show=not args.quiet, exported_from=args.exported_from)
    write_report(result.report, args.output, overwrite=args.overwrite)
    print(f"validation {'PASSED' if result.passed else 'FAILED'}; wrote {args.output}/report.json, report.md")
    if not result.passed:
        raise ThresholdFailed("a validation threshold failed; see report.md")
