"""Generated bad (and good) inputs against the runtime API: the only failure allowed is a
one-line UserError that names the problem."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from manzano_edge.config import ModelConfig
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import CONFIG_FILE, EMBEDDED_DEFAULT
from manzano_edge.runtime.bundle import Bundle, BundleGraphs
from manzano_edge.runtime.graphs import TorchGraphs
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig

FUZZ = settings(max_examples=20, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NAN = float("nan")
SIZE = ModelConfig.load(EMBEDDED_DEFAULT / CONFIG_FILE).vision.image_size  # the model the pipes load


@pytest.fixture(scope="module")
def pipes(tiny, bundle):
    model, tok = tiny
    b = Bundle(bundle[0])
    codec = TextCodec(tok, model.cfg.text)
    return {"torch": Pipeline(TorchGraphs(model), model.cfg, codec), "ort": Pipeline(BundleGraphs(b, "ort"), b.cfg, codec)}


def pil_images():
    return st.builds(lambda w, h, mode: Image.new(mode, (w, h), 200), st.integers(0, 200), st.integers(0, 200),
                     st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK"]))


def tensors():
    shapes = st.sampled_from([(1, 3, SIZE, SIZE), (1, 3, 96, 96), (1, 3, 64, 64), (3, 96, 96), (2, 3, 96, 96),
                              (1, 1, 96, 96), (0,)])
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool])
    fills = st.sampled_from([0.0, 0.5, -1.0, 7.0, NAN, math.inf])
    return st.builds(lambda s, d, f: torch.full(s, f).to(d) if d.is_floating_point else torch.zeros(s, dtype=d),
                     shapes, dtypes, fills)


images = st.one_of(pil_images(), tensors(), st.none(), st.text(max_size=5), st.builds(lambda: np.zeros((96, 96, 3))))
prompts = st.one_of(st.text(max_size=60), st.just(""), st.just("   "), st.just("red " * 400), st.integers(),
                    st.none(), st.just("what color is the circle?"))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.none(), st.text(max_size=2))
samplings = st.one_of(st.none(), st.builds(
    SamplingConfig, temperature=st.one_of(st.just(0.0), numbers), top_k=st.one_of(st.integers(-2, 2000), numbers),
    top_p=st.one_of(st.just(1.0), st.just(0.9), numbers), token_guidance=st.sampled_from([1.0, 2.0, NAN]),
    flow_steps=st.sampled_from([1, 2, 0, -1, 10 ** 6, 2.5]), flow_guidance=st.one_of(st.just(1.0), st.just(2.0), numbers)))
seeds = st.one_of(st.integers(-3, 3), st.just(2 ** 64), st.none(), st.floats(allow_nan=True))
max_tokens = st.one_of(st.integers(-2, 3), st.just(10 ** 9), st.floats(allow_nan=True), st.none())


def _only_user_errors(call) -> object:
    try:
        return call()
    except UserError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, f"UserError must be one non-empty line: {msg!r}"
        return None


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_understand_never_crashes(pipes, backend):
    pipe = pipes[backend]

    @FUZZ
    @given(image=images, prompt=prompts, max_new=max_tokens, sampling=samplings, seed=seeds)
    @example(image=torch.full((1, 3, SIZE, SIZE), NAN), prompt="what is it?", max_new=2, sampling=None, seed=0)
    @example(image=torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float16), prompt="what is it?", max_new=2, sampling=None,
             seed=0)
    @example(image=Image.new("RGB", (1, 1000)), prompt="red " * 400, max_new=2, sampling=None, seed=0)
    def check(image, prompt, max_new, sampling, seed):
        out = _only_user_errors(lambda: pipe.understand(image, prompt, max_new_tokens=max_new, sampling=sampling, seed=seed))
        assert out is None or isinstance(out, str)

    check()


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_generate_never_crashes(pipes, backend):
    pipe = pipes[backend]

    @FUZZ
    @given(prompt=prompts, sampling=samplings, seed=seeds)
    @example(prompt="a red circle", sampling=SamplingConfig(flow_steps=2, token_guidance=2.0), seed=0)
    @example(prompt="a red circle", sampling=SamplingConfig(flow_steps=2, temperature=NAN), seed=0)
    def check(prompt, sampling, seed):
        out = _only_user_errors(lambda: pipe.generate(prompt, sampling, seed))
        assert out is None or isinstance(out, Image.Image)

    check()


def test_named_errors(pipes):
    """The errors the issue names, with the problem in the message."""
    pipe = pipes["ort"]
    with pytest.raises(UserError, match="NaN"):
        pipe.understand(torch.full((1, 3, SIZE, SIZE), NAN), "what is it?")
    with pytest.raises(UserError, match="float32"):
        pipe.understand(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float16), "what is it?")
    with pytest.raises(UserError, match="context"):
        pipe.generate("red " * 400)
    with pytest.raises(UserError, match="temperature"):
        pipe.generate("a red circle", SamplingConfig(temperature=NAN))
    with pytest.raises(UserError, match="ids"):
        pipe.render_ids(torch.zeros(1, 3))
