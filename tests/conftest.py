import os

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_codec():
    from manzano_edge.config import preset
    from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe

    cfg = preset("tiny")
    return TextCodec(train_bpe(cfg.text.text_vocab_size, domain_corpus(500)).to_str(), cfg.text)
