"""`manzano-edge train`: train (or resume) every stage of a preset."""

from __future__ import annotations

from manzano_edge.cli.common import add_command
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "train", "train (or resume) every stage of a preset", [
        "train --preset tiny -o runs/tiny",
        "train --preset tiny -o runs/mine --data-dir photos/ --captions photos/captions.jsonl",
        "train -o runs/qwen --init runs/qwen-siglip --freeze vit,decoder --stages tokenizer,vae,dit",
    ])
    p.add_argument("-o", "--output", default="runs/tiny", help="run directory (resumes if it exists)")
    p.add_argument("--preset", default="tiny", help="model preset to train: tiny | small | manzano-300m")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start a fresh run from this checkpoint (e.g. one written by `import`) instead of from scratch")
    p.add_argument("--freeze", help="comma-separated parts kept fixed in every stage: vit (the vision tower; its "
                                    "adapters still train), decoder")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the training data")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--precision", default="bf16-mixed",
                   help="bf16-mixed (CPU bf16 autocast, fp32 weights; default) | fp32 (for CPUs without native bf16)")
    p.add_argument("--stages", help="comma-separated subset of tokenizer,decoder,binding,vae,dit (in that order)")
    p.add_argument("--data-dir", help="folder of your images (with --captions)")
    p.add_argument("--captions", help="JSONL: {\"image\": \"a.png\", \"caption\": \"...\"} per line")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.train.loop import STAGES, TrainConfig, train

    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    frozen = tuple(args.freeze.split(",")) if args.freeze else ()
    tcfg = TrainConfig(preset=args.preset, seed=args.seed, precision=args.precision, frozen=frozen)
    if args.steps_scale != 1.0:
        tcfg = tcfg.scaled(args.steps_scale)
    final = train(args.output, tcfg, data_dir=args.data_dir, captions=args.captions, stages=stages, show=not args.quiet,
                  init=args.init)
    print(f"checkpoint: {final}")
