"""The app side of a manzano-edge bundle, with no PyTorch and no manzano-edge: numpy, onnxruntime and
tokenizers run the bundle's ONNX graphs by the manifest's pipeline contract alone (Pillow only reads
and writes image files). This is the loop an app ports to Swift or Kotlin.

    python examples/app_loop.py BUNDLE caption --image scene.png --prompt "describe the image."
    python examples/app_loop.py BUNDLE generate --prompt "a red circle at the top left" -o out.png

Every rule below is read from `manifest.json`'s `pipeline` section (docs/guides/deploying.md, "The
pipeline contract"); nothing about the model is hard-coded here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

SUPPORTED_SCHEMA = "manzano-edge/pipeline@1"


class AppError(Exception):
    """A one-line problem with the bundle or the input, and its fix."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data) in numpy."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        data = raw[8 + length + lo:8 + length + hi]
        out[name] = np.frombuffer(data, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


class AppBundle:
    """The ONNX graphs and the contract of one bundle; each file checked against its manifest sha256."""

    def __init__(self, root: str | Path, threads: int = 0) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise AppError(f"{self.root} has no manifest.json; pass a directory written by `manzano-edge export`")
        self.manifest = json.loads(manifest.read_text())
        self.contract = self.manifest.get("pipeline")
        if not self.contract or self.contract.get("schema") != SUPPORTED_SCHEMA:
            raise AppError(f"{manifest} has no {SUPPORTED_SCHEMA} pipeline contract; re-export the bundle")
        self.tokenizer = Tokenizer.from_file(str(self.root / self.contract["tokenizer"]["file"]))
        self.threads = threads
        self.sessions: dict[str, ort.InferenceSession] = {}

    def checked(self, record: dict) -> Path:
        path = self.root / record["file"]
        if not path.is_file() or sha256(path) != record["sha256"]:
            raise AppError(f"bundle file {record['file']} is missing or does not match its sha256; re-export the bundle")
        return path

    def graph(self, name: str) -> ort.InferenceSession:
        if name not in self.sessions:
            record = self.manifest["graphs"].get(name, {}).get("formats", {}).get("onnx")
            if record is None:
                raise AppError(f"the bundle has no ONNX file for graph '{name}'; export with --format onnx"
                               + (" --graphs all" if name == "decoder_cfg" else ""))
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
            self.sessions[name] = ort.InferenceSession(str(self.checked(record)), opts,
                                                       providers=["CPUExecutionProvider"])
        return self.sessions[name]

    def run(self, name: str, **feed: np.ndarray) -> dict[str, np.ndarray]:
        session = self.graph(name)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feed)))

    def state_shapes(self, name: str) -> dict[str, list[int]]:
        io = self.manifest["graphs"][name]["formats"]["onnx"]["io"]
        outs = {o["name"] for o in io["outputs"]}
        return {i["name"]: i["shape"] for i in io["inputs"] if f"{i['name']}_out" in outs}


