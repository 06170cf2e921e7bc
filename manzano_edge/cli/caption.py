"""`manzano-edge caption`: answer a prompt about an image."""

from __future__ import annotations

from manzano_edge.cli.common import add_backend, pipeline


def add_parser(sub) -> None:
    p = sub.add_parser("caption", help="answer a prompt about an image")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="describe the image.")
    p.add_argument("--checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=48)
    add_backend(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.data.images import load_image

    image = load_image(args.image)
    pipe = pipeline(args.checkpoint, args.bundle, args.backend)
    print(pipe.understand(image, args.prompt, max_new_tokens=args.max_new_tokens))
