import os

import pytest
import torch

# Two cores: keep the test processes from oversubscribing them (`make test` runs two pytest workers).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", max(1, min(2, (os.cpu_count() or 1) // WORKERS)))))


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (make test), the tests that share an exported bundle run in
    one worker, so each bundle is exported once per session; the other workers take the rest."""
    for item in items:
        for fixture in ("bundle", "quant_bundle"):
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(fixture))
                break


@pytest.fixture(scope="session")
def tiny_codec():
    from manzano_edge.config import preset
    from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe

    cfg = preset("tiny")
    return TextCodec(train_bpe(cfg.text.text_vocab_size, domain_corpus(500)).to_str(), cfg.text)


@pytest.fixture(scope="session")
def tiny():
    from manzano_edge.models.manzano import load_checkpoint

    return load_checkpoint(None)


@pytest.fixture(scope="session")
def bundle(tiny, tmp_path_factory):
    """The embedded model, every graph (the optional decoder_cfg too), exported to every format
    once per session (fp32, Core ML fp16 compute)."""
    from manzano_edge.export.bundle import ExportOptions, export_bundle

    model, tok = tiny
    out = tmp_path_factory.mktemp("bundle") / "tiny-fp32"
    manifest = export_bundle(model, tok, out, ExportOptions(formats=["coreml", "onnx", "executorch"],
                                                            graphs=["all"], show_progress=False))
    return out, manifest


@pytest.fixture(scope="session")
def quant_bundle(tiny, tmp_path_factory):
    """A w8a8 bundle of the graphs the quantization tests need: both decoders on ONNX (fast to
    quantize) and the small code_features graph on both ONNX and ExecuTorch (XNNPACK lowering
    of the larger graphs takes minutes on 2 cores)."""
    from manzano_edge.export.bundle import ExportOptions, export_bundle

    model, tok = tiny
    root = tmp_path_factory.mktemp("quant")
    onnx_dir, et_dir = root / "onnx-w8a8", root / "et-w8a8"
    onnx_manifest = export_bundle(model, tok, onnx_dir, ExportOptions(
        formats=["onnx"], recipe="w8a8", graphs=["decoder", "decoder_cfg", "code_features"], show_progress=False))
    et_manifest = export_bundle(model, tok, et_dir, ExportOptions(
        formats=["executorch"], recipe="w8a8", graphs=["code_features"], show_progress=False))
    return {"onnx": (onnx_dir, onnx_manifest), "executorch": (et_dir, et_manifest)}
