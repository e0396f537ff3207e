"""The decoder-only causal LM (Qwen3, Qwen2/2.5, Llama 3) as a Flax NNX module.

Attribute names mirror the Hugging Face module tree (``embed_tokens``,
``layers.{i}.self_attn.q_proj``, ``norm``, ``lm_head``), so checkpoint I/O is a mechanical rename
(see ``checkpoint.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atpo_jax.models.config import ModelConfig
from atpo_jax.models.layers import (
    DEFAULT_INIT,
    CacheView,
    DecoderLayer,
    Linear,
    RMSNorm,
    matmul,
    rope_cos_sin,
)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L] 0/1 mask -> [B, L] int32 positions: 0, 1, 2, ... over the real tokens.

    The positions the model uses for a padded batch (padding gets its neighbour's position; it is
    never attended to). This is what makes left-padded and right-padded batches give identical
    logits for the real tokens, and matches transformers' ``generate`` with padding.
    """
    counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1)
    return jnp.maximum(counts - 1, 0)


def real_first_order(attention_mask: jax.Array) -> jax.Array:
    """[B, L] 0/1 mask -> [B, L] int32 permutation putting each row's real tokens first, in order.

    ``take_along_axis(x, order, 1)`` turns any padding (left, right, both, even holes) into right
    padding, so attention needs only per-row lengths; ``argsort(order)`` undoes it.
    """
    return jnp.argsort(attention_mask.astype(bool) == 0, axis=-1, stable=True).astype(jnp.int32)


def compute_params(params, config: ModelConfig):
    """``params`` with every floating-point array in the compute dtype ``config.dtype``.

    With float32 master weights and bfloat16 compute, every matmul casts its weight on the fly;
    a decode loop would read (and cast) the float32 weights at every step, twice the HBM traffic of
    bfloat16 weights. The rollout engine runs on this copy instead, made once per policy version.
    The identity (no copy) when the storage dtype already is the compute dtype.
    """
    if jnp.dtype(config.param_dtype) == jnp.dtype(config.dtype):
        return params
    return jax.tree.map(
        lambda x: x.astype(config.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


class CausalLM(nnx.Module):
    """Decoder-only transformer LM.

    Build a random one with ``CausalLM(config, rngs=nnx.Rngs(0))`` or load a checkpoint with
    ``models.from_pretrained``. ``model(input_ids, attention_mask)`` returns logits;
    ``hidden_states`` and ``logits`` split the call for callers (``token_log_probs``) that project
    the vocabulary in chunks.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=DEFAULT_INIT,
            embedding_metadata={"logical_axes": ("vocab", "embed")},
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config=config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                False,
                axes=("embed", "vocab"),
                config=config,
                rngs=rngs,
            )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: [B, L] int token ids.
          attention_mask: [B, L] 0/1 (1 = real token); ``None`` = no padding. Any padding (left,
            right, both) is fine: positions count the real tokens and padding is never attended.

        Returns:
          [B, L, V] logits in the compute dtype; padded positions are finite but meaningless.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """[B, L] ids (+ [B, L] mask) -> [B, L, H] final-normed hidden states (lm_head input)."""
        batch, length = input_ids.shape
        seq_lengths = order = None
        if attention_mask is not None:
            # Left-align every row's real tokens: attention then needs only per-row lengths (padded
            # causal, which cuDNN's flash kernel takes directly) instead of a [B, L, L] mask, and the
            # real tokens sit at positions 0..n-1, exactly ``positions_from_mask``.
            order = real_first_order(attention_mask)
            input_ids = jnp.take_along_axis(input_ids, order, axis=1)
            # A row without real tokens still attends to one key, so nothing divides by zero.
            seq_lengths = jnp.maximum(jnp.sum(attention_mask != 0, axis=-1), 1).astype(jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        cos, sin = rope_cos_sin(positions, self.config)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = _run_layer(layer, x, cos, sin, seq_lengths, self.config.remat)
        x = self.norm(x)
        if order is not None:
            x = jnp.take_along_axis(x, jnp.argsort(order, axis=1)[..., None], axis=1)
        return x

    def packed_hidden_states(
        self, input_ids: jax.Array, positions: jax.Array, visible_end: jax.Array
    ) -> jax.Array:
        """Hidden states of packed sequences (forests or rows laid out depth-first, see
        ``atpo_jax.train.packing``).

        Args:
          input_ids: [B, T] int token ids.
          positions: [B, T] int32 rotary position of each token (its index in the sequence from
            its root: the prompt, then its ancestors' tokens).
          visible_end: [B, T] int32: key j is seen by queries ``j .. visible_end[b, j]``.

        Returns:
          [B, T, H] final-normed hidden states; a token's state is the one it has in its own
          unpacked row.
        """
        cos, sin = rope_cos_sin(positions.astype(jnp.int32), self.config)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = _run_layer(layer, x, cos, sin, None, self.config.remat, visible_end)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., H] final hidden states -> [..., V] logits (tied: the embedding transposed)."""
        dtype = self.config.dtype
        return matmul(hidden.astype(dtype), self.lm_head_weight().astype(dtype))

    def lm_head_weight(self) -> jax.Array:
        """The output projection as a [H, V] array (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def hidden_states_with_cache(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        cache: CacheView,
    ) -> tuple[jax.Array, CacheView]:
        """Forward pass that reads and writes a KV cache (engines call ``forward_with_cache``).

        Args:
          input_ids: [B, T] new tokens.
          positions: [B, T] int32 absolute positions of the new tokens.
          cache: the pool view; each layer writes at ``cache.write_pos`` of ``cache.slots``.

        Returns:
          ([B, T, H] final-normed hidden states, updated view).
        """
        cos, sin = rope_cos_sin(positions, self.config)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, cache=cache.replace(layer=i))
        return self.norm(x), cache


def _call_layer(
    layer: DecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    seq_lengths: jax.Array | None,
    visible_end: jax.Array | None = None,
) -> jax.Array:
    return layer(x, cos, sin, seq_lengths, None, visible_end)[0]


# Gradient checkpointing per layer: the backward pass recomputes a layer's activations from its
# input, so training memory holds one [B, L, H] tensor per layer instead of every intermediate.
_call_layer_remat = nnx.remat(_call_layer)


def _run_layer(
    layer: DecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    seq_lengths: jax.Array | None,
    remat: bool,
    visible_end: jax.Array | None = None,
) -> jax.Array:
    call = _call_layer_remat if remat else _call_layer
    return call(layer, x, cos, sin, seq_lengths, visible_end)
