"""`manzano-edge profile`: ExecuTorch op breakdown from ETDump, here or from a device's ETDump files."""

from __future__ import annotations

from manzano_edge.cli.common import add_command
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "profile", "ExecuTorch op breakdown from ETDump, here or from a device's ETDump files", [
        "profile out/bundle -o out/profile --graphs decoder,dit --runs 20 --threads 2",
        'profile out/bundle -o out/profile-pixel8 --etdump decoder=decoder.etdp --device "Pixel 8"',
    ])
    p.add_argument("bundle", help="bundle directory with ExecuTorch graphs (`manzano-edge export --format executorch`)")
    p.add_argument("-o", "--output", required=True, help="report directory: profile.json, profile.md")
    p.add_argument("--graphs", help="comma-separated graphs to run here (default: every ExecuTorch graph)")
    p.add_argument("--runs", type=int, default=20, help="profiled runs per graph")
    p.add_argument("--threads", type=int, help="XNNPACK threads (default: ExecuTorch's)")
    p.add_argument("--position", type=int, default=32, help="decoder: KV-cache length of the profiled decode step")
    p.add_argument("--etdump", action="append", help="import a device run instead: GRAPH=FILE.etdp (repeatable)")
    p.add_argument("--device", help="device name for imported ETDumps (e.g. 'Pixel 8, XNNPACK 4 threads')")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.bench.profile import markdown, profile, write

    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    report = profile(args.bundle, graphs, runs=args.runs, threads=args.threads, position=args.position,
                     etdumps=args.etdump, device=args.device)
    write(report, args.output, overwrite=args.overwrite)
    print(markdown(report, top=6))
    print(f"wrote {args.output}/profile.json, profile.md")
