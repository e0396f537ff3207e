"""Per-token log-probabilities (and exact entropy) without materialising [rows, length, vocab].

With Qwen3's 152k vocabulary a single 8k-token row has 1.2G logits (5 GB in float32), and the
backward pass of a naive ``log_softmax`` keeps several such tensors. Here the final hidden states
are flattened to tokens and split into chunks of ``chunk`` tokens; a ``lax.map`` over chunks
projects one chunk to the vocabulary, takes the log-softmax at the targets (and the entropy) and
keeps only those [chunk] results. Each chunk body is wrapped in ``jax.checkpoint`` so the backward
pass recomputes the chunk's logits instead of storing them: temporary memory is O(chunk x vocab),
independent of the number of rows and their length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from atpo_jax.kernels import token_entropy
from atpo_jax.models.model import CausalLM

DEFAULT_CHUNK = 512


def _chunk_stats(
    hidden: jax.Array, targets: jax.Array, weight: jax.Array, with_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
    """[C, H] hidden, [C] targets, [H, V] weight -> ([C] log p(target), [C] entropy or None)."""
    logits = jnp.dot(hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    entropy = token_entropy(logits) if with_entropy else None
    return picked - log_norm, entropy


def log_probs_from_hidden(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Chunked ``log_softmax(hidden @ weight)[targets]`` (the lm_head part of ``token_log_probs``).

    Args:
      hidden: [B, L, H] final hidden states.
      weight: [H, V] output projection.
      targets: [B, L] int target ids (values at masked positions are ignored, may be out of range).
      mask: [B, L] 0/1, 1 where the result is wanted; ``None`` = everywhere.
      chunk: tokens per chunk (static); temporary memory is about ``chunk * V * 4`` bytes times a
        small constant.
      return_entropy: also return the exact entropy of the predictive distribution.

    Returns:
      [B, L] float32 log-probs, 0 where ``mask == 0``; with ``return_entropy`` a pair
      (log_probs, entropy), entropy [B, L] float32 in nats, 0 where ``mask == 0``.
    """
    batch, length, width = hidden.shape
    vocab = weight.shape[-1]
    n = batch * length
    chunk = max(1, min(chunk, n))
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    flat_hidden = jnp.pad(hidden.reshape(n, width), ((0, pad), (0, 0)))
    flat_targets = jnp.pad(jnp.clip(targets.reshape(n), 0, vocab - 1).astype(jnp.int32), (0, pad))
    # Recompute logits in the backward pass rather than saving one [chunk, V] tensor per chunk.
    body = jax.checkpoint(functools.partial(_chunk_stats, with_entropy=return_entropy))
    log_probs, entropy = jax.lax.map(
        lambda xs: body(xs[0], xs[1], weight),
        (flat_hidden.reshape(num_chunks, chunk, width), flat_targets.reshape(num_chunks, chunk)),
    )
    keep = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
    log_probs = jnp.where(keep, log_probs.reshape(-1)[:n].reshape(batch, length), 0.0)
    if not return_entropy:
        return log_probs
    entropy = jnp.where(keep, entropy.reshape(-1)[:n].reshape(batch, length), 0.0)
    return log_probs, entropy


def token_log_probs(
    model: CausalLM,
    input_ids: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log p(targets[b, t] | input_ids[b, :t+1]) at every position, differentiable in the params.

    Args:
      model: the LM.
      input_ids: [B, L] int token ids.
      targets: [B, L] int ids to score at each position (usually ``input_ids`` shifted left by one).
      mask: [B, L] 0/1 attention mask (1 = real token; contiguous left and/or right padding), also
        the mask of the outputs; ``None`` = no padding.
      chunk: tokens per vocabulary-projection chunk (see ``log_probs_from_hidden``).
      return_entropy: also return the exact per-token entropy.

    Returns:
      [B, L] float32 log-probs (0 where ``mask == 0``), or (log_probs, entropy) with
      ``return_entropy``.
    """
    hidden = model.hidden_states(input_ids, mask)
    return log_probs_from_hidden(
        hidden,
        model.lm_head_weight(),
        targets,
        mask,
        chunk=chunk,
        return_entropy=return_entropy,
    )
