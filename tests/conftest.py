import os

import pytest

# One intra-op thread per process: the tests' tensors are tiny, many tests start
# subprocesses (CLI, torchrun), and two processes each spinning two OpenMP threads on a
# 2-core machine run many times slower than one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
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
