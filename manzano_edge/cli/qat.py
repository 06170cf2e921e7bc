"""`manzano-edge qat`: quantization-aware fine-tuning (distillation from the float model) for a recipe."""

from __future__ import annotations

import dataclasses

from manzano_edge.cli.common import add_checkpoint, add_command, add_deprecated_alias
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "qat", "quantization-aware fine-tuning (distillation from the float model) for a recipe", [
        "qat --recipe w8a8 -o runs/qat-w8a8",
        "qat --checkpoint runs/mine/checkpoint --recipe w4 -o runs/qat-w4 --graphs decoder,dit --train-steps 100",
    ])
    add_checkpoint(p, help="float checkpoint directory (default: the embedded tiny model)", positional=True)
    p.add_argument("--recipe", required=True, help="w8a8 | w4")
    p.add_argument("-o", "--output", required=True, help="run directory (resumes if it exists); writes OUTPUT/checkpoint")
    p.add_argument("--graphs", default="tokenizer,decoder,dit", help="comma-separated subset of tokenizer,decoder,dit")
    p.add_argument("--train-steps", type=int, help="training steps per graph (default: tokenizer 150, decoder 200, dit 200)")
    add_deprecated_alias(p, "--steps", "--train-steps", "train_steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate for every graph (default: w8a8 2e-6, w4 5e-5)")
    p.add_argument("--keep-float", help="Linear layers to leave unquantized, as for export (e.g. lm_head,layers.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training scenes")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.quant.qat import QATRunConfig, qat

    qcfg = QATRunConfig(recipe=args.recipe, seed=args.seed,
                        graphs=tuple(g.strip() for g in args.graphs.split(",") if g.strip()),
                        keep_float=tuple(k.strip() for k in (args.keep_float or "").split(",") if k.strip()))
    if args.train_steps is not None:
        if args.train_steps < 1:
            raise UserError(f"--train-steps must be at least 1, got {args.train_steps}")
        qcfg = qcfg.scaled(args.train_steps)
    if args.lr is not None:
        if not args.lr > 0:
            raise UserError(f"--lr must be positive, got {args.lr}")
        qcfg.stages = {k: dataclasses.replace(v, lr=args.lr) for k, v in qcfg.stages.items()}
    final = qat(args.checkpoint, args.output, qcfg.validate(), show=not args.quiet)
    print(f"checkpoint: {final}  (export it with: manzano-edge export --checkpoint {final} --recipe {args.recipe} -o BUNDLE)")
