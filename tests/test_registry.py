"""The format and backend registries, and the one decoding loop."""

import pytest
import torch

from manzano_edge.errors import UserError
from manzano_edge.export import EXPORTERS, FORMATS, register_exporter
from manzano_edge.quant.recipes import RECIPES, SUPPORT, Support, default_w8a8_modes, recipe_config
from manzano_edge.runtime.backends import BACKENDS, backend_for_format, get_backend
from manzano_edge.spec.decoding import decode, padded_causal_mask


def test_every_format_states_every_recipe_and_how_it_is_checked():
    assert FORMATS == ("coreml", "onnx", "executorch", "coreai")
    for fmt in FORMATS:
        assert all((fmt, r) in SUPPORT for r in RECIPES)
        assert EXPORTERS[fmt].name == fmt
        # Every format either runs on a registered backend or is its runtime's stand-in elsewhere.
        assert backend_for_format(fmt) is not None
    assert default_w8a8_modes() == {"coreml": "static", "onnx": "dynamic", "executorch": "dynamic", "coreai": "static"}


def test_a_format_that_skips_a_recipe_or_reuses_a_name_is_refused():
    rows = {r: Support(False, "not here") for r in RECIPES}
    with pytest.raises(ValueError, match="registered twice"):
        register_exporter("onnx", rows)(type("Dup", (), {}))
    with pytest.raises(ValueError, match="recipe 'w4'"):
        register_exporter("toy", {r: s for r, s in rows.items() if r != "w4"})(type("Toy", (), {}))
    assert "toy" not in EXPORTERS


def test_backends_are_looked_up_by_name():
    from manzano_edge.cli.common import BACKEND_NAMES

    assert list(BACKENDS) == ["torch", "ort", "executorch", "coreml", "coreai"]
    assert BACKEND_NAMES == tuple(BACKENDS)  # the CLI's choices, named without importing the runtimes
    assert get_backend("ort").format == "onnx"
    with pytest.raises(UserError, match="unknown backend 'tflite'; choose from torch, ort, executorch, coreml, coreai"):
        get_backend("tflite")


def test_recipes_are_config_objects():
    assert recipe_config("w4").group_size == 32
    assert recipe_config("fp16").is_float and not recipe_config("w8a8").is_float
    assert recipe_config("w8a8", activation_mode="static").activation_mode == "static"
    with pytest.raises(UserError, match="unknown recipe 'int3'"):
        recipe_config("int3")


def test_decode_feeds_each_token_to_every_row_and_never_steps_after_the_last():
    calls = []

    def step(embeds, mask):
        calls.append((embeds.shape, mask.shape))
        return torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])

    def embed(tokens):
        assert tokens.shape == (2, 1)
        return torch.zeros(2, 1, 4)

    first = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    out = decode(step, embed, first, past=5, count=3, pad=(0, 2))
    assert out == [2, 1, 1]
    assert len(calls) == 2 and calls[0][1] == (2, 1, 1, 6) and calls[1][1] == (2, 1, 1, 7)
    # The masks it feeds are the pipeline's (left padding hidden per row).
    assert torch.equal(padded_causal_mask([0, 2], 5, 1)[1, 0, 0, :2], torch.tensor([float("-inf")] * 2))
    assert decode(step, embed, first, past=5, count=3, stop_id=2) == []