class Decoder:
    """The decoder graph with its explicit cache fed back between steps (ONNX keeps no state)."""

    def __init__(self, bundle: AppBundle, graph: str) -> None:
        self.bundle, self.graph = bundle, graph
        self.cache = {name: np.zeros(shape, np.float32) for name, shape in bundle.state_shapes(graph).items()}

    def step(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """embeds [B,T,D], mask [B,1,T,E] -> last-position logits [B,V]."""
        out = self.bundle.run(self.graph, inputs_embeds=embeds.astype(np.float32), causal_mask=mask, **self.cache)
        for name in self.cache:
            self.cache[name] = out[f"{name}_out"]
        return out["logits"][:, -1]


def causal_mask(pad: list[int], past: int, new: int) -> np.ndarray:
    """The contract's additive mask [B,1,new,past+new]: causal, and row b's first pad[b] keys hidden
    (a padding query still sees its own key)."""
    q = np.arange(past, past + new)[:, None]
    k = np.arange(past + new)[None, :]
    rows = []
    for p in pad:
        hidden = (k > q) | ((k < p) & (k != q))
        rows.append(np.where(hidden, -np.inf, 0.0).astype(np.float32))
    return np.stack(rows)[:, None]


def allowed_mask(ranges: list[list[int]], vocab: int) -> np.ndarray:
    mask = np.full(vocab, -np.inf, np.float32)
    for lo, hi in ranges:
        mask[lo:hi] = 0.0
    return mask


def fill(template: list, slots: dict[str, list[int]]) -> list[int]:
    ids: list[int] = []
    for item in template:
        ids.extend(slots[item] if isinstance(item, str) else [item])
    return ids


def to_pixels(image: Image.Image, pixels: dict) -> np.ndarray:
    """Any image -> [1,3,S,S] float32 by the contract's `pixels.input`."""
    spec = pixels["input"]
    size = spec["shape"][-1]
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    x = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def to_image(x: np.ndarray) -> Image.Image:
    """[1,3,S,S] in [-1,1] -> RGB image by the contract's `pixels.output`."""
    arr = np.round((np.clip(x[0], -1, 1) + 1) * 127.5).astype(np.uint8)
    return Image.fromarray(arr.transpose(1, 2, 0), "RGB")


class App:
    def __init__(self, bundle: AppBundle) -> None:
        self.b, self.c = bundle, bundle.contract
        self.vocab = self.c["vocabulary"]["size"]
        self.max_len = self.c["decoder"]["max_len"]

    def encode(self, text: str) -> list[int]:
        if not text.strip():
            raise AppError("the prompt is empty; pass some text")
        return self.b.tokenizer.encode(text, add_special_tokens=False).ids

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.b.run("embed_tokens", tokens=np.array([ids], np.int32))["embeds"]

    def decode_greedy(self, decoder: Decoder, logits: np.ndarray, past: int, count: int, mask: np.ndarray,
                      pad: list[int], stop: set[int], guidance: float | None = None) -> list[int]:
        """Greedy tokens after a prefill; every row takes the picked token (guided rows decode in lockstep)."""
        out: list[int] = []
        for i in range(count):
            row = logits[1] + guidance * (logits[0] - logits[1]) if guidance is not None else logits[0]
            token = int(np.argmax(row + mask))
            if token in stop:
                break
            out.append(token)
            if i + 1 == count or past + 1 > self.max_len - 1:
                break
            embeds = np.concatenate([self.embed([token])] * len(pad))
            logits = decoder.step(embeds, causal_mask(pad, past, 1))
            past += 1
        return out

    def caption(self, image: Image.Image, question: str, max_new_tokens: int | None = None) -> str:
        u = self.c["understanding"]
        ids = fill(u["template"], {"{question}": self.encode(question), "{image}": []})
        slot = u["image_slot"]
        image_embeds = self.b.run("tokenizer", pixels=to_pixels(image, self.c["pixels"]))["image_embeds"]
        embeds = np.concatenate([self.embed(ids[:slot]), image_embeds, self.embed(ids[slot:])], axis=1)
        if embeds.shape[1] >= self.max_len:
            raise AppError(f"the question is too long for the {self.max_len}-token context; shorten it")
        decoder = Decoder(self.b, "decoder")
        logits = decoder.step(embeds, causal_mask([0], 0, embeds.shape[1]))
        past = embeds.shape[1]
        count = min(max_new_tokens or u["max_new_tokens"], self.max_len - past)
        out = self.decode_greedy(decoder, logits, past, count, allowed_mask(u["allowed_ids"], self.vocab), [0],
                                 set(u["stop_ids"]))
        text_lo, text_hi = self.c["vocabulary"]["text_tokens"]
        return self.b.tokenizer.decode([i for i in out if text_lo <= i < text_hi], skip_special_tokens=True).strip()

    def image_codes(self, prompt: str, token_guidance: float = 1.0) -> np.ndarray:
        g = self.c["text_to_image"]
        text = self.encode(prompt)
        if token_guidance != g["token_guidance"]["off_at"]:
            rows = [fill(r, {"{prompt}": text}) for r in g["token_guidance"]["rows"]]
            graph, guidance = g["token_guidance"]["decoder_graph"], token_guidance
        else:
            rows, graph, guidance = [fill(g["template"], {"{prompt}": text})], "decoder", None
        width = max(map(len, rows))
        if width + g["image_tokens"] >= self.max_len:
            raise AppError(f"the prompt is too long for the {self.max_len}-token context; shorten it")
        pad = [width - len(r) for r in rows]
        pad_id = self.c["vocabulary"]["special_tokens"]["pad"]
        embeds = np.concatenate([self.embed([pad_id] * p + r) for p, r in zip(pad, rows)])
        decoder = Decoder(self.b, graph)
        logits = decoder.step(embeds, causal_mask(pad, 0, width))
        tokens = self.decode_greedy(decoder, logits, width, g["image_tokens"], allowed_mask(g["allowed_ids"], self.vocab),
                                    pad, set(), guidance)
        return np.array([tokens], np.int64) - self.c["vocabulary"]["image_token_offset"]

    def render(self, codes: np.ndarray, noise: np.ndarray, steps: int | None = None, guidance: float = 1.0) -> np.ndarray:
        g = self.c["text_to_image"]
        flow, latent = g["flow"], g["latent"]
        steps = steps or flow["steps"]
        condition = self.b.run("code_features", image_ids=codes.astype(np.int32))["condition"]
        guided = guidance != flow["guidance"]["off_at"]
        if guided:
            null = flow["guidance"]["null_condition"]
            vector = read_safetensors(self.b.checked(self.b.manifest["extras"]["null_condition"]))[null["tensor"]]
            condition = np.concatenate([condition, np.broadcast_to(vector, condition.shape)]).astype(np.float32)
        x = noise.astype(np.float32)
        for i in range(steps):
            t = np.full((2 if guided else 1,), i / steps, np.float32)
            v = self.b.run("dit", latent=np.concatenate([x, x]) if guided else x, timestep=t,
                           condition=condition)["velocity"]
            if guided:
                v = v[1:] + guidance * (v[:1] - v[1:])
            x = x + v / steps
        pixels = self.b.run("vae_decoder", latent=(x / latent["scaling_factor"]).astype(np.float32))["pixels"]
        return np.clip(pixels, -1, 1)

    def noise(self, seed: int) -> np.ndarray:
        c, s = self.c["text_to_image"]["latent"]["channels"], self.c["text_to_image"]["latent"]["size"]
        return np.random.default_rng(seed).standard_normal((1, c, s, s), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="a directory written by `manzano-edge export --format onnx`")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    sub = p.add_subparsers(dest="task", required=True)
    c = sub.add_parser("caption", help="answer a prompt about an image")
    c.add_argument("--image", required=True)
    c.add_argument("--prompt", default="describe the image.")
    c.add_argument("--max-new-tokens", type=int, default=0, help="0 = the contract's default")
    g = sub.add_parser("generate", help="text-to-image")
    g.add_argument("--prompt", required=True)
    g.add_argument("-o", "--output", required=True, help="the PNG to write")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise (numpy's PCG64)")
    g.add_argument("--noise", help="a .npy of the initial noise instead of --seed (to reproduce another runtime)")
    g.add_argument("--flow-steps", type=int, default=0, help="0 = the contract's default")
    g.add_argument("--token-guidance", type=float, default=1.0, help="image-token CFG scale (1 = off)")
    g.add_argument("--guidance", type=float, default=1.0, help="DiT CFG scale (1 = off)")
    g.add_argument("--codes-out", help="also write the image codes here (.npy)")
    args = p.parse_args(argv)
    try:
        app = App(AppBundle(args.bundle, args.threads))
        if args.task == "caption":
            with Image.open(args.image) as image:
                print(app.caption(image.copy(), args.prompt, args.max_new_tokens or None))
            return 0
        codes = app.image_codes(args.prompt, args.token_guidance)
        noise = np.load(args.noise) if args.noise else app.noise(args.seed)
        to_image(app.render(codes, noise, args.flow_steps or None, args.guidance)).save(args.output)
        if args.codes_out:
            np.save(args.codes_out, codes)
        print(f"wrote {args.output}")
        return 0
    except (AppError, OSError) as exc:
        print(f"app_loop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
