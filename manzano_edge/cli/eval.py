"""`manzano-edge eval`: caption/VQA accuracy and ShapesEval on held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

from manzano_edge.cli.common import add_checkpoint, add_command, add_sampling, pipeline, sampling, write_atomic


def add_parser(sub) -> None:
    p = add_command(sub, "eval", "caption/VQA accuracy and ShapesEval on held-out scenes", [
        "eval --json report.json",
        "eval --checkpoint runs/mine/checkpoint --vqa 300 --captions 150 --generation 100 --grid samples.png",
    ])
    add_checkpoint(p, positional=True)
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--grid", help="also write a PNG grid of held-out prompts and generated images")
    p.add_argument("--vqa", type=int, default=400, help="held-out VQA questions")
    p.add_argument("--captions", type=int, default=200, help="held-out scenes captioned")
    p.add_argument("--generation", type=int, default=150, help="held-out prompts generated and scored by ShapesEval")
    p.add_argument("--reconstruction", type=int, default=150,
                   help="held-out scenes encoded to image tokens and rendered back, scored by ShapesEval and PSNR")
    p.add_argument("--drawings", type=int, default=100,
                   help="captions of shapes drawn with PIL on canvases of any size (a user's own pictures)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out scenes and the sampling")
    add_sampling(p, temperature=0.0)
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.eval.evaluate import EvalConfig, evaluate

    pipe = pipeline(args.checkpoint)
    report = evaluate(pipe, EvalConfig(vqa=args.vqa, captions=args.captions, generation=args.generation,
                                       reconstruction=args.reconstruction, drawings=args.drawings, seed=args.seed,
                                       sampling=sampling(args)), show=not args.quiet)
    u, g, r, d = report["understanding"], report["generation"], report["reconstruction"], report["drawings"]
    rows = [("VQA accuracy", u["vqa_accuracy"], args.vqa), ("caption accuracy", u["caption_accuracy"], args.captions),
            ("understanding (VQA+caption)", u["understanding_accuracy"], args.vqa + args.captions),
            ("ShapesEval (text-to-image)", g["shapes_eval"], args.generation),
            ("ShapesEval (reconstruction)", r["shapes_eval"], args.reconstruction),
            ("reconstruction PSNR dB", r["pixel_psnr_db"], args.reconstruction),
            ("ShapesEval (VAE round trip)", (r["vae_round_trip"] or {}).get("shapes_eval"),
             args.reconstruction if r["vae_round_trip"] else 0),
            ("caption accuracy (PIL drawings)", d["caption_accuracy"], args.drawings)]
    for name, value, samples in rows:
        print(f"{name:<30} {value:8.3f}" if samples else f"{name:<30} {'not run':>8}")
    if args.json:
        write_atomic(Path(args.json), lambda p: Path(p).write_text(json.dumps(report, indent=2) + "\n"))
        print(f"wrote {args.json}")
    if args.grid:
        from manzano_edge.eval.evaluate import sample_grid

        write_atomic(Path(args.grid), lambda p: sample_grid(pipe, p, seed=args.seed, sampling=sampling(args)))
        print(f"wrote {args.grid}")
