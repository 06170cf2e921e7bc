import os
import sys

import pytest
import torch

# Two cores: keep the test processes from oversubscribing them (`make test` runs two pytest workers).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", max(1, min(2, (os.cpu_count() or 1) // WORKERS)))))


# Fixtures that export bundles (session-wide, or a module's): the tests using one run in one worker, so
# each is exported once.
SHARED_EXPORTS = ("bundle", "quant_bundle", "coreml_delegate_programs", "coreai_bundle", "coreml_w8a8_decoder")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (make test) the tests that share an exported bundle form
    one group, which xdist gives to one worker; the other workers take the rest."""
    for item in items:
        shared = [name for name in SHARED_EXPORTS if name in item.fixturenames]
        if len(shared) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses {' and '.join(shared)}: a test takes one shared export, "
                                    "or two workers would export them")
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    result = yield
    if getattr(config.option, "loadgroup", False):  # set in xdist workers under --dist loadgroup
        ungrouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if ungrouped:
            why = (f"pytest-xdist did not group {ungrouped[0]}: every worker would export its own bundle; "
                   "install the pytest and pytest-xdist ranges pyproject.toml pins")
            sys.__stderr__.write(why + "\n")  # xdist's controller reports a worker's error without its message
            raise pytest.UsageError(why)
    return result


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
def micro(tiny):
    """The embedded model's shapes with a one-layer decoder and random weights, and its tokenizer: for
    the tests of a graph layout or of a check that must fail, where the graph's structure matters and
    the trained numbers do not (a one-layer decoder lowers in a third of the time)."""
    import copy

    from manzano_edge.models.manzano import Manzano

    model, tok = tiny
    cfg = copy.deepcopy(model.cfg)
    cfg.decoder.num_hidden_layers = 1
    torch.manual_seed(0)
    return Manzano(cfg).eval(), tok


@pytest.fixture(scope="session")
def bundle(tiny, tmp_path_factory):
    """The embedded model, every graph (the optional decoder_cfg too), exported to every format
    once per session (fp32, Core ML fp16 compute); the ExecuTorch Core ML-delegate programs are
    `coreml_delegate_programs`."""
    from manzano_edge.export.bundle import ExportOptions, export_bundle

    model, tok = tiny
    out = tmp_path_factory.mktemp("bundle") / "tiny-fp32"
    manifest = export_bundle(model, tok, out, ExportOptions(formats=["coreml", "onnx", "executorch"],
                                                            graphs=["all"], show_progress=False,
                                                            executorch_coreml=False))
    return out, manifest


@pytest.fixture(scope="session")
def coreml_delegate_programs(tiny, tmp_path_factory):
    """Every graph lowered to ExecuTorch's Core ML delegate by the exporter's own step (what
    `export` writes to executorch-coreml/), as (folder, manifest). Kept out of `bundle` so that
    another worker lowers them while `bundle` exports."""
    from manzano_edge.data.text import TextCodec
    from manzano_edge.export.base import GraphJob
    from manzano_edge.export.bundle import ExportOptions, build_manifest
    from manzano_edge.export.executorch import COREML_DELEGATE_FOLDER, ExecuTorchExporter
    from manzano_edge.spec.examples import real_examples
    from manzano_edge.spec.graphs import graph_specs

    model, tok = tiny
    out = tmp_path_factory.mktemp("executorch-coreml")
    (out / COREML_DELEGATE_FOLDER).mkdir()
    examples = real_examples(model, TextCodec(tok, model.cfg.text)).per_graph
    opts = ExportOptions(formats=["executorch"], graphs=["all"], show_progress=False)
    exporter = ExecuTorchExporter()
    entries = [exporter.coreml_delegate(GraphJob(spec, model, examples[name], out, "fp32", opts))
               for name, spec in graph_specs(model.cfg).items()]
    for entry in entries:
        entry.exporter = exporter.name  # as export_bundle records it
    return out, build_manifest(model, opts, entries)


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


@pytest.fixture(scope="session")
def coreai_bundle(tiny, tmp_path_factory):
    """Every graph of the embedded model in Core AI (fp32), each checked at export by running it in
    coreai-core's runtime; skipped, with the reason, where coreai-core has no wheel."""
    from manzano_edge.export.bundle import ExportOptions, export_bundle
    from manzano_edge.runtime.backends.coreai import runnable

    ok, why = runnable()
    if not ok:
        pytest.skip(f"Core AI does not run here: {why}")
    model, tok = tiny
    out = tmp_path_factory.mktemp("coreai") / "tiny-coreai-fp32"
    return out, export_bundle(model, tok, out, ExportOptions(formats=["coreai"], graphs=["all"], show_progress=False))
