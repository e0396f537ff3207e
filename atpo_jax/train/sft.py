"""Supervised warm start on expert demonstrations (token-mean cross-entropy on trainable tokens).

A demonstration is encoded exactly like an RL row (prompt through the chat template, left-padded;
response segments tokenized one by one, tool observations with loss mask 0), so the warm-started
policy sees the same token layout it will generate in the rollout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from atpo_jax.data.synthetic import demo_segments, read_demos
from atpo_jax.data.synthetic.augment import augmented_demos
from atpo_jax.data.transcripts import encode_transcript
from atpo_jax.settings import ConfigError, check
from atpo_jax.train.metrics import ProgressBar
from atpo_jax.train.optimizer import OptimizerSettings, Schedule, adamw
from atpo_jax.train.policy import PolicyRows, policy_rows, response_log_probs

logger = logging.getLogger(__name__)


def encode_demonstrations(
    tokenizer: Any, demos: Sequence[dict], max_prompt_len: int, max_response_len: int
) -> PolicyRows:
    """Demonstration records -> padded rows; demos that do not fit are reported and left out."""
    prompts, responses, masks = [], [], []
    too_long = 0
    for demo in demos:
        encoded = encode_transcript(tokenizer, demo["prompt"], demo_segments(demo))
        if len(encoded.prompt_ids) > max_prompt_len or len(encoded.response_ids) > max_response_len:
            too_long += 1
            continue
        prompts.append(encoded.prompt_ids)
        responses.append(encoded.response_ids)
        masks.append(encoded.loss_mask)
    if too_long:
        logger.warning(
            "sft: %d of %d demonstrations exceed rollout.max_prompt_len=%d or max_response_len=%d "
            "and are not used",
            too_long,
            len(demos),
            max_prompt_len,
            max_response_len,
        )
    if not prompts:
        raise ValueError("sft: no demonstration fits rollout.max_prompt_len / max_response_len")
    n = len(prompts)
    prompt_tokens = np.full((n, max_prompt_len), tokenizer.pad_token_id or 0, np.int32)
    prompt_mask = np.zeros((n, max_prompt_len), np.int32)
    response = np.full((n, max_response_len), tokenizer.pad_token_id or 0, np.int32)
    loss_mask = np.zeros((n, max_response_len), np.int32)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks, strict=True)):
        prompt_tokens[i, max_prompt_len - len(p) :] = p
        prompt_mask[i, max_prompt_len - len(p) :] = 1
        response[i, : len(r)] = r
        loss_mask[i, : len(m)] = m
    return policy_rows(prompt_tokens, prompt_mask, np.arange(n), response, loss_mask)


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """The supervised warm start on demonstrations (the ``sft`` section of a run's config; the
    synthetic world has them). AdamW with the ``optim`` section's betas, epsilon, weight decay and
    clipping, and its own learning rate: a linear warm-up, then cosine decay to a tenth.

    Attributes:
      steps: supervised steps (0: no warm start).
      batch_size: demonstrations per step (from one length bucket).
      learning_rate: the peak learning rate.
      warmup_steps: linear warm-up steps (0: none, the first step at the peak); a warm-up
        longer than ``steps`` is cut short by the end of the warm start.
      rename_copies: extra copies of each demonstration with its entities renamed, so the model
        learns to copy names out of search results rather than memorise them.
    """

    steps: int = 0
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    rename_copies: int = 0

    def __post_init__(self) -> None:
        check(self.steps >= 0, f"sft.steps={self.steps} must be >= 0")
        check(self.batch_size >= 1, f"sft.batch_size={self.batch_size} must be >= 1")
        check(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"sft.learning_rate={self.learning_rate} must be a finite number > 0",
        )
        check(self.warmup_steps >= 0, f"sft.warmup_steps={self.warmup_steps} must be >= 0")
        check(self.rename_copies >= 0, f"sft.rename_copies={self.rename_copies} must be >= 0")

    def optimizer(self, optim: OptimizerSettings) -> OptimizerSettings:
        """The warm start's optimizer settings: ``optim`` with this learning rate and schedule."""
        # warmup_steps=0 is no warm-up: a warm-up of 1 would make the first step's rate 0, so
        # sft.steps=1 would train nothing.
        warmup = self.warmup_steps
        return dataclasses.replace(
            optim,
            learning_rate=self.learning_rate,
            schedule=Schedule.COSINE,
            warmup_steps=warmup,
            total_steps=max(self.steps, warmup + 1),
            end_learning_rate_factor=0.1,
        )


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted ``step(params, opt_state, rows) -> (params, opt_state, loss)``."""

    def loss_fn(params, rows: PolicyRows):
        log_probs = response_log_probs(nnx.merge(graphdef, params), rows)
        mask = rows.loss_mask.astype(jnp.float32)
        return -jnp.sum(log_probs * mask) / jnp.maximum(mask.sum(), 1.0)

    def step(params, opt_state, rows):
        loss, grads = jax.value_and_grad(loss_fn)(params, rows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def length_buckets(loss_mask: np.ndarray, granularity: int = 32) -> dict[int, np.ndarray]:
    """Row indices grouped by response width: the last trained token's position rounded up."""
    loss_mask = np.asarray(loss_mask) != 0
    total = loss_mask.shape[1]
    last = np.where(loss_mask.any(1), total - np.argmax(loss_mask[:, ::-1], axis=1), 1)
    width = np.minimum(-(-last // granularity) * granularity, total)
    return {int(w): np.flatnonzero(width == w) for w in np.unique(width)}


def _cut_response(rows: PolicyRows, total: int) -> PolicyRows:
    """Keeps the first ``total`` positions of prompt+response (the rest is padding)."""
    width = total - (rows.input_ids.shape[1] - rows.response.shape[1])
    return jax.tree.map(
        lambda x: x[:, :total] if x.shape[1] == rows.input_ids.shape[1] else x[:, :width], rows
    )


def run_sft(
    graphdef: nnx.GraphDef,
    params: Any,
    rows: PolicyRows,
    settings: SFTSettings,
    optim: OptimizerSettings,
    *,
    seed: int,
    on_step: Callable[[int, Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Any, list[float]]:
    """Trains ``params`` on ``rows`` for ``settings.steps`` steps; returns the new parameters and
    the loss per step.

    ``should_stop`` is polled between steps (every step on one process, every 10th in a
    multi-process run, where it is a collective); when it answers True the loop ends early and
    fewer losses than steps are returned.

    Rows are grouped by response length (buckets 32 tokens wide) and every batch comes from one
    bucket, its responses cut to the bucket width: short 1-hop demonstrations do not pay for the
    padding of long 3-hop ones, and only a few shapes compile. Buckets are visited in proportion to
    their size from seeded permutations, so the warm start is reproducible.
    """
    # No non-finite guard here (yet): wrapping the chain in optax.apply_if_finite changes XLA's
    # fusion and so the warm start's rounding; the RL updates have it (train.optimizer).
    optimizer = adamw(settings.optimizer(optim))
    opt_state = optimizer.init(params)
    step_fn = make_sft_step(graphdef, optimizer)
    rng = np.random.default_rng(seed)
    response_len = rows.response.shape[1]
    buckets = length_buckets(rows.loss_mask)
    names = sorted(buckets)
    weights = np.array([len(buckets[w]) for w in names], np.float64)
    cursors = {w: (rng.permutation(buckets[w]), 0) for w in names}
    prompt_len = rows.input_ids.shape[1] - response_len
    losses = []
    poll_every = 1 if jax.process_count() == 1 else 10
    for step in range(settings.steps):
        if should_stop is not None and step % poll_every == 0 and should_stop():
            break
        w = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        order, cursor = cursors[w]
        size = min(settings.batch_size, len(order))
        if cursor + size > len(order):
            order, cursor = rng.permutation(buckets[w]), 0
        index = order[cursor : cursor + size]
        cursors[w] = (order, cursor + size)
        batch = jax.tree.map(lambda x, index=index: x[index], rows)
        batch = _cut_response(batch, prompt_len + w)
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(loss)  # kept on device: no host sync per step
        if on_step is not None:
            on_step(step, loss)
    return params, [float(x) for x in jax.device_get(losses)]


def warm_start(
    graphdef: nnx.GraphDef,
    params: Any,
    tokenizer: Any,
    demos_path: str | None,
    world_path: str | None,
    settings: SFTSettings,
    optim: OptimizerSettings,
    *,
    max_prompt_len: int,
    max_response_len: int,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Any, list[float]]:
    """The supervised warm start of a run: its demonstrations (renamed copies added), encoded like
    RL rows, then :func:`run_sft` with a progress bar. Returns the new parameters and losses."""
    if not demos_path:
        raise ConfigError(
            "sft.steps > 0 needs demonstrations (data.source=synthetic); set sft.steps=0"
        )
    demos = read_demos(demos_path)
    if settings.rename_copies:
        with open(world_path) as f:
            names = [entity["name"] for entity in json.load(f)]
        demos = augmented_demos(demos, names, settings.rename_copies, seed)
    rows = encode_demonstrations(tokenizer, demos, max_prompt_len, max_response_len)
    logger.info("warm start: %d supervised steps on %d demonstrations", settings.steps, len(demos))
    progress = ProgressBar(settings.steps, desc="warm start", postfix_keys=())
    try:
        return run_sft(
            graphdef,
            params,
            rows,
            settings,
            optim,
            seed=seed,
            on_step=lambda *_: progress.update(),
            should_stop=should_stop,
        )
    finally:
        progress.close()
