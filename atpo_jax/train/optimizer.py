"""The optimizer: AdamW (decoupled weight decay) + global-norm clipping + an LR schedule, with
non-finite gradients skipped and counted.

    tx = build_optimizer(config.optim)                    # optax.GradientTransformation
    opt_state = tx.init(params)                           # params: nnx.State or any pytree
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    nonfinite_skips(opt_state)                            # int32 scalar: updates skipped so far

The transformation is ``apply_if_finite(chain(clip_by_global_norm, adamw))``. A step whose
gradients hold a NaN or Inf returns zero updates and leaves the inner state (Adam moments, the
update count that drives the schedule) untouched, so a skipped step is as if it never happened
except for the counter. Unlike ``optax.apply_if_finite``'s default use, it never gives up and
applies a non-finite update, however many arrive in a row.

"Steps" in the schedule are optimizer updates (mini-batch updates), not RL steps: with
``ppo_epochs=1`` and 8 mini-batches per RL step, ``total_steps`` = 8 x the number of RL steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")

# Every key build_optimizer reads; the defaults are the paper's (ALGORITHM.md §5: AdamW lr 1e-6,
# betas (0.9, 0.999), weight decay 0.01, constant LR, no warmup, clip 1.0).
_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6,
    "schedule": "constant",
    "warmup_steps": 0,
    "total_steps": 0,
    "end_learning_rate_factor": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "grad_clip_norm": 1.0,
}

# ``apply_if_finite`` applies an update anyway once more than this many non-finite ones came in a
# row; its counter saturates at the int32 maximum, so this bound is never exceeded.
_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The optimizer settings with the paper's defaults, ``overrides`` applied (unknown keys fail).

    Keys: ``learning_rate`` (peak LR), ``schedule`` (constant | cosine | linear),
    ``warmup_steps`` (linear warm-up from 0 to the peak), ``total_steps`` (where cosine/linear
    decay ends; unused by constant), ``end_learning_rate_factor`` (final LR = factor x peak),
    ``b1``, ``b2``, ``eps`` (Adam), ``weight_decay`` (decoupled, on >= 2-D params only),
    ``grad_clip_norm`` (global-norm clip; <= 0 disables).
    """
    config = ml_collections.ConfigDict(dict(_DEFAULTS))
    for key, value in overrides.items():
        if key not in _DEFAULTS:
            raise ValueError(f"optim.{key} is not an optimizer setting; known: {sorted(_DEFAULTS)}")
        config[key] = value
    return config


def validate_optimizer_config(config: Mapping[str, Any], prefix: str = "optim") -> None:
    """Raises ``ValueError`` naming ``<prefix>.<key>`` for a missing, unknown or invalid setting."""
    keys = set(config.keys())
    missing = sorted(set(_DEFAULTS) - keys)
    if missing:
        raise ValueError(f"{prefix}: missing setting(s) {', '.join(missing)}")
    unknown = sorted(keys - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{prefix}: unknown setting(s) {', '.join(unknown)}; known: {sorted(_DEFAULTS)}"
        )

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{prefix}.{key}={config[key]!r} {why}")

    def number(key: str) -> float:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(key, "must be a number")
        return float(value)

    def integer(key: str) -> int:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(key, "must be a non-negative integer")
        return value

    if not number("learning_rate") > 0:
        raise bad("learning_rate", "must be > 0")
    if config["schedule"] not in SCHEDULES:
        raise bad("schedule", f"is not one of {SCHEDULES}")
    warmup, total = integer("warmup_steps"), integer("total_steps")
    if config["schedule"] != "constant" and total <= warmup:
        raise ValueError(
            f"{prefix}.total_steps={total} must exceed {prefix}.warmup_steps={warmup} for "
            f"schedule {config['schedule']!r} (steps count optimizer updates)"
        )
    if not 0.0 <= number("end_learning_rate_factor") <= 1.0:
        raise bad("end_learning_rate_factor", "must be in [0, 1]")
    for key in ("b1", "b2"):
        if not 0.0 <= number(key) < 1.0:
            raise bad(key, "must be in [0, 1)")
    if not number("eps") > 0:
        raise bad("eps", "must be > 0")
    if not number("weight_decay") >= 0:
        raise bad("weight_decay", "must be >= 0")
    number("grad_clip_norm")


