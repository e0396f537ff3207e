"""Tree rollout end to end: tiny random model, the synthetic world, the local BM25 retriever; traces."""

from __future__ import annotations

import html.parser
import json

import numpy as np
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.data import read_rows
from atpo_jax.data.prompts import encode_prompt
from atpo_jax.data.synthetic import build_synthetic_world, load_tokenizer
from atpo_jax.rollout.engine import Engine
from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.rollout.trace import render_html, tree_records, write_trace
from atpo_jax.rollout.tree_search import TreeSearch
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.search import SearchTool
from atpo_jax.tools.toolbox import Toolbox


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    files = build_synthetic_world(tmp_path_factory.mktemp("world"))
    tokenizer = load_tokenizer(files.tokenizer)
    rows = read_rows(files.train)[:3]
    prompts = [encode_prompt(tokenizer, row.prompt) for row in rows]
    toolbox = Toolbox([SearchTool(LocalBM25Retriever(files.corpus), topk=3)])
    return tokenizer, prompts, toolbox


def tiny_model(vocab: int) -> models.CausalLM:
    config = models.ModelConfig(
        model_type="qwen3",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
        tie_word_embeddings=True,
    )
    return models.CausalLM(config, rngs=nnx.Rngs(0))


def make_search(tokenizer, toolbox, **config):
    """A tree search over the world with a random policy, and that policy's parameters."""
    cfg = RolloutSettings(
        initial_rollouts=3,
        expansion_iterations=2,
        beam_size=2,
        samples_per_tree=7,
        max_prompt_len=64,
        max_response_len=48,
        observation_margin=8,
        **config,
    )
    model = tiny_model(len(tokenizer))
    engine = Engine(
        model,
        num_slots=24,
        max_len=112,
        eos_token_ids=[tokenizer.eos_token_id],
        sampling=SamplingParams(vocab_limit=len(tokenizer)),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=16,
        kv_bucket=32,
    )
    search = TreeSearch(
        engine,
        tokenizer,
        toolbox,
        cfg,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return search, nnx.state(model)


def test_random_model_trees_are_well_formed(world):
    tokenizer, prompts, toolbox = world
    search, params = make_search(tokenizer, toolbox)
    out = search.rollout(params, prompts, step=0)
    batch, nodes = out.rows, out.nodes
    assert batch.response_tokens.shape == (3 * 7, 48)
    np.testing.assert_array_equal(batch.tree_index, np.repeat(np.arange(3), 7))
    for b, tree in enumerate(out.trees):
        assert len(tree.leaves()) == 3 + 2 * 2
        valid = nodes.valid[b]
        assert valid[0] and nodes.parent[b, 0] == -1
        idx = np.flatnonzero(valid)[1:]
        assert np.all(nodes.parent[b, idx] < idx)
        # The prompt is kept once per tree, left-padded.
        n = len(tree.prompt)
        np.testing.assert_array_equal(batch.prompt_tokens[b, -n:], tree.prompt)
    for r, row in enumerate(out.row_info):
        tree = out.trees[row.tree]
        tokens = [t for i in tree.path(row.leaf) for t in tree.nodes[i].tokens]
        mask = [m for i in tree.path(row.leaf) for m in tree.nodes[i].loss_mask]
        np.testing.assert_array_equal(batch.response_tokens[r, : len(tokens)], tokens)
        np.testing.assert_array_equal(batch.loss_mask[r, : len(mask)], mask)
        # Every trained token carries its behaviour log-prob (the EOS the reference appends after an
        # empty tool call is scored by Engine.force); inserted tokens carry none.
        lp = batch.sampled_log_probs[r, : len(mask)]
        mask = np.asarray(mask)
        if row.finish == "empty_call":
            assert tokens[-1] == tokenizer.eos_token_id and mask[-1] == 1
        assert np.all(lp[mask == 1] < 0) and np.all(lp[mask == 0] == 0)
    metrics = out.metrics
    assert metrics["rollout/response_length_max"] <= 48
    assert sum(v for k, v in metrics.items() if k.startswith("rollout/leaf_depth_")) == 21


def test_trace_jsonl_and_html(world, tmp_path):
    tokenizer, prompts, toolbox = world
    search, params = make_search(tokenizer, toolbox)
    out = search.rollout(params, prompts[:2], step=4)
    values = np.random.default_rng(0).normal(size=out.nodes.parent.shape)
    records = tree_records(
        out.trees,
        tokenizer.decode,
        values=values,
        advantages=values,
        leaf_rewards=np.ones_like(values),
    )
    page = write_trace(tmp_path, 4, records)
    lines = (tmp_path / "trace_000004.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert len(first["nodes"]) == len(out.trees[0].live_nodes())
    assert first["nodes"][0]["parent"] == -1
    assert first["nodes"][3]["value"] == pytest.approx(values[0, 3])
    # The page is self-contained: no external resources; its embedded data parses back.
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")

    class Scripts(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.data, self.in_data = "", False

        def handle_starttag(self, tag, attrs):
            self.in_data = tag == "script" and ("id", "data") in attrs

        def handle_data(self, data):
            if self.in_data:
                self.data += data

    parser = Scripts()
    parser.feed(text)
    assert json.loads(parser.data) == records
    # A node text containing "</script>" cannot break out of the data element.
    tricky = [{"tree": 0, "prompt": "</script><b>x", "nodes": []}]
    assert "</script><b>" not in render_html(tricky, "t")
