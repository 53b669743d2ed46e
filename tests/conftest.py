import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """The embedded teacher and its tokenizer, loaded once per session (float32, CPU)."""
    from moedistill.models import get_model

    return get_model("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny):
    return tiny[1]
