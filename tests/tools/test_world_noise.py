"""A run on a noisy synthetic world searches through the noise its manifest records (training and
evaluation share the run's toolbox); the easy world's search stays the plain BM25 retriever."""

from __future__ import annotations

import math

import pytest

from atpo_jax.builder import load_data
from atpo_jax.config import run_settings
from atpo_jax.data.synthetic import SyntheticWorldFiles, read_manifest
from atpo_jax.tools import LocalBM25Retriever, NoisyRetriever, SearchTool
from atpo_jax.tools.settings import build_toolbox
from tests.train.runs import load_config

# Small worlds (as in tests/data/test_worlds.py) keep the file fast.
SIZE = {"num_countries": 5, "cities_per_country": 3, "num_people": 64, "num_companies": 48}


def _run_toolbox(world: str, workdir):
    """What builder.build_run does for the search tool, from the config as the launcher sees it
    (``--config.data.synthetic.world=<world>``)."""
    config = load_config(
        "tiny",
        {"data.synthetic.world": world, **{f"data.synthetic.{k}": v for k, v in SIZE.items()}},
    )
    settings = run_settings(config)
    data = load_data(settings, str(workdir))
    toolbox = build_toolbox(
        settings.tools,
        default_corpus=data.corpus,
        max_workers=2,
        retrieval_noise=data.retrieval_noise,
    )
    return settings, data, toolbox


def _search_tool(toolbox) -> SearchTool:
    tool = toolbox._tools["search"]
    assert isinstance(tool, SearchTool)
    return tool


def test_noisy_world_search_misses_at_the_manifest_rate(tmp_path):
    settings, data, toolbox = _run_toolbox("noisy", tmp_path)
    manifest = read_manifest(SyntheticWorldFiles(str(tmp_path / "synthetic")))
    rate, seed = manifest["world"]["retrieval"]["miss_rate"], manifest["world"]["retrieval"]["seed"]
    assert rate == 0.25 and data.retrieval_noise == (rate, seed)
    retriever = _search_tool(toolbox).retriever
    assert isinstance(retriever, NoisyRetriever)
    assert (retriever.miss_rate, retriever.seed) == (rate, seed)
    assert isinstance(retriever.base, LocalBM25Retriever)

    # Through the run's toolbox, on the world's own questions: a query misses exactly when its
    # seeded draw says so (the best passage dropped), and the share of misses is the rate.
    plain = SearchTool(LocalBM25Retriever(data.corpus), topk=settings.tools.topk)
    queries = sorted({row.extra_info["question"] for row in [*data.train, *data.eval]})
    missed = 0
    for query in queries:
        noisy_text = toolbox.run("search", query).text
        plain_text = plain.run(query).text
        if retriever.misses(query):
            missed += 1
            assert noisy_text != plain_text
        else:
            assert noisy_text == plain_text
    n = len(queries)
    assert n > 300
    assert abs(missed / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("world", ["easy", "ambiguous"])
def test_noise_free_worlds_search_the_plain_retriever(world, tmp_path):
    _, data, toolbox = _run_toolbox(world, tmp_path)
    assert data.retrieval_noise == (0.0, 0)
    assert type(_search_tool(toolbox).retriever) is LocalBM25Retriever
