"""A bundle's `onnx-genai/` folder driven by onnxruntime-genai, the way an app that embeds it does
(its Python API here; the C, C#, Java and Objective-C APIs have the same calls). numpy and
onnxruntime-genai only, no PyTorch; every rule comes from `manifest.json` (`pipeline` and
`runners.onnxruntime-genai`).

    python examples/genai_app.py BUNDLE caption --image scene.png --prompt "describe the image."
    python examples/genai_app.py BUNDLE codes --prompt "a red circle at the top left"

Text-to-image stops at the image codes: the DiT and the VAE decoder are not language-model graphs,
so the app runs them with onnxruntime itself (`examples/app_loop.py`, `App.render`).
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from PIL import Image

RUNNER = "onnxruntime-genai"


def allowed_mask(ranges: list[list[int]], vocab: int) -> np.ndarray:
    mask = np.full(vocab, -np.inf, np.float32)
    for lo, hi in ranges:
        mask[lo:hi] = 0.0
    return mask


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The pipeline contract's `pixels.input`: RGB on white, Lanczos to size x size, x / 127.5 - 1, NCHW."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    return np.ascontiguousarray((np.asarray(image, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None])


class GenaiApp:
    def __init__(self, bundle: str | Path) -> None:
        root = Path(bundle)
        manifest = json.loads((root / "manifest.json").read_text())
        runner = manifest.get("runners", {}).get(RUNNER)
        if not runner or not runner.get("folder"):
            why = runner["not_written"] if runner else "it was exported without --format onnx"
            raise SystemExit(f"genai_app: error: {root} has no onnxruntime-genai folder: {why}")
        self.contract = manifest["pipeline"]
        self.model = og.Model(str(root / runner["folder"]))
        self.tokenizer = og.Tokenizer(self.model)
        self.vocab = self.contract["vocabulary"]["size"]
        self.special = self.contract["vocabulary"]["special_tokens"]

    def encode(self, text: str) -> list[int]:
        """onnxruntime-genai's tokenizer applies no normalizer and no prefix space: the app does both."""
        text = unicodedata.normalize("NFKC", text).lower()
        return [int(i) for i in self.tokenizer.encode(text if text.startswith(" ") else " " + text)]

    def generate(self, inputs: og.NamedTensors, mask: np.ndarray, count: int, stop: set[int]) -> list[int]:
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self.contract["decoder"]["max_len"] - 1)
        generator = og.Generator(self.model, params)
        generator.set_inputs(inputs)
        out: list[int] = []
        while len(out) < count and not generator.is_done():
            generator.set_logits(generator.get_logits() + mask)  # the contract's allowed ids
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in stop:
                break
            out.append(token)
        return out

    def caption_ids(self, image: Image.Image, question: str, max_new_tokens: int | None = None) -> list[int]:
        u = self.contract["understanding"]
        ids: list[int] = []
        for item in u["template"]:
            if item == "{image}":
                ids += [-1] * u["image_tokens"]  # phi3v's slots of the first image
            elif item == "{question}":
                ids += self.encode(question)
            else:
                ids.append(item)
        inputs = og.NamedTensors()
        inputs["input_ids"] = np.array([ids], np.int32)
        inputs["pixel_values"] = to_pixels(image, self.contract["pixels"]["input"]["shape"][-1])
        inputs["num_image_tokens"] = np.array([u["image_tokens"]], np.int64)
        return self.generate(inputs, allowed_mask(u["allowed_ids"], self.vocab), max_new_tokens or u["max_new_tokens"],
                             set(u["stop_ids"]))

    def caption(self, image: Image.Image, question: str, max_new_tokens: int | None = None) -> str:
        lo, hi = self.contract["vocabulary"]["text_tokens"]
        ids = [i for i in self.caption_ids(image, question, max_new_tokens) if lo <= i < hi]
        return self.tokenizer.decode(np.array(ids, np.int32)).strip()

    def image_codes(self, prompt: str) -> list[int]:
        g = self.contract["text_to_image"]
        ids: list[int] = []
        for item in g["template"]:
            ids += self.encode(prompt) if item == "{prompt}" else [item]
        inputs = og.NamedTensors()
        inputs["input_ids"] = np.array([ids], np.int32)
        tokens = self.generate(inputs, allowed_mask(g["allowed_ids"], self.vocab), g["image_tokens"], set())
        return [t - self.contract["vocabulary"]["image_token_offset"] for t in tokens]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    sub = p.add_subparsers(dest="task", required=True)
    c = sub.add_parser("caption")
    c.add_argument("--image", required=True)
    c.add_argument("--prompt", default="describe the image.")
    g = sub.add_parser("codes")
    g.add_argument("--prompt", required=True)
    args = p.parse_args(argv)
    app = GenaiApp(args.bundle)
    if args.task == "caption":
        with Image.open(args.image) as image:
            print(app.caption(image.copy(), args.prompt))
    else:
        print(" ".join(map(str, app.image_codes(args.prompt))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
