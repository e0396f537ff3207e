"""Policy log-probs and the RL update: mini-batches of micro-batches, one jitted program each.

A training row is the tree's prompt (left-padded to P) followed by the leaf's response (right-padded
to R). The policy's log-probs of the response tokens come from the hidden states at positions
``P-1 .. P+R-2`` projected through the lm_head in chunks (``models.log_probs_from_hidden``), so the
[rows, R, vocab] logits are never materialised.

An update consumes one mini-batch: a ``lax.scan`` over its micro-batches accumulates gradients of
the configured loss (``kernels.atpo_policy_loss`` / ``gspo_policy_loss`` / ``ppo_policy_loss``, plus
an optional KL term), then one optax update applies them. Each micro-batch loss is weighted by its
share of the mini-batch's normaliser (non-empty rows for the ``seq-mean-*`` aggregations, tokens for
``token-mean``), so the accumulated gradient equals the gradient of the loss over the whole
mini-batch, whatever the micro-batch size.

On a mesh (``mesh=`` in ``make_update_fn`` / ``make_log_prob_fn``) both programs are jitted with
explicit shardings: parameters and optimizer state by their declared logical axes
(``atpo_jax.parallel``), rows split over ``("data", "fsdp")``, scalars replicated. Micro-batch
``j`` is still rows ``j·m .. (j+1)·m-1`` of the mini-batch; a sharding constraint redistributes the rows so
every micro-batch is itself split over the batch axes (each device works on every micro-batch), so
``micro_batch_rows`` must be divisible by ``data × fsdp`` as well.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atpo_jax import kernels, parallel
from atpo_jax.models import CausalLM, log_probs_from_hidden
from atpo_jax.settings import StrEnum, check, coerce_choices


class PolicyLoss(StrEnum):
    ATPO = "atpo"  # turn-level ratio (AT²PO)
    GSPO = "gspo"  # sequence-level ratio
    PPO = "ppo"  # token-level ratio with dual clip (the GRPO baselines)


class LossAgg(StrEnum):
    """How per-token losses aggregate (``kernels.aggregate_loss``)."""

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


class KLKind(StrEnum):
    """The per-token KL estimator (``kernels.kl_penalty``)."""

    KL = "kl"
    ABS = "abs"
    MSE = "mse"
    LOW_VAR_KL = "low_var_kl"


class OldLogProbs(StrEnum):
    RECOMPUTE = "recompute"  # the reference: score the rollout with the policy before updating
    SAMPLER = "sampler"  # reuse the sampler's log-probs (needs temperature 1, no truncation)


POLICY_LOSSES = tuple(m.value for m in PolicyLoss)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The policy loss (the ``loss`` section of a run's config; ALGORITHM.md §4). Hashable: part
    of the compiled update program.

    Attributes:
      policy_loss: ``atpo`` (turn-level ratio), ``gspo`` (sequence-level) or ``ppo`` (token-level).
      clip_low, clip_high: the ratio's clip range [1 - clip_low, 1 + clip_high] (the paper:
        3e-3 / 4e-3 on turn ratios; PPO-style losses use about 0.2 / 0.28).
      max_log_ratio: turn/sequence log-ratios are clamped here before ``exp`` (atpo, gspo).
      dual_clip: the PPO dual-clip constant for negative advantages (ppo; 0 turns it off).
      loss_agg: ``seq-mean-token-mean`` (the reference), ``token-mean``, ``seq-mean-token-sum``,
        ``seq-mean-token-sum-norm``; normalised over the whole mini-batch, not the micro-batch.
      kl_coef: weight of the KL penalty to the frozen reference policy (0: the reference policy
        is neither kept nor run).
      kl_kind: the KL estimator (``low_var_kl``, ``kl``, ``abs``, ``mse``).
      entropy_coef: weight of the entropy bonus: the loss subtracts ``entropy_coef`` x the
        exact token entropy of the policy, aggregated with ``loss_agg`` like the policy loss
        (the reference's ``entropy_coeff``; 0, its default, adds nothing and no entropy
        gradient; a negative value penalises entropy).
      entropy_balanced_clipping: ``ppo`` only: AEPO's clipping, whose upper bound carries the
        gradient (``kernels.ppo_policy_loss``; the reference's
        ``enable_entropy_balanced_clipping``).
      old_log_probs: ``recompute`` (score the rollout before the update, as the reference) or
        ``sampler`` (reuse the sampler's log-probs).
      log_prob_chunk: positions per chunk of the vocabulary projection when log-probs are
        computed (the [rows, chunk, vocab] logits are the only ones materialised).
    """

    policy_loss: PolicyLoss = PolicyLoss.ATPO
    clip_low: float = 3e-3
    clip_high: float = 4e-3
    max_log_ratio: float = 10.0
    dual_clip: float = 3.0
    loss_agg: LossAgg = LossAgg.SEQ_MEAN_TOKEN_MEAN
    kl_coef: float = 0.0
    kl_kind: KLKind = KLKind.LOW_VAR_KL
    entropy_coef: float = 0.0
    entropy_balanced_clipping: bool = False
    old_log_probs: OldLogProbs = OldLogProbs.RECOMPUTE
    log_prob_chunk: int = 512

    def __post_init__(self) -> None:
        coerce_choices(self, "loss")
        # An inf or NaN here turns every loss and gradient non-finite (NaN fails every comparison).
        for name in (
            "clip_low",
            "clip_high",
            "max_log_ratio",
            "dual_clip",
            "kl_coef",
            "entropy_coef",
        ):
            value = getattr(self, name)
            check(math.isfinite(value), f"loss.{name} must be a finite number, got {value}")
        check(self.kl_coef >= 0, f"loss.kl_coef must be >= 0, got {self.kl_coef}")
        check(
            self.max_log_ratio > 0,
            f"loss.max_log_ratio must be > 0 (the clamp of the log-ratios), got "
            f"{self.max_log_ratio}",
        )
        check(self.dual_clip == 0 or self.dual_clip > 1, "loss.dual_clip must be 0 (off) or > 1")
        check(self.clip_low >= 0 and self.clip_high >= 0, "loss.clip_low/clip_high must be >= 0")
        check(self.log_prob_chunk >= 1, f"loss.log_prob_chunk={self.log_prob_chunk} must be >= 1")
        check(
            not self.entropy_balanced_clipping or self.policy_loss == PolicyLoss.PPO,
            "loss.entropy_balanced_clipping=true is a token-level PPO option (as in the "
            f"reference's AEPO): set loss.policy_loss='ppo', not {str(self.policy_loss)!r}",
        )


