"""`manzano-edge generate`: text-to-image."""

from __future__ import annotations

from pathlib import Path

from manzano_edge.cli.common import add_backend, add_checkpoint, add_command, add_sampling, pipeline, sampling, write_atomic
from manzano_edge.errors import UserError


def add_parser(sub) -> None:
    p = add_command(sub, "generate", "text-to-image", [
        'generate --prompt "a red circle at the top left" --seed 0 -o out.png',
        'generate --bundle out/bundle --backend executorch --prompt "a blue square on the right" -o out.png',
    ])
    p.add_argument("--prompt", required=True, help="what to draw, e.g. \"a red circle at the top left\"")
    p.add_argument("-o", "--output", required=True, help="the image to write (.png or .jpg)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and the diffusion noise")
    add_checkpoint(p)
    add_sampling(p, temperature=0.0)
    add_backend(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from tqdm import tqdm

    from manzano_edge.data.images import to_image

    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"output {out} must end in .png or .jpg")
    pipe = pipeline(args.checkpoint, args.bundle, args.backend, quiet=args.quiet)
    pipe.generation_prompt_ids(args.prompt)  # fail on a bad prompt before any progress output
    s = sampling(args)
    n = pipe.cfg.vision.num_image_tokens
    # One bar per stage, each in its own unit: image tokens from the decoder, then flow steps of the DiT.
    with tqdm(total=n, desc="image tokens", unit="token", disable=args.quiet, leave=False) as bar:
        ids = pipe.generate_ids(args.prompt, s, args.seed, progress=lambda i: bar.update(1))
    with tqdm(total=s.flow_steps, desc="flow steps", unit="step", disable=args.quiet, leave=False) as bar:
        image = to_image(pipe.render_ids(ids, s, args.seed, progress=lambda i: bar.update(1)))
    write_atomic(out, image.save)
    print(f"wrote {out}")
