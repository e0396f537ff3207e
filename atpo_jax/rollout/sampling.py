"""Next-token sampling with temperature, top-k, top-p and greedy decoding (pure, jit-safe).

Besides the sampled token, every call returns the log-probability of that token under the
distribution it was drawn from and the exact entropy of that distribution: AT²PO's branching signal
(ALGORITHM.md §2.5) is the mean of the former over a turn (``sampled_nll``) or of the latter
(``exact``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from atpo_jax.kernels import token_entropy


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the engine picks tokens.

    Attributes:
      temperature: divides the logits; 0 means greedy.
      top_k: keep the k most likely tokens (<= 0: off).
      top_p: keep the smallest set of most likely tokens whose probability reaches p (1: off).
      vocab_limit: ids >= this are never sampled (checkpoints pad the embedding beyond the
        tokenizer's vocabulary; the reference passes ``allowed_token_ids`` for the same reason).
        ``None``: the whole model vocabulary.

    For greedy decoding the reported log-prob and entropy are those of the model's distribution at
    temperature 1 (a point mass would carry no signal).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"rollout temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout top_p must be in (0, 1], got {self.top_p}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1, got {self.vocab_limit}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """[B, V] raw logits -> [B, V] float32 logits of the sampling distribution (-inf = excluded)."""
    logits = logits.astype(jnp.float32)
    if params.vocab_limit is not None and params.vocab_limit < logits.shape[-1]:
        allowed = jnp.arange(logits.shape[-1]) < params.vocab_limit
        logits = jnp.where(allowed, logits, -jnp.inf)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token if the mass strictly before it is below p (the token that crosses p stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < params.top_p, ordered, jnp.inf), axis=-1)
        logits = jnp.where(logits < cutoff[..., None], -jnp.inf, logits)
    return logits


def sample_next(
    logits: jax.Array, keys: jax.Array, params: SamplingParams, *, top_logprobs: int = 0
) -> tuple[jax.Array, ...]:
    """Samples one token per row.

    Args:
      logits: [B, V] next-token logits.
      keys: [B] PRNG keys (one per row, so a row's draw does not depend on the other rows).
      params: static sampling settings.
      top_logprobs: k > 0 also returns the k most likely tokens of the sampling distribution and
        their log-probs (what vLLM's ``logprobs=k`` returns; AEPO's branching entropy reads them).

    Returns:
      (tokens [B] int32, log_prob [B] float32 of the token under the sampling distribution,
      entropy [B] float32 of the sampling distribution, nats), then, with ``top_logprobs=k``,
      (top log-probs [B, k] float32, descending, ``-inf`` for tokens the distribution excludes;
      their ids [B, k] int32).
    """
    dist = sampling_logits(logits, params)
    if params.greedy:
        tokens = jnp.argmax(dist, axis=-1)
    else:
        tokens = jax.vmap(jax.random.categorical)(keys, dist)
    log_probs = jax.nn.log_softmax(dist, axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    sample = (tokens.astype(jnp.int32), picked, token_entropy(dist))
    if top_logprobs <= 0:
        return sample
    top_values, top_ids = jax.lax.top_k(log_probs, top_logprobs)
    return (*sample, top_values, top_ids.astype(jnp.int32))