@struct.dataclass
class PolicyRows:
    """Rows for log-prob computation and the update ([rows, ...] each).

    ``input_ids``/``attention_mask`` [rows, P+R]: prompt (left-padded) then response; ``response``
    [rows, R] the response tokens; ``loss_mask`` [rows, R]; ``advantages`` [rows, R];
    ``old_log_probs`` / ``ref_log_probs`` [rows, R]. The turns are the runs of ``loss_mask``; the loss
    finds them itself (one streaming pass on CPU, ``kernels.turns.per_token_run_mean``).
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    response: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    old_log_probs: jax.Array
    ref_log_probs: jax.Array


def policy_rows(
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    tree_index: np.ndarray,
    response: np.ndarray,
    loss_mask: np.ndarray,
    advantages: np.ndarray | None = None,
    old_log_probs: np.ndarray | None = None,
) -> PolicyRows:
    """Builds :class:`PolicyRows` (NumPy) from per-tree prompts and per-row responses."""
    rows, length = response.shape
    prompts = np.asarray(prompt_tokens)[tree_index]
    masks = np.asarray(prompt_mask)[tree_index]
    zeros = np.zeros((rows, length), np.float32)
    return PolicyRows(
        input_ids=np.concatenate([prompts, response], axis=1).astype(np.int32),
        # Response padding sits after the response, so causal attention never lets a real token
        # see it; marking it real keeps every row's real tokens contiguous.
        attention_mask=np.concatenate([masks, np.ones((rows, length), np.int32)], axis=1),
        response=np.asarray(response, np.int32),
        loss_mask=np.asarray(loss_mask, np.int32),
        advantages=zeros if advantages is None else np.asarray(advantages, np.float32),
        old_log_probs=zeros if old_log_probs is None else np.asarray(old_log_probs, np.float32),
        ref_log_probs=zeros,
    )


def response_log_probs(
    model: CausalLM, rows: PolicyRows, *, return_entropy: bool = False, chunk: int = 512
):
    """[rows, R] log-probs (and exact entropies) of each response token under ``model``."""
    prompt_len = rows.input_ids.shape[1] - rows.response.shape[1]
    hidden = model.hidden_states(rows.input_ids, rows.attention_mask)
    hidden = hidden[:, prompt_len - 1 : -1]
    return log_probs_from_hidden(
        hidden,
        model.lm_head_weight(),
        rows.response,
        rows.loss_mask,
        chunk=chunk,
        return_entropy=return_entropy,
    )


def mini_batch_totals(loss_mask: Any, loss_agg: str) -> Any:
    """[3] float32: a mini-batch's loss normaliser (what the aggregation divides by: non-empty
    rows for ``seq-mean-*``, tokens for ``token-mean``, 1 for ``seq-mean-token-sum-norm``), its
    trained tokens and its non-empty rows; each micro-batch's loss and metrics are shares of
    these (NumPy in, NumPy out; jax in, jax out)."""
    xp = np if isinstance(loss_mask, np.ndarray) else jnp
    mask = loss_mask != 0
    return totals_from_counts(xp.sum(mask), xp.sum(xp.any(mask, axis=-1)), loss_agg)


def totals_from_counts(tokens: Any, rows: Any, loss_agg: str) -> Any:
    """:func:`mini_batch_totals` from the mini-batch's trained tokens and non-empty rows (e.g.
    summed over processes)."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    if loss_agg == "token-mean":
        norm = tokens
    elif loss_agg == "seq-mean-token-sum-norm":
        norm = xp.ones_like(tokens)
    else:
        norm = rows
    return xp.stack([norm, tokens, rows]).astype(xp.float32)


