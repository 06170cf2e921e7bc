"""`manzano-edge probe-codes`: how much shape the image codes and understanding tokens carry (single-object scenes)."""

from __future__ import annotations

import json
from pathlib import Path

from manzano_edge.cli.common import add_checkpoint, add_command, write_atomic
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "probe-codes", "how much shape the image codes and understanding tokens carry (single-object scenes)", [
        "probe-codes --json probe.json",
        "probe-codes --checkpoint runs/mine/checkpoint --controlled 30 --train 1500 --test 300 --probe-steps 500",
    ])
    add_checkpoint(p, positional=True)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--controlled", type=int, default=200, help="scenes rendered once per shape")
    p.add_argument("--train", type=int, default=4000, help="scenes the MLP probe trains on")
    p.add_argument("--test", type=int, default=800, help="held-out scenes it is scored on")
    p.add_argument("--probe-steps", type=int, default=3000, help="Adam steps (batch 256) each MLP probe trains for")
    p.add_argument("--seed", type=int, default=7, help="seed of the scenes and the probe")
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.eval.code_probe import code_probe
    from manzano_edge.models.manzano import load_checkpoint

    if args.controlled < 1 or args.train < 10 or args.test < 10:
        raise UserError("probe-codes needs --controlled >= 1, --train >= 10 and --test >= 10 scenes")
    if args.probe_steps < 1:
        raise UserError(f"--probe-steps must be at least 1, got {args.probe_steps}")
    model, _ = load_checkpoint(args.checkpoint)
    report = code_probe(model, args.controlled, args.train, args.test, args.seed, args.probe_steps)
    c, p, u = report["controlled"], report["probe"], report["understanding_probe"]
    print(f"FSQ levels {report['fsq_levels']}, {c['tokens']} tokens per image")
    print(f"controlled: two shapes share all ids in {c['scenes_with_two_shapes_on_identical_ids']}/{c['scenes']} "
          f"scenes; {c['mean_differing_tokens_per_shape_pair']:.2f} tokens differ per shape pair")
    print(f"shape probe on the codes: held-out accuracy {p['test_accuracy']:.3f} (train {p['train_accuracy']:.3f}, "
          f"chance {p['chance']:.3f})")
    print(f"shape probe on the understanding tokens (trained on loose scenes): held-out loose scenes "
          f"{u['loose_test_accuracy']:.3f}, canonical scenes {u['canonical_test_accuracy']:.3f}, "
          f"a user's drawings {u['drawings_accuracy']:.3f} (train {u['train_accuracy']:.3f})")
    if args.json:
        write_atomic(Path(args.json), lambda f: Path(f).write_text(json.dumps(report, indent=2) + "\n"))
        print(f"wrote {args.json}")
