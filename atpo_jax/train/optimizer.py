"""The optimizer: AdamW (decoupled weight decay) + global-norm clipping + an LR schedule, with
non-finite gradients skipped and counted.

    tx = build_optimizer(OptimizerSettings(learning_rate=1e-6))   # optax.GradientTransformation
    opt_state = tx.init(params)                           # params: nnx.State or any pytree
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    nonfinite_skips(opt_state)                            # int32 scalar: updates skipped so far
    consecutive_nonfinite_skips(opt_state)                # int32 scalar: ... in a row, up to now

The transformation is ``apply_if_finite(chain(clip_by_global_norm, adamw))``. A step whose
gradients hold a NaN or Inf returns zero updates and leaves the inner state (Adam moments, the
update count that drives the schedule) untouched, so a skipped step is as if it never happened
except for the counter. Unlike ``optax.apply_if_finite``'s default use, it never gives up and
applies a non-finite update, however many arrive in a row.

"Steps" in the schedule are optimizer updates (mini-batch updates), not RL steps: with
``ppo_epochs=1`` and 8 mini-batches per RL step, ``total_steps`` = 8 x the number of RL steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from atpo_jax.settings import ConfigError, StrEnum, coerce_choices


class Schedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


SCHEDULES = tuple(m.value for m in Schedule)

# ``apply_if_finite`` applies an update anyway once more than this many non-finite ones came in a
# row; its counter saturates at the int32 maximum, so this bound is never exceeded.
_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its schedule (the ``optim`` section of a run's config). The defaults are the
    paper's (ALGORITHM.md §5: lr 1e-6, betas (0.9, 0.999), weight decay 0.01, constant LR, no
    warm-up, clip 1.0).

    Attributes:
      learning_rate: the peak learning rate.
      schedule: ``constant``, ``cosine`` or ``linear`` (decay after the warm-up).
      warmup_steps: linear warm-up from 0 to the peak, in optimizer updates.
      total_steps: where cosine/linear decay ends, in optimizer updates (0: the run's
        ``train.steps`` x updates per step).
      end_learning_rate_factor: the final learning rate is this times the peak.
      b1, b2, eps: Adam's moment decays and epsilon.
      weight_decay: decoupled weight decay, on >= 2-D parameters only.
      grad_clip_norm: global-norm gradient clipping (<= 0: off).
    """

    learning_rate: float = 1e-6
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    total_steps: int = 0
    end_learning_rate_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        coerce_choices(self, "optim")

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"optim.{key}={getattr(self, key)!r} {why}")

        for key in ("learning_rate", "end_learning_rate_factor", "b1", "b2", "eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, "must be a number")
        for key in ("weight_decay", "grad_clip_norm"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, "must be a number")
        # inf/NaN would silently give NaN parameters (or, for a NaN clip norm, no clipping).
        for key in (
            "learning_rate", "end_learning_rate_factor", "b1", "b2", "eps", "weight_decay",
            "grad_clip_norm",
        ):  # fmt: skip
            if not math.isfinite(getattr(self, key)):
                raise bad(key, "must be a finite number")
        for key in ("warmup_steps", "total_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(key, "must be a non-negative integer")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0")
        if not 0.0 <= self.end_learning_rate_factor <= 1.0:
            raise bad("end_learning_rate_factor", "must be in [0, 1]")
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must be in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", "must be > 0")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "must be >= 0")
        if self.total_steps and self.schedule != Schedule.CONSTANT:
            self.check_horizon()

    def check_horizon(self) -> None:
        """A decaying schedule needs its end after the warm-up."""
        if self.schedule != Schedule.CONSTANT and self.total_steps <= self.warmup_steps:
            raise ConfigError(
                f"optim.total_steps={self.total_steps} must exceed optim.warmup_steps="
                f"{self.warmup_steps} for schedule {str(self.schedule)!r} (steps count optimizer "
                "updates)"
            )

    def with_horizon(self, total_updates: int) -> OptimizerSettings:
        """These settings with ``total_steps=0`` resolved to the run's ``total_updates``."""
        resolved = (
            self if self.total_steps else dataclasses.replace(self, total_steps=total_updates)
        )
        resolved.check_horizon()
        return resolved


def build_schedule(settings: OptimizerSettings) -> optax.Schedule:
    """The learning rate as a function of the number of applied updates.

    Warm-up rises linearly from 0 at update 0 to ``learning_rate`` at ``warmup_steps`` (the optax
    and transformers convention); then ``constant`` stays there, ``cosine`` and ``linear`` decay to
    ``end_learning_rate_factor * learning_rate`` at ``total_steps`` and stay there.
    """
    settings.check_horizon()
    peak = float(settings.learning_rate)
    warmup, total = int(settings.warmup_steps), int(settings.total_steps)
    end = peak * float(settings.end_learning_rate_factor)
    if settings.schedule == Schedule.COSINE:
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=end)
    if settings.schedule == Schedule.LINEAR:
        main = optax.linear_schedule(peak, end, total - warmup)
    else:
        main = optax.constant_schedule(peak)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for leaves with ndim >= 2 (matrices get weight decay; norms and biases do not)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def adamw(settings: OptimizerSettings) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the schedule, without the non-finite guard."""
    schedule = build_schedule(settings)
    inner = optax.adamw(
        learning_rate=schedule,
        b1=float(settings.b1),
        b2=float(settings.b2),
        eps=float(settings.eps),
        weight_decay=float(settings.weight_decay),
        mask=decay_mask,
    )
    clip = float(settings.grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(clip), inner) if clip > 0 else inner


def build_optimizer(settings: OptimizerSettings) -> optax.GradientTransformationExtraArgs:
    """AdamW + global-norm clipping + schedule, skipping non-finite updates (see module doc).

    Returns:
      The transformation. Its state is an ``optax.ApplyIfFiniteState``; read it with
      ``nonfinite_skips``, ``last_update_skipped`` and ``applied_updates``.
    """
    return optax.apply_if_finite(adamw(settings), max_consecutive_errors=_NEVER_GIVE_UP)


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


def consecutive_nonfinite_skips(opt_state: Any) -> jax.Array:
    """int32 scalar: updates skipped in a row up to now (0 when the last one was applied)."""
    return _value(_finite_state(opt_state).notfinite_count)


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too often to continue."""


def last_update_skipped(opt_state: Any) -> jax.Array:
    """bool scalar: whether the most recent ``update`` call was skipped (non-finite gradients)."""
    return jnp.logical_not(_value(_finite_state(opt_state).last_finite))


def applied_updates(opt_state: Any) -> jax.Array:
    """int32 scalar: updates actually applied (the count the schedule is evaluated at)."""
    counts = optax.tree_utils.tree_get_all_with_path(_finite_state(opt_state).inner_state, "count")
    if not counts:
        raise ValueError("no update counter found in the optimizer state")
    return _value(counts[0][1])


def current_learning_rate(settings: OptimizerSettings, opt_state: Any) -> jax.Array:
    """float32 scalar: the LR the next applied update will use (for logging)."""
    return jnp.asarray(build_schedule(settings)(applied_updates(opt_state)), jnp.float32)