# How a micro-batch's metric enters the mini-batch's: a masked mean over trained tokens is
# weighted by the micro-batch's share of the tokens, a mean over non-empty rows by its share of
# the rows, a loss by its share of the normaliser; the sum over micro-batches is then the metric
# of the whole mini-batch, however its rows were grouped.
_ROW_METRICS = frozenset({"num_turns", "single_turn_frac"})
_LOSS_METRICS = frozenset({"loss", "pg_loss", "kl_loss", "entropy_loss"})


def metric_shares(
    metrics: dict[str, jax.Array], micro_totals: jax.Array, totals: jax.Array
) -> dict[str, jax.Array]:
    """``metrics`` of one micro-batch times its share of the mini-batch (see ``_ROW_METRICS``);
    ``micro_totals`` and ``totals`` from :func:`mini_batch_totals`."""
    share = micro_totals / jnp.maximum(totals, 1e-9)

    def weight(name: str) -> jax.Array:
        if name in _LOSS_METRICS:
            return share[0]
        return share[2] if name in _ROW_METRICS else share[1]

    return {name: value * weight(name) for name, value in metrics.items()}


def loss_from_log_probs(
    log_probs: jax.Array, entropy: jax.Array, rows: Any, settings: LossSettings
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured loss of [rows, R] log-probs and exact entropies of the response tokens;
    ``rows`` holds ``loss_mask``, ``advantages``, ``old_log_probs`` and ``ref_log_probs``
    [rows, R] (:class:`PolicyRows` or ``packing.PackedBatch``).

    The entropies always give the ``entropy`` metric (token mean, no gradient); with
    ``settings.entropy_coef`` they also enter the loss, with their gradient:
    loss = policy loss + kl_coef x KL − entropy_coef x aggregate(entropy, loss_agg)."""
    common = dict(
        clip_low=settings.clip_low, clip_high=settings.clip_high, loss_agg=settings.loss_agg
    )
    args = (log_probs, rows.old_log_probs, rows.advantages, rows.loss_mask)
    if settings.policy_loss == "atpo":
        loss, metrics = kernels.atpo_policy_loss(
            *args, max_log_ratio=settings.max_log_ratio, **common
        )
    elif settings.policy_loss == "gspo":
        loss, metrics = kernels.gspo_policy_loss(
            *args, max_log_ratio=settings.max_log_ratio, **common
        )
    else:
        loss, metrics = kernels.ppo_policy_loss(
            *args,
            dual_clip=settings.dual_clip or None,
            entropy_balanced_clipping=settings.entropy_balanced_clipping,
            **common,
        )
    metrics = dict(metrics)
    metrics["pg_loss"] = loss
    mask = rows.loss_mask.astype(jnp.float32)
    metrics["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * mask) / jnp.maximum(mask.sum(), 1)
    if settings.kl_coef > 0:
        kl = kernels.kl_penalty(log_probs, rows.ref_log_probs, kind=settings.kl_kind)
        kl_loss = kernels.aggregate_loss(kl, mask, settings.loss_agg)
        metrics["kl_loss"] = kl_loss
        loss = loss + settings.kl_coef * kl_loss
    if settings.entropy_coef:
        entropy_loss = kernels.aggregate_loss(entropy, mask, settings.loss_agg)
        metrics["entropy_loss"] = jax.lax.stop_gradient(entropy_loss)
        loss = loss - settings.entropy_coef * entropy_loss
    metrics["loss"] = loss
    return loss, metrics


def policy_loss(model: CausalLM, rows: PolicyRows, settings: LossSettings):
    """The configured loss on one micro-batch of padded rows; returns (loss, metrics)."""
    log_probs, entropy = response_log_probs(
        model, rows, return_entropy=True, chunk=settings.log_prob_chunk
    )
    return loss_from_log_probs(log_probs, entropy, rows, settings)


def _split_micro(rows: PolicyRows, micro_rows: int) -> PolicyRows:
    """[M, ...] -> [M / micro_rows, micro_rows, ...] (``check_micro_batches`` first)."""
    total = rows.response.shape[0]
    return jax.tree.map(lambda x: x.reshape(total // micro_rows, micro_rows, *x.shape[1:]), rows)


def check_micro_batches(
    rows: int, micro_rows: int, ways: int = 1, rows_are: str = "the mini-batch rows"
) -> None:
    """The one check of the micro-batch layout: ``micro_rows`` divides the ``rows`` of a
    mini-batch, and the ``ways = mesh.data x mesh.fsdp`` batch devices divide ``micro_rows``
    (each micro-batch is split over them). Raises ``ValueError`` naming the settings."""
    if micro_rows < 1 or rows % micro_rows:
        raise ValueError(f"train.micro_batch_rows={micro_rows} must divide {rows_are} ({rows})")
    if micro_rows % ways:
        raise ValueError(
            f"train.micro_batch_rows={micro_rows} must be divisible by the batch parallelism "
            f"mesh.data x mesh.fsdp = {ways} (each micro-batch is split over those devices)"
        )


def _ways(mesh: Mesh | None) -> int:
    return 1 if mesh is None else parallel.batch_parallelism(mesh)


def _micro_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """[micro-batches, rows, ...]: rows over the batch axes, micro-batches (scan axis) whole."""
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(None, parallel.BATCH_AXES))


def _constrain(tree: Any, shardings: Any) -> Any:
    if shardings is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings)


class _MeshProgram:
    """A program jitted for a mesh on first call, when the argument pytrees (hence their
    shardings) are known; later calls with the same structure reuse it."""

    def __init__(self, fn: Callable, mesh: Mesh, shardings_for: Callable, donate: tuple[int, ...]):
        self.fn, self.mesh, self.shardings_for, self.donate = fn, mesh, shardings_for, donate
        self._jitted: dict[Any, Callable] = {}

    def __call__(self, *args):
        key = jax.tree.structure(args)
        if key not in self._jitted:
            in_shardings, out_shardings = self.shardings_for(*args)
            self._jitted[key] = jax.jit(
                self.fn,
                in_shardings=in_shardings,
                out_shardings=out_shardings,
                donate_argnums=self.donate,
            )
        return self._jitted[key](*args)

    def lower(self, *args):
        """``jax.jit(...).lower`` for abstract arguments (``jax.ShapeDtypeStruct``), e.g. for a
        memory analysis without real arrays."""
        in_shardings, out_shardings = self.shardings_for(*args)
        return jax.jit(
            self.fn,
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            donate_argnums=self.donate,
        ).lower(*args)


def make_update_fn(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    settings: LossSettings,
    micro_rows: int,
    *,
    donate: bool = True,
    mesh: Mesh | None = None,
) -> Callable:
    """A jitted ``update(params, opt_state, rows) -> (params, opt_state, metrics)`` for one mini-batch.

    With ``mesh``, the program takes and returns parameters and optimizer state sharded by
    the parameters' declared logical axes (``atpo_jax.parallel``), rows split over
    ``("data", "fsdp")`` (a global array, e.g. from ``parallel.shard_batch``) and returns
    replicated metrics; gradients are accumulated in the parameters' sharding (FSDP: each device
    keeps its shard).
    """
    micro_sharding = _micro_sharding(mesh)

    def update(params, opt_state, rows: PolicyRows):
        check_micro_batches(rows.response.shape[0], micro_rows, _ways(mesh))
        grad_shardings = None if mesh is None else parallel.param_shardings(mesh, params)
        micro = _constrain(_split_micro(rows, micro_rows), micro_sharding)
        totals = mini_batch_totals(rows.loss_mask, settings.loss_agg)

        def micro_step(carry, batch):
            grads_acc, metrics_acc = carry
            micro_totals = mini_batch_totals(batch.loss_mask, settings.loss_agg)

            def weighted_loss(p):
                loss, metrics = policy_loss(nnx.merge(graphdef, p), batch, settings)
                return loss * micro_totals[0] / jnp.maximum(totals[0], 1e-9), metrics

            grads, metrics = jax.grad(weighted_loss, has_aux=True)(params)
            grads_acc = _constrain(jax.tree.map(jnp.add, grads_acc, grads), grad_shardings)
            metrics = metric_shares(metrics, micro_totals, totals)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        zeros = _constrain(jax.tree.map(jnp.zeros_like, params), grad_shardings)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(
            lambda p, b: policy_loss(nnx.merge(graphdef, p), b, settings)[1], params, first
        )
        init_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, init_metrics), micro)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    donate_argnums = (0, 1) if donate else ()
    if mesh is None:
        return jax.jit(update, donate_argnums=donate_argnums)

    def shardings_for(params, opt_state, rows):
        p = parallel.param_shardings(mesh, params)
        o = parallel.param_shardings(mesh, opt_state)
        b = jax.tree.map(lambda _: parallel.batch_sharding(mesh), rows)
        return (p, o, b), (p, o, parallel.replicated(mesh))

    return _MeshProgram(update, mesh, shardings_for, donate_argnums)


def make_log_prob_fn(
    graphdef: nnx.GraphDef, micro_rows: int, chunk: int = 512, *, mesh: Mesh | None = None
) -> Callable:
    """A jitted ``log_probs(params, rows) -> [rows, R]`` (no gradient), micro-batched with lax.map.

    With ``mesh``: parameters sharded by the rules, rows and the result split over
    ``("data", "fsdp")``.
    """
    micro_sharding = _micro_sharding(mesh)

    def log_probs(params, rows: PolicyRows):
        check_micro_batches(rows.response.shape[0], micro_rows, _ways(mesh))
        micro = _constrain(_split_micro(rows, micro_rows), micro_sharding)

        # The parameters enter the loop as its carry, not by closure: nnx.remat (model.remat)
        # refuses to touch parameters that belong to the trace outside the loop.
        def micro_step(p, r):
            return p, response_log_probs(nnx.merge(graphdef, p), r, chunk=chunk)

        _, out = jax.lax.scan(micro_step, params, micro)
        return out.reshape(rows.response.shape)

    if mesh is None:
        return jax.jit(log_probs)

    def shardings_for(params, rows):
        b = parallel.batch_sharding(mesh)
        return (parallel.param_shardings(mesh, params), jax.tree.map(lambda _: b, rows)), b

    return _MeshProgram(log_probs, mesh, shardings_for, ())
