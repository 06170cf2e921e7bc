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
    export_hf,
    generate,
    import_model,
    probe_codes,
    profile,
    qat,
    sensitivity,
    train,
    validate,
)
from manzano_edge.cli.common import PROG, HelpFormatter, finish_args, version_text
from manzano_edge.errors import UserError

# One module per command, each with `add_parser(sub)` next to its `run(args)`; this order is `--help`'s.
COMMANDS = (train, qat, sensitivity, profile, probe_codes, eval, caption, generate, export, export_hf, validate,
            demo, import_model, bench)


class VersionAction(argparse.Action):
    """`--version`, computed only when asked (it hashes the embedded model's weights)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


EXAMPLES = """examples:
  manzano-edge demo -o out/demo
  manzano-edge export -o out/bundle --recipe w8a8 --format onnx,executorch
  manzano-edge caption --bundle out/bundle --image scene.png --prompt "where is the red circle?"
  manzano-edge COMMAND --help"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction,
                        help="print the version and the embedded model's name and weights checksum, then exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet.configure(verbose=bool(getattr(args, "verbose", False)))
    try:
        finish_args(args)
        args.func(args)
    except UserError as exc:
        print(f"manzano-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("manzano-edge: interrupted", file=sys.stderr)
        return 130
    return 0
