"""`manzano-edge caption`: answer a prompt about an image."""

from __future__ import annotations

from manzano_edge.cli.common import add_backend, add_checkpoint, add_command, pipeline
from manzano_edge.config import DEFAULT_MAX_NEW_TOKENS


def add_parser(sub) -> None:
    p = add_command(sub, "caption", "answer a prompt about an image", [
        'caption --image scene.png --prompt "what color is the circle?"',
        'caption --bundle out/bundle --backend ort --image scene.png --prompt "where is the red circle?"',
    ])
    p.add_argument("--image", required=True, help="the image (PNG or JPEG, any size)")
    p.add_argument("--prompt", default="describe the image.", help="the question or instruction about the image")
    add_checkpoint(p)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="most tokens the answer may have")
    add_backend(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from manzano_edge.data.images import load_image

    image = load_image(args.image)
    pipe = pipeline(args.checkpoint, args.bundle, args.backend, quiet=args.quiet)
    print(pipe.understand(image, args.prompt, max_new_tokens=args.max_new_tokens))
