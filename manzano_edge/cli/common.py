"""Argument groups and helpers that more than one command shares."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from manzano_edge.config import DEFAULT_FLOW_STEPS
from manzano_edge.errors import UserError

PROG = "manzano-edge"

# `--bundle` without `--backend` runs on the first of these that the bundle holds files for and that
# runs on this machine (backends registered later, not named here, come after them).
BUNDLE_BACKEND_PREFERENCE = ("executorch", "ort", "coreai", "coreml")
# The registered backends (runtime/backends), named here so that building the parser imports no runtime.
BACKEND_NAMES = ("torch", "ort", "executorch", "coreml", "coreai")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's and an epilog's line breaks, and appends `(default: X)` to every option
    with a real default (not None or False, and not where its help already says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def add_command(sub, name: str, help: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand's parser: defaults shown in `--help`, an epilog of example command lines, and the
    `--quiet` / `--verbose` every command takes."""
    epilog = "examples:\n" + "\n".join(f"  {PROG} {line}" for line in examples)
    p = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)
    out = p.add_argument_group("output")
    out.add_argument("--quiet", action="store_true", help="print only results and errors: no progress bars or notes")
    out.add_argument("--verbose", action="store_true",
                     help="also show the converters' and runtimes' own output (progress bars, warnings, logs)")
    return p


