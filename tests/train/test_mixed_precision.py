"""Mixed precision: float32 master weights and optimizer state, bfloat16 compute.

At the paper's learning rate (1e-6) one Adam step moves a weight by about 1e-6. A bfloat16 weight
of magnitude ~0.02 has a spacing of 2^-13 ≈ 1.2e-4 between representable values, so almost every
such update rounds away; a float32 weight's spacing is ~1.9e-9, so every update lands. The
``qwen3_4b`` recipe therefore keeps float32 masters and computes in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.train.optimizer import OptimizerSettings, build_optimizer
from atpo_jax.train.packed_update import PackedUpdate
from atpo_jax.train.packing import MiniBatchRows, pack_mini_batch
from atpo_jax.train.policy import LossSettings, make_update_fn, mini_batch_totals, policy_rows
from tests.train import runs

ROWS, PROMPT, RESPONSE = 4, 6, 12


def _qwen3(param_dtype) -> models.ModelConfig:
    return models.ModelConfig(
        model_type="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
        tie_word_embeddings=True,  # every vocabulary row gets a gradient through the lm_head
        dtype=jnp.bfloat16,
        param_dtype=param_dtype,
    )


def _rows():
    rng = np.random.default_rng(0)
    return policy_rows(
        rng.integers(0, 64, (2, PROMPT)),
        np.ones((2, PROMPT), np.int32),
        np.repeat(np.arange(2), 2),
        rng.integers(0, 64, (ROWS, RESPONSE)),
        np.ones((ROWS, RESPONSE), np.int32),
        advantages=rng.normal(size=(ROWS, RESPONSE)).astype(np.float32),
        old_log_probs=np.full((ROWS, RESPONSE), -4.2, np.float32),
    )


def _packed_rows():
    """The rows of ``_rows`` as one packed micro-batch (``train.packing=tree``; each row its own
    node, so nothing is shared but the prompts)."""
    rows = _rows()
    prompt = np.asarray(rows.input_ids)[::2, :PROMPT]
    batch = MiniBatchRows(
        prompt_tokens=prompt,
        prompt_mask=np.ones_like(prompt),
        tree_index=np.repeat(np.arange(2), 2).astype(np.int32),
        response=np.asarray(rows.response),
        loss_mask=np.asarray(rows.loss_mask),
        token_node=np.repeat(np.arange(1, ROWS + 1, dtype=np.int32)[:, None], RESPONSE, axis=1),
        advantages=np.asarray(rows.advantages),
        old_log_probs=np.asarray(rows.old_log_probs),
    )
    return pack_mini_batch(batch, "tree", budget=64).micro, mini_batch_totals(
        batch.loss_mask, LossSettings().loss_agg
    )


def _fraction_changed(param_dtype, packing: str = "padded") -> tuple[float, object]:
    """One AdamW update at lr 1e-6 (the paper's optimizer) -> fraction of weights that changed."""
    model = models.CausalLM(_qwen3(param_dtype), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    before = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
    tx = build_optimizer(OptimizerSettings(learning_rate=1e-6))
    opt_state = tx.init(params)
    if packing == "padded":
        update = make_update_fn(graphdef, tx, LossSettings(), micro_rows=2, donate=False)
        new_params, new_state, metrics = update(params, opt_state, _rows())
    else:
        update = PackedUpdate(graphdef, tx, LossSettings(), donate=False)
        new_params, new_state, metrics = update(params, opt_state, *_packed_rows())
    assert np.isfinite(float(metrics["loss"]))
    after = [np.asarray(x, np.float32) for x in jax.tree.leaves(new_params)]
    changed = sum(int(np.sum(a != b)) for a, b in zip(after, before, strict=True))
    total = sum(b.size for b in before)
    return changed / total, (new_params, new_state)


@pytest.mark.parametrize("packing", ["padded", "tree"])
def test_float32_masters_move_at_the_paper_learning_rate(packing):
    fraction, (params, opt_state) = _fraction_changed(jnp.float32, packing)
    assert fraction >= 0.99, fraction
    # Masters and Adam moments stay float32 although the forward and backward run in bfloat16.
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    floating = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floating and {x.dtype for x in floating} == {jnp.dtype(jnp.float32)}


def test_bfloat16_masters_barely_move():
    """What the fix is for: with bfloat16 storage most of the same update rounds away."""
    fraction, _ = _fraction_changed(jnp.bfloat16)
    assert fraction < 0.2, fraction


def test_compute_params_casts_only_when_the_dtypes_differ():
    mixed = models.CausalLM(_qwen3(jnp.float32), rngs=nnx.Rngs(0))
    params = nnx.state(mixed)
    cast = models.compute_params(params, mixed.config)
    for master, low in zip(jax.tree.leaves(params), jax.tree.leaves(cast), strict=True):
        assert low.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(low, np.float32), np.asarray(master.astype(jnp.bfloat16), np.float32)
        )
    same = models.CausalLM(_qwen3(jnp.bfloat16), rngs=nnx.Rngs(0))
    assert models.compute_params(nnx.state(same), same.config) is not None
    for a, b in zip(
        jax.tree.leaves(nnx.state(same)),
        jax.tree.leaves(models.compute_params(nnx.state(same), same.config)),
        strict=True,
    ):
        assert a is b  # no copy


def test_qwen3_4b_recipe_uses_float32_masters_and_bfloat16_compute():
    config = runs.load_config("qwen3_4b")
    assert config.model.param_dtype == "float32"
    assert config.model.dtype == "bfloat16"
