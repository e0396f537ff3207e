"""Gradient checkpointing (``model.remat``, on in the qwen3_4b variant) inside the jitted programs."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from atpo_jax import models
from atpo_jax.train import optimizer as opt
from atpo_jax.train.policy import LossSettings, make_log_prob_fn, make_update_fn, policy_rows

CONFIG = models.ModelConfig(
    model_type="qwen3",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
)


def _rows(rng: np.random.Generator):
    response = rng.integers(1, 64, (4, 6))
    loss_mask = np.ones((4, 6), np.int32)
    loss_mask[:, 3:] = 0
    return policy_rows(
        rng.integers(1, 64, (2, 5)),
        np.ones((2, 5), np.int32),
        np.array([0, 0, 1, 1]),
        response,
        loss_mask,
        advantages=rng.normal(size=(4, 6)).astype(np.float32),
        old_log_probs=np.full((4, 6), -4.0, np.float32),
    )


def test_remat_programs_equal_plain_ones():
    rows = _rows(np.random.default_rng(0))
    tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-2))
    results = []
    for remat in (False, True):
        model = models.CausalLM(dataclasses.replace(CONFIG, remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        log_probs = make_log_prob_fn(graphdef, micro_rows=2)(params, rows)
        update = make_update_fn(graphdef, tx, LossSettings(clip_low=0.2, clip_high=0.2), 2)
        new_params, _, metrics = update(params, tx.init(params), rows)
        results.append((log_probs, new_params, metrics))
    (lp0, p0, m0), (lp1, p1, m1) = results
    np.testing.assert_allclose(lp1, lp0, rtol=1e-6, atol=1e-6)
    assert float(m0["grad_norm"]) > 0
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
