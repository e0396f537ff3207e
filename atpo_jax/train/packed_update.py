"""The RL update and the scoring passes on packed micro-batches (``train.packing = rows | tree``).

The programs take one :class:`~atpo_jax.train.packing.PackedBatch` at a time: the model runs over
its packed sequences (``CausalLM.packed_hidden_states``, block-sparse tree attention), the
log-prob of every packed token is taken from the hidden state of its predictor, and the
[Rm, R] log-probs of the micro-batch's leaf rows are gathered from those positions
(``row_index``). The loss is then exactly the padded layout's (``policy.loss_from_log_probs`` on
the same [rows, R] arrays), and the gradient of a token shared by several rows is the sum of what
each row contributes.

An update is a host loop over the mini-batch's micro-batches: ``accumulate`` (one jitted program
per micro-batch shape, the gradients accumulated in place) and ``apply`` (the optax step). Each
micro-batch loss is weighted by its share of the *mini-batch's* normaliser and each metric by its
share of the mini-batch's tokens or rows (``policy.mini_batch_totals``), so the result does not
depend on how the rows were grouped into micro-batches.

On a mesh every micro-batch is split over ``("data", "fsdp")``: its S sequences one per batch
device and its Rm rows in equal blocks; parameters, optimizer state and gradients keep their
declared shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from atpo_jax import parallel
from atpo_jax.models import CausalLM, log_probs_from_hidden
from atpo_jax.train.packing import PackedBatch
from atpo_jax.train.policy import (
    LossSettings,
    _constrain,
    _MeshProgram,
    loss_from_log_probs,
    metric_shares,
    mini_batch_totals,
)


def packed_log_probs(
    model: CausalLM, batch: PackedBatch, *, return_entropy: bool = False, chunk: int = 512
):
    """[Rm, R] log-probs (and exact entropies) of the rows' response tokens, computed once per
    packed position; 0 where ``row_index < 0``."""
    hidden = model.packed_hidden_states(batch.tokens, batch.positions, batch.visible_end)
    scored = batch.predictor >= 0
    # The state that predicts token j is its predictor's (the previous token of its own row).
    source = jnp.take_along_axis(hidden, jnp.maximum(batch.predictor, 0)[..., None], axis=1)
    out = log_probs_from_hidden(
        source,
        model.lm_head_weight(),
        batch.tokens,
        scored,
        chunk=chunk,
        return_entropy=return_entropy,
    )
    present = batch.row_index >= 0
    index = jnp.maximum(batch.row_index, 0)

    def to_rows(values: jax.Array) -> jax.Array:
        return jnp.where(present, values.reshape(-1)[index], 0.0)

    if not return_entropy:
        return to_rows(out)
    return to_rows(out[0]), to_rows(out[1])


def packed_policy_loss(model: CausalLM, batch: PackedBatch, settings: LossSettings):
    """The configured loss of one packed micro-batch's rows; returns (loss, metrics)."""
    log_probs, entropy = packed_log_probs(
        model, batch, return_entropy=True, chunk=settings.log_prob_chunk
    )
    return loss_from_log_probs(log_probs, entropy, batch, settings)


class PackedUpdate:
    """``update(params, opt_state, micro, totals) -> (params, opt_state, metrics)``: one
    optimizer step over a mini-batch given as packed micro-batches (device arrays) and its
    ``policy.mini_batch_totals``. ``programs`` counts the compiled micro-batch shapes."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        optimizer: optax.GradientTransformation,
        settings: LossSettings,
        *,
        mesh: Mesh | None = None,
        donate: bool = True,
    ):
        self.mesh = mesh
        self.shapes: set[tuple[int, ...]] = set()

        def accumulate(params, grads_acc, batch: PackedBatch, totals):
            grad_shardings = None if mesh is None else parallel.param_shardings(mesh, params)
            micro_totals = mini_batch_totals(batch.loss_mask, settings.loss_agg)

            def weighted_loss(p):
                loss, metrics = packed_policy_loss(nnx.merge(graphdef, p), batch, settings)
                return loss * micro_totals[0] / jnp.maximum(totals[0], 1e-9), metrics

            grads, metrics = jax.grad(weighted_loss, has_aux=True)(params)
            grads_acc = _constrain(jax.tree.map(jnp.add, grads_acc, grads), grad_shardings)
            return grads_acc, metric_shares(metrics, micro_totals, totals)

        def apply(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

        def zeros(params):
            return jax.tree.map(jnp.zeros_like, params)

        # The gradients have no output to alias (the step returns their norm only).
        applied = (0, 1) if donate else ()
        if mesh is None:
            self._accumulate = jax.jit(accumulate, donate_argnums=(1,))
            self._apply = jax.jit(apply, donate_argnums=applied)
            self._zeros = jax.jit(zeros)
            return

        def accumulate_shardings(params, grads, batch, totals):
            p = parallel.param_shardings(mesh, params)
            b = jax.tree.map(lambda _: parallel.batch_sharding(mesh), batch)
            r = parallel.replicated(mesh)
            return (p, p, b, r), (p, r)

        def apply_shardings(params, opt_state, grads):
            p = parallel.param_shardings(mesh, params)
            o = parallel.param_shardings(mesh, opt_state)
            return (p, o, p), (p, o, parallel.replicated(mesh))

        def zeros_shardings(params):
            p = parallel.param_shardings(mesh, params)
            return (p,), p

        self._accumulate = _MeshProgram(accumulate, mesh, accumulate_shardings, (1,))
        self._apply = _MeshProgram(apply, mesh, apply_shardings, applied)
        self._zeros = _MeshProgram(zeros, mesh, zeros_shardings, ())

    @property
    def programs(self) -> int:
        """Distinct micro-batch shapes compiled so far (one ``accumulate`` program each)."""
        return len(self.shapes)

    def __call__(self, params, opt_state, micro: Sequence[PackedBatch], totals):
        grads = self._zeros(params)
        metrics = []
        for batch in micro:
            self.shapes.add(batch.shape_key)
            grads, m = self._accumulate(params, grads, batch, totals)
            metrics.append(m)
        params, opt_state, grad_norm = self._apply(params, opt_state, grads)
        summed = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *metrics)
        summed["grad_norm"] = grad_norm
        return params, opt_state, summed


def make_packed_log_prob_fn(
    graphdef: nnx.GraphDef, chunk: int = 512, *, mesh: Mesh | None = None
) -> Callable[[Any, PackedBatch], jax.Array]:
    """A jitted ``log_probs(params, batch) -> [Rm, R]`` of one packed micro-batch (no
    gradient); on a mesh the rows come back split over ``("data", "fsdp")``."""

    def log_probs(params, batch: PackedBatch):
        return packed_log_probs(nnx.merge(graphdef, params), batch, chunk=chunk)

    if mesh is None:
        return jax.jit(log_probs)

    def shardings_for(params, batch):
        b = parallel.batch_sharding(mesh)
        return (parallel.param_shardings(mesh, params), jax.tree.map(lambda _: b, batch)), b

    return _MeshProgram(log_probs, mesh, shardings_for, ())
