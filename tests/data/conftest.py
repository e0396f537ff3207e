"""One synthetic world per test session (building it takes a couple of seconds)."""

import pytest

from atpo_jax.data import synthetic


@pytest.fixture(scope="session")
def world_files(tmp_path_factory):
    return synthetic.build_synthetic_world(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def world_tokenizer(world_files):
    return synthetic.load_tokenizer(world_files.tokenizer)
