"""build_optimizer: schedules, AdamW vs a NumPy reference, decay mask, clipping, non-finite skips."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.config import default_config, run_settings
from atpo_jax.settings import ConfigError
from atpo_jax.train import optimizer as opt


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }


def _grads(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale * rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(scale * rng.normal(size=(4,)), jnp.float32),
    }


def numpy_adamw(params, grads_seq, *, lr, b1, b2, eps, wd, clip):
    """Straightforward AdamW (decoupled decay on >= 2-D leaves) with global-norm clipping."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, 1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        if clip > 0:
            norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
            g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        rate = lr(t - 1)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            update = mhat / (np.sqrt(vhat) + eps)
            if p[k].ndim >= 2:
                update = update + wd * p[k]
            p[k] = p[k] - rate * update
    return p


def _run(tx, params, grads_seq, use_jit):
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if use_jit else step
    for grads in grads_seq:
        params, state = step(params, state, grads)
    return params, state


# ----------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize(
    ("settings", "want"),
    [
        (dict(schedule="constant", warmup_steps=0), lambda t: 0.1),
        (dict(schedule="constant", warmup_steps=4), lambda t: 0.1 * min(t, 4) / 4),
        (
            dict(schedule="cosine", warmup_steps=2, total_steps=12, end_learning_rate_factor=0.1),
            lambda t: (
                0.1 * t / 2
                if t < 2
                else 0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * min(t - 2, 10) / 10))
            ),
        ),
        (
            dict(schedule="cosine", warmup_steps=0, total_steps=10),
            lambda t: 0.5 * 0.1 * (1 + math.cos(math.pi * min(t, 10) / 10)),
        ),
        (
            dict(schedule="linear", warmup_steps=2, total_steps=10, end_learning_rate_factor=0.2),
            lambda t: 0.1 * t / 2 if t < 2 else 0.1 + (0.02 - 0.1) * min(t - 2, 8) / 8,
        ),
    ],
)
def test_schedule_values(settings, want):
    schedule = opt.build_schedule(opt.OptimizerSettings(learning_rate=0.1, **settings))
    for t in range(16):
        assert float(schedule(t)) == pytest.approx(want(t), rel=1e-5, abs=1e-9), t


# ----------------------------------------------------------------------------------------------
# AdamW


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_adamw_matches_numpy_reference(use_jit, clip):
    config = opt.OptimizerSettings(
        learning_rate=0.05,
        schedule="linear",
        warmup_steps=1,
        total_steps=4,
        end_learning_rate_factor=0.5,
        b1=0.8,
        b2=0.95,
        eps=1e-6,
        weight_decay=0.1,
        grad_clip_norm=clip,
    )
    grads_seq = [_grads(s, scale=3.0) for s in range(1, 4)]
    params, _ = _run(opt.build_optimizer(config), _params(), grads_seq, use_jit)
    schedule = opt.build_schedule(config)
    want = numpy_adamw(
        _params(),
        grads_seq,
        lr=lambda t: float(schedule(t)),
        b1=0.8,
        b2=0.95,
        eps=1e-6,
        wd=0.1,
        clip=clip,
    )
    # Clipping really acts at this gradient scale (otherwise the clip=0.5 case tests nothing).
    assert float(optax.tree.norm(grads_seq[0])) > 2.0
    for k in want:
        np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=1e-5, atol=1e-6)


def test_weight_decay_only_on_matrices_of_an_nnx_model():
    config = models.ModelConfig(
        model_type="qwen2",
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        qkv_bias=True,
    )
    model = models.CausalLM(config, rngs=nnx.Rngs(0))
    # Give biases and norms non-trivial values so decay would be visible on them.
    before = jax.tree.map(lambda x: x + 0.5, nnx.state(model, nnx.Param))
    nnx.update(model, before)
    lr, wd = 0.1, 0.3
    optimizer = nnx.Optimizer(
        model,
        opt.build_optimizer(opt.OptimizerSettings(learning_rate=lr, weight_decay=wd)),
        wrt=nnx.Param,
    )
    zeros = jax.tree.map(jnp.zeros_like, before)
    optimizer.update(model, zeros)  # Adam's step is exactly 0 for zero gradients
    after = nnx.state(model, nnx.Param)
    seen_1d = seen_2d = 0
    for (path, old), new in zip(
        jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after), strict=True
    ):
        old, new = np.asarray(old), np.asarray(new)
        if old.ndim >= 2:
            seen_2d += 1
            np.testing.assert_allclose(new, old * (1 - lr * wd), rtol=1e-6, err_msg=str(path))
        else:
            seen_1d += 1
            np.testing.assert_array_equal(new, old, err_msg=str(path))
    assert seen_1d >= 6 and seen_2d >= 8  # norms, q/k/v biases; all kernels and the embedding


