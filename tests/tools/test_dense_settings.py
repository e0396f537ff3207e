"""``tools.method=dense`` in a run's settings: validated up front, built into the search tool."""

from __future__ import annotations

import pytest

from atpo_jax.settings import ConfigError
from atpo_jax.tools.dense import DenseRetriever
from atpo_jax.tools.passages import format_passages
from atpo_jax.tools.settings import RetrievalMethod, ToolSettings, build_toolbox
from tests.tools import dense_helpers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"method": "dense"},
            r"tools.method=dense needs tools.index: a folder built by python -m atpo_jax.tools.build_index",
        ),
        (
            {"index": "/idx"},
            r"tools.index='/idx' / tools.encoder='' are for the dense retriever: add --config.tools.method=dense",
        ),
        ({"encoder": "/e5"}, r"are for the dense retriever"),
        (
            {"method": "dense", "index": "/idx", "retriever_url": "http://127.0.0.1:8000/retrieve"},
            r"tools.method=dense runs the dense retriever in this process, but tools.retriever_url=",
        ),
        ({"method": "sparse"}, r"tools.method='sparse' is not one of 'bm25', 'dense'"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ToolSettings(**kwargs)


def test_the_run_config_is_checked_before_anything_is_built():
    from atpo_jax.config import run_settings
    from tests.train.runs import load_config

    with pytest.raises(ConfigError, match=r"tools.method=dense needs tools.index"):
        run_settings(load_config("tiny", {"tools.method": "dense"}))
    settings = run_settings(load_config("tiny", {"tools.method": "dense", "tools.index": "/i"}))
    assert settings.tools.method is RetrievalMethod.DENSE


def test_build_toolbox_searches_the_dense_index(dense):
    settings = ToolSettings(method="dense", index=dense.index_dir, encoder=dense.encoder_dir)
    toolbox = build_toolbox(settings, default_corpus=dense.corpus, max_workers=2)
    retriever = DenseRetriever(dense.index_dir, encoder=dense.encoder)
    for query in dense_helpers.make_queries(3):
        result = toolbox.run("search", query)
        assert result.ok
        assert result.text == format_passages(retriever.search([query], 3)[0], max_chars=1000)
    # Without tools.corpus or a synthetic world, the corpus is the index's own.
    no_corpus = ToolSettings(method="dense", index=dense.index_dir)
    build_toolbox(no_corpus, default_corpus=None, max_workers=1)


def test_unusable_dense_settings_name_the_setting(dense, tmp_path):
    def toolbox(default_corpus=None, **kwargs):
        return build_toolbox(
            ToolSettings(method="dense", **kwargs), default_corpus=default_corpus, max_workers=1
        )

    with pytest.raises(
        ConfigError,
        match=r"tools.index='/nope': index folder '/nope' does not exist: build it with python -m atpo_jax.tools.build_index",
    ):
        toolbox(index="/nope")
    other = str(tmp_path / "other.jsonl")
    dense_helpers.make_corpus(other, 10, seed=9)
    with pytest.raises(
        ConfigError,
        match=r"tools.index='.*': .*manifest.json: the index was built from .* Rebuild the index for this corpus",
    ):
        toolbox(index=dense.index_dir, default_corpus=other)
    with pytest.raises(ConfigError, match=r"tools.corpus='/missing.jsonl' does not exist"):
        toolbox(index=dense.index_dir, corpus="/missing.jsonl")
    with pytest.raises(ConfigError, match=r"tools.encoder='/nope' is not a directory"):
        toolbox(index=dense.index_dir, encoder="/nope")
    with pytest.raises(ConfigError, match=r"tools.encoder=.*config.json not found"):
        toolbox(index=dense.index_dir, encoder=str(tmp_path))