def build_schedule(config: Mapping[str, Any], prefix: str = "optim") -> optax.Schedule:
    """The learning rate as a function of the number of applied updates.

    Warm-up rises linearly from 0 at update 0 to ``learning_rate`` at ``warmup_steps`` (the optax
    and transformers convention); then ``constant`` stays there, ``cosine`` and ``linear`` decay to
    ``end_learning_rate_factor * learning_rate`` at ``total_steps`` and stay there.
    """
    validate_optimizer_config(config, prefix)
    peak = float(config["learning_rate"])
    warmup, total = int(config["warmup_steps"]), int(config["total_steps"])
    end = peak * float(config["end_learning_rate_factor"])
    if config["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=end)
    if config["schedule"] == "linear":
        main = optax.linear_schedule(peak, end, total - warmup)
    else:
        main = optax.constant_schedule(peak)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for leaves with ndim >= 2 (matrices get weight decay; norms and biases do not)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def build_optimizer(
    config: Mapping[str, Any], prefix: str = "optim"
) -> optax.GradientTransformationExtraArgs:
    """AdamW + global-norm clipping + schedule, skipping non-finite updates (see module doc).

    Args:
      config: the settings of ``optimizer_config`` (a ConfigDict or any mapping).
      prefix: the config path used in error messages (``optim.schedule='foo' is not one of ...``).

    Returns:
      The transformation. Its state is an ``optax.ApplyIfFiniteState``; read it with
      ``nonfinite_skips``, ``last_update_skipped`` and ``applied_updates``.
    """
    schedule = build_schedule(config, prefix)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=float(config["b1"]),
        b2=float(config["b2"]),
        eps=float(config["eps"]),
        weight_decay=float(config["weight_decay"]),
        mask=decay_mask,
    )
    clip = float(config["grad_clip_norm"])
    inner = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    return optax.apply_if_finite(inner, max_consecutive_errors=_NEVER_GIVE_UP)


def _finite_state(opt_state: Any) -> optax.ApplyIfFiniteState:
    """The ``ApplyIfFiniteState`` in ``opt_state`` (bare, or nested, e.g. in ``nnx.Optimizer``)."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state
    found = [
        node
        for node in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)
        )
        if isinstance(node, optax.ApplyIfFiniteState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected one optax.ApplyIfFiniteState in the optimizer state, found {len(found)}; "
            "was the optimizer built by build_optimizer?"
        )
    return found[0]


def _value(x: Any) -> jax.Array:
    # nnx.Optimizer stores optimizer-state arrays in nnx Variables.
    return jnp.asarray(x[...] if hasattr(x, "get_value") else x)


def nonfinite_skips(opt_state: Any) -> jax.Array:
    """int32 scalar: the number of updates skipped so far because a gradient was NaN or Inf."""
    return _value(_finite_state(opt_state).total_notfinite)


def last_update_skipped(opt_state: Any) -> jax.Array:
    """bool scalar: whether the most recent ``update`` call was skipped (non-finite gradients)."""
    return jnp.logical_not(_value(_finite_state(opt_state).last_finite))


def applied_updates(opt_state: Any) -> jax.Array:
    """int32 scalar: updates actually applied (the count the schedule is evaluated at)."""
    counts = optax.tree_utils.tree_get_all_with_path(_finite_state(opt_state).inner_state, "count")
    if not counts:
        raise ValueError("no update counter found in the optimizer state")
    return _value(counts[0][1])


def current_learning_rate(config: Mapping[str, Any], opt_state: Any) -> jax.Array:
    """float32 scalar: the LR the next applied update will use (for logging)."""
    return jnp.asarray(build_schedule(config)(applied_updates(opt_state)), jnp.float32)