# ----------------------------------------------------------------------------------------------
# Non-finite gradients


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("use_jit", [False, True])
def test_nonfinite_gradients_are_skipped_and_counted(bad, use_jit):
    tx = opt.build_optimizer(
        opt.OptimizerSettings(learning_rate=0.01, warmup_steps=2, grad_clip_norm=1.0)
    )
    good = [_grads(1), _grads(2)]
    poisoned = _grads(9)
    poisoned["w"] = poisoned["w"].at[1, 2].set(bad)

    update = jax.jit(tx.update) if use_jit else tx.update
    params = _params()
    state = tx.init(params)
    updates, state = update(good[0], state, params)
    params = optax.apply_updates(params, updates)
    params_before, state_before = params, state
    for _ in range(5):  # never gives up, however many come in a row
        updates, state = update(poisoned, state, params)
        params = optax.apply_updates(params, updates)
        assert bool(opt.last_update_skipped(state))
    for k in params:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(params_before[k]))
    jax.tree.map(
        np.testing.assert_array_equal, state.inner_state, state_before.inner_state
    )  # moments and the schedule's count untouched
    assert int(opt.nonfinite_skips(state)) == 5
    assert int(opt.applied_updates(state)) == 1

    # The next good step is exactly the one an uninterrupted run takes.
    updates, state = update(good[1], state, params)
    params = optax.apply_updates(params, updates)
    want, _ = _run(tx, _params(), good, use_jit)
    for k in params:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(want[k]))
    assert not bool(opt.last_update_skipped(state))
    assert int(opt.nonfinite_skips(state)) == 5


def test_counters_and_learning_rate_through_nnx_optimizer():
    config = opt.OptimizerSettings(learning_rate=0.2, warmup_steps=4)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, opt.build_optimizer(config), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
    assert float(opt.current_learning_rate(config, optimizer.opt_state)) == 0.0
    optimizer.update(model, grads)
    optimizer.update(model, nan_grads)
    optimizer.update(model, grads)
    assert int(opt.applied_updates(optimizer.opt_state)) == 2
    assert int(opt.nonfinite_skips(optimizer.opt_state)) == 1
    assert float(opt.current_learning_rate(config, optimizer.opt_state)) == pytest.approx(0.1)


def test_counters_need_the_wrapped_state():
    with pytest.raises(ValueError, match="ApplyIfFiniteState"):
        opt.nonfinite_skips(optax.adam(1e-3).init({"w": jnp.ones(2)}))


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(schedule="foo"), r"optim.schedule='foo' is not one of"),
        (dict(learning_rate=0.0), r"optim.learning_rate=0.0 must be > 0"),
        (dict(learning_rate="1e-3"), r"optim.learning_rate='1e-3' must be a number"),
        (dict(warmup_steps=-1), r"optim.warmup_steps=-1 must be a non-negative integer"),
        (dict(warmup_steps=2.5), r"optim.warmup_steps=2.5 must be a non-negative integer"),
        (
            dict(schedule="cosine", warmup_steps=10, total_steps=10),
            r"optim.total_steps=10 must exceed optim.warmup_steps=10",
        ),
        (dict(end_learning_rate_factor=1.5), r"optim.end_learning_rate_factor=1.5 must be in"),
        (dict(b1=1.0), r"optim.b1=1.0 must be in \[0, 1\)"),
        (dict(b2=-0.1), r"optim.b2=-0.1 must be in \[0, 1\)"),
        (dict(eps=0.0), r"optim.eps=0.0 must be > 0"),
        (dict(weight_decay=-1.0), r"optim.weight_decay=-1.0 must be >= 0"),
        (dict(grad_clip_norm=None), r"optim.grad_clip_norm=None must be a number"),
    ],
)
def test_invalid_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        opt.OptimizerSettings(**override)


def test_a_config_section_is_converted_with_types_checked():
    """The ``optim`` section of a config file (a ConfigDict) becomes the settings in one call:
    unknown keys and wrong types are refused, naming the setting."""
    config = default_config()
    config.optim.learning_rate = 3  # an int where a float is expected is fine
    assert run_settings(config).optim.learning_rate == 3.0
    config = default_config().to_dict()
    config["optim"]["lr"] = 1.0
    with pytest.raises(ConfigError, match="optim.lr is not a setting of optim"):
        run_settings(config)
    config = default_config().to_dict()
    config["optim"]["warmup_steps"] = "2"
    with pytest.raises(ConfigError, match="optim.warmup_steps='2' must be an integer"):
        run_settings(config)


def test_total_steps_default_to_the_run_horizon():
    cosine = opt.OptimizerSettings(schedule="cosine", warmup_steps=5)  # total_steps=0: the run's
    assert cosine.with_horizon(40).total_steps == 40
    assert opt.OptimizerSettings(total_steps=7).with_horizon(40).total_steps == 7
    with pytest.raises(ConfigError, match="optim.total_steps=5 must exceed optim.warmup_steps=5"):
        cosine.with_horizon(5)


def test_defaults_are_the_papers():
    config = opt.OptimizerSettings()
    assert config.learning_rate == 1e-6 and config.schedule == "constant"
    assert (config.b1, config.b2, config.weight_decay, config.grad_clip_norm) == (
        0.9,
        0.999,
        0.01,
        1.0,
    )
    assert config.warmup_steps == 0