# -- deprecated spellings -------------------------------------------------------------------------
class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores like the new one (same dest) and leaves a note for
    `finish_args` to print."""

    def __init__(self, option_strings, dest, preferred: str, **kwargs) -> None:
        self.preferred = preferred
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        deprecated(namespace, f"{option_string} is deprecated; use {self.preferred}")


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, new: str, dest: str, type=None) -> None:
    """`old` keeps working as `new` (hidden from `--help`, a note on stderr when used)."""
    p.add_argument(old, dest=dest, type=type, action=DeprecatedAlias, preferred=new, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def deprecated(namespace: argparse.Namespace, note: str) -> None:
    notes = getattr(namespace, "deprecation_notes", None) or []
    if note not in notes:
        namespace.deprecation_notes = [*notes, note]


def add_checkpoint(p: argparse.ArgumentParser, help: str = "checkpoint directory (default: the embedded tiny model)",
                   positional: bool = False) -> None:
    """`--checkpoint PATH`; `positional=True` also accepts the deprecated `COMMAND CHECKPOINT` form."""
    p.add_argument("--checkpoint", metavar="PATH", help=help)
    if positional:
        p.add_argument("checkpoint_positional", nargs="?", metavar="CHECKPOINT", help=argparse.SUPPRESS)


def finish_args(args: argparse.Namespace) -> None:
    """After parsing: fold a positional checkpoint into `--checkpoint`, print the deprecation notes."""
    if hasattr(args, "checkpoint_positional"):
        positional = args.checkpoint_positional
        del args.checkpoint_positional
        if positional is not None:
            if args.checkpoint is not None and os.path.abspath(args.checkpoint) != os.path.abspath(positional):
                raise UserError(f"two checkpoints given: {positional} (positional) and --checkpoint {args.checkpoint}; "
                                "pass only --checkpoint")
            args.checkpoint = args.checkpoint or positional
            deprecated(args, "passing the checkpoint as a positional argument is deprecated; use --checkpoint")
    for note in getattr(args, "deprecation_notes", None) or []:
        print(f"{PROG}: {note}", file=sys.stderr)


# -- shared options -------------------------------------------------------------------------------
def add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the top tokens up to this probability mass (1 = off)")
    p.add_argument("--token-guidance", type=float, default=1.0, help="CFG scale for image tokens (1 = off)")
    p.add_argument("--flow-steps", type=int, default=DEFAULT_FLOW_STEPS, help="flow-matching steps")
    add_deprecated_alias(p, "--steps", "--flow-steps", "flow_steps", type=int)
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale for the DiT (1 = off)")


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", metavar="DIR", help="run an exported bundle directory (`manzano-edge export`) instead "
                                                   "of eager PyTorch on --checkpoint")
    p.add_argument("--backend", choices=BACKEND_NAMES,
                   help="torch: eager PyTorch on --checkpoint (without --bundle, the default); the others run "
                        "the bundle's graphs (with --bundle, the default is the first of "
                        f"{', '.join(BUNDLE_BACKEND_PREFERENCE)} that the bundle holds and that runs here)")


def pipeline(checkpoint: str | None, bundle: str | None = None, backend: str | None = None, quiet: bool = False):
    """Eager PyTorch on a checkpoint (no --bundle), or a bundle's graphs on ort/executorch/coreml
    (`backend` None: the bundle's preferred backend that runs here, named on stderr unless `quiet`)."""
    from manzano_edge.data.text import TextCodec
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.runtime.graphs import TorchGraphs
    from manzano_edge.runtime.pipeline import Pipeline

    if bundle is not None:
        from manzano_edge.runtime.bundle import Bundle, BundleGraphs

        if backend == "torch":
            raise UserError("--bundle runs exported graphs; drop --backend torch or --bundle")
        if checkpoint is not None:
            raise UserError("--bundle runs the bundle's own graphs and --checkpoint an eager model; pass one of them")
        b = Bundle(bundle)
        if backend is None:
            backend = bundle_backend(b)
            if not quiet:
                print(f"{PROG}: running bundle {bundle} on {backend} (pass --backend to choose)", file=sys.stderr)
        return Pipeline(BundleGraphs(b, backend), b.cfg, TextCodec(b.tokenizer_json, b.cfg.text))
    if backend not in (None, "torch"):
        raise UserError(f"--backend {backend} runs an exported bundle; pass --bundle DIR (see `manzano-edge export`)")
    model, tokenizer_json = load_checkpoint(checkpoint)
    return Pipeline(TorchGraphs(model), model.cfg, TextCodec(tokenizer_json, model.cfg.text))


def bundle_backend(bundle) -> str:
    """The first backend of BUNDLE_BACKEND_PREFERENCE (then any other bundle backend) whose format
    the bundle holds and that runs here; a UserError when none does."""
    from manzano_edge.runtime.backends import BACKENDS, backend_for_format

    held = bundle.formats()
    if not held:
        raise UserError(f"bundle {bundle.path} holds no graph files; re-export it with `manzano-edge export`")
    order = [*BUNDLE_BACKEND_PREFERENCE, *(n for n in BACKENDS if n not in BUNDLE_BACKEND_PREFERENCE)]
    runners = [BACKENDS[n] for n in order if n in BACKENDS and BACKENDS[n].format is not None]
    why = []
    for runner in runners:
        if runner.format in held:
            ok, reason = runner.runnable_here()
            if ok:
                return runner.name
            why.append(f"{runner.name}: {reason}")
    unknown = [f for f in held if backend_for_format(f) is None]
    if unknown:
        why.append(f"no backend runs {', '.join(unknown)}")
    here = [r.format for r in runners if r.format not in held and r.runnable_here()[0]]
    fix = f"; re-export it with --format {','.join(here)}" if here else ""
    raise UserError(f"none of bundle {bundle.path}'s formats ({', '.join(held)}) runs here ({'; '.join(why)}){fix}")


def sampling(args):
    from manzano_edge.runtime.pipeline import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          token_guidance=args.token_guidance, flow_steps=args.flow_steps, flow_guidance=args.guidance)


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` through a temp file beside `path`, renamed onto it at the end (fsutil.atomic_file)."""
    from manzano_edge.fsutil import atomic_file

    with atomic_file(Path(path)) as tmp:
        write(str(tmp))


def version_text() -> str:
    """`manzano-edge --version`: the package's version and the embedded model's identity."""
    from importlib.metadata import PackageNotFoundError, version

    from manzano_edge.models.manzano import embedded_model_identity

    try:
        ours = version("manzano-edge")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    model = embedded_model_identity()
    return f"{PROG} {ours}\nembedded model: {model['name']} (sha256 {model['sha256'][:12]})"
