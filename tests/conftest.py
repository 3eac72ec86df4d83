"""Shared fixtures: the real SmolLM2 file and tiny synthetic GGUF files.

pytest puts tests/ on sys.path (rootdir-relative conftest), so test modules import the helpers
as ``from synthetic import write_tiny_llama`` and ``from reference import ReferenceModel``.
"""

from __future__ import annotations

import pytest

from engine.fetch import ModelNotFound, resolve_model
from synthetic import write_tiny_llama

REAL_MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def real_model_path():
    """Path of the real SmolLM2-135M GGUF; fails (never skips) when it was not pulled."""
    try:
        return resolve_model(REAL_MODEL)
    except ModelNotFound as e:
        pytest.fail(f"{e} (`make test` pulls it: run `wafer models pull {REAL_MODEL}`)")


@pytest.fixture(scope="session")
def real_tokenizer(real_model_path):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(real_model_path)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Factory: ``tiny_gguf("Q8_0", tied=False, ...)`` -> path of a synthetic Llama GGUF file.

    Files are written once per distinct set of arguments and reused for the whole session
    (see tests/synthetic.py for the arguments).
    """
    cache = {}
    folder = tmp_path_factory.mktemp("tiny_gguf")

    def make(weight_type: str = "Q4_1", **kwargs):
        key = (weight_type, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = "_".join([weight_type] + [f"{k}-{v}" for k, v in sorted(kwargs.items())])
            cache[key] = write_tiny_llama(folder / f"{name}.gguf", weight_type=weight_type, **kwargs)
        return cache[key]

    return make
