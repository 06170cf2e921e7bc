"""`manzano-edge` command line. Every user error prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import sys

from manzano_edge import quiet
from manzano_edge.cli import (
    bench,
    caption,
    demo,
    eval,
    export,
    generate,
    import_llama,
    probe_codes,
    profile,
    qat,
    sensitivity,
    train,
    validate,
)
from manzano_edge.errors import UserError

# One module per command, each with `add_parser(sub)` next to its `run(args)`; this order is `--help`'s.
COMMANDS = (train, qat, sensitivity, profile, probe_codes, eval, caption, generate, export, validate, demo,
            import_llama, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manzano-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet.configure(verbose=bool(getattr(args, "verbose", False)))
    try:
        args.func(args)
    except UserError as exc:
        print(f"manzano-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("manzano-edge: interrupted", file=sys.stderr)
        return 130
    return 0
