"""`manzano-edge bench`: latency, throughput, memory and roofline of bundles vs eager PyTorch."""

from __future__ import annotations

from pathlib import Path

from manzano_edge.cli.common import BACKEND_NAMES, add_command
from manzano_edge.config import DEFAULT_FLOW_STEPS


def add_parser(sub) -> None:
    p = add_command(sub, "bench", "latency, throughput, memory and roofline of bundles vs eager PyTorch", [
        "bench out/fp32 out/w8a8 -o out/bench --backends torch,ort,executorch --runs 5 --threads 2",
        "bench bundles/small-fp32 -o out/bench-small --checkpoint runs/small/checkpoint",
    ])
    p.add_argument("bundles", nargs="+", help="bundle directories (one per recipe) written by `manzano-edge export`")
    p.add_argument("-o", "--output", required=True, help="report directory: bench.json, bench.md, plots")
    p.add_argument("--backends", default="torch,ort,executorch,coreml,coreai",
                   help="comma-separated: torch (eager fp32 baseline), ort, executorch, coreml (macOS), coreai")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median and p90)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before each measurement")
    p.add_argument("--threads", help="N for every backend, or per backend: torch=2,ort=2,executorch=2 "
                                     "(default: all logical CPUs)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens decoded after the caption prefill")
    p.add_argument("--flow-steps", type=int, default=DEFAULT_FLOW_STEPS, help="flow-matching steps in the text-to-image run")
    p.add_argument("--guidance", type=float, default=2.0, help="DiT CFG scale in the text-to-image run (1 = off)")
    p.add_argument("--token-guidance", type=float, default=1.0,
                   help="image-token CFG scale in the text-to-image run (1 = off); other values decode both rows as "
                        "one batch-of-2 step of the bundle's decoder_cfg graph (export --graphs all)")
    p.add_argument("--checkpoint", "--reference", dest="checkpoint", metavar="PATH",
                   help="checkpoint the bundles were exported from (eager fp32 baseline); default: the embedded model, "
                        "or the preset re-created with --seed")
    p.add_argument("--seed", type=int, default=0, help="the --seed `export --preset` used")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.bench.report import MD_FILE
    from manzano_edge.bench.run import BenchOptions, parse_threads, run_bench
    from manzano_edge.quant.recipes import parse_list

    default, per = parse_threads(args.threads)
    opts = BenchOptions(backends=parse_list(args.backends, BACKEND_NAMES, "backend"),
                        runs=args.runs, warmup=args.warmup, threads=per, decode_tokens=args.decode_tokens,
                        flow_steps=args.flow_steps, flow_guidance=args.guidance, token_guidance=args.token_guidance,
                        reference=args.checkpoint, seed=args.seed,
                        overwrite=args.overwrite, log=not args.quiet)
    if default:
        opts.default_threads = default
    report = run_bench(args.bundles, args.output, opts)
    if not args.quiet:
        print((Path(args.output) / MD_FILE).read_text())
    bad = [r["label"] for r in report["results"] if r["status"] == "error"]
    print(f"wrote {args.output}" + (f" ({len(bad)} backend(s) failed: {', '.join(bad)})" if bad else ""))
