"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, a layer.

Numerics follow transformers' PyTorch implementations of Qwen3 / Qwen2 / Llama so that logits agree
to float32 rounding: RMSNorm normalises in float32 and casts back before the weight, RoPE uses the
``rotate_half`` (split-halves) layout, attention scales by ``head_dim ** -0.5``.

Shape letters: B batch, T query length, S key length, H hidden, N query heads, K key/value heads,
D head_dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from atpo_jax.models.attention import causal_attention, masked_attention
from atpo_jax.models.config import ModelConfig
from atpo_jax.models.tree_attention import tree_attention

DEFAULT_INIT = nnx.initializers.normal(stddev=0.02)  # transformers' initializer_range default

# Every parameter declares what its dimensions mean (``logical_axes`` metadata); the parallel
# layer's rules table maps those names to mesh axes (docs/architecture.md). ``None``: a dimension
# that is never split (norm scales, biases).
Axes = tuple[str | None, ...]


class RMSNorm(nnx.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float, *, config: ModelConfig):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), config.param_dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in ``x.dtype``."""
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Cast before the weight, as transformers does, so bf16 runs round at the same place.
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[D/2] float32 inverse frequencies ``theta^(-2i/D)``, with the config's scaling applied.

    Computed with NumPy at trace time (it depends only on the static config), in float32 like
    transformers, including the Llama 3.1 ``llama3`` band-wise scaling.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, the band between interpolated.
    factor = scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = (2 * np.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for integer positions.

    Args:
      positions: [B, T] int32 positions.
      config: supplies ``head_dim``, ``rope_theta`` and ``rope_scaling``.

    Returns:
      (cos, sin), each [B, T, D] float32, the two halves repeated (``rotate_half`` layout).
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [B, T, heads, D] ``x`` by [B, T, D] tables (float32 math, result in ``x.dtype``)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with a [in, out] kernel (the transpose of PyTorch's layout).

    Leading dimensions are flattened so both the forward matmul and the weight gradient are single
    2-D matmuls: XLA:CPU runs a contraction over two batch dimensions several times slower, and on
    GPU/TPU the reshape is free.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        bias: bool,
        *,
        axes: Axes,
        config: ModelConfig,
        rngs: nnx.Rngs,
    ):
        self.dtype = config.dtype
        self.kernel = nnx.Param(
            DEFAULT_INIT(rngs.params(), (n_in, n_out), config.param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((n_out,), config.param_dtype), logical_axes=(None,))
            if bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in the compute dtype."""
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """[..., in] @ [in, out] -> [..., out] as one 2-D matmul (see ``Linear``)."""
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, f = config.hidden_size, config.intermediate_size
        # Column-parallel in, row-parallel out (Megatron): one all-reduce per MLP.
        self.gate_proj = Linear(h, f, False, axes=("embed", "mlp"), config=config, rngs=rngs)
        self.up_proj = Linear(h, f, False, axes=("embed", "mlp"), config=config, rngs=rngs)
        self.down_proj = Linear(f, h, False, axes=("mlp", "embed"), config=config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, H] -> [B, T, H]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


@struct.dataclass
class CacheView:
    """One cached forward's handle on the KV-cache pool, threaded through the layers.

    ``k``/``v`` are the whole pool, one array per layer: keys [slots, K, D, max_len] (transposed),
    values [slots, K, max_len, D] (see ``models.cache``). Layer ``layer`` writes its new keys and
    values at ``write_pos`` of rows ``slots`` and reads back the first ``kv_len`` positions of those
    rows. ``slots=None`` means row b is slot b (a batch-local pool): the read then needs no gather.
    ``write_pos`` holds ``max_len`` (out of range) for padding tokens, so the scatter drops them
    rather than clamping them onto real positions. ``mask`` is the same for every layer.
    """

    k: tuple[jax.Array, ...]  # per layer [slots, K, D, max_len]
    v: tuple[jax.Array, ...]  # per layer [slots, K, max_len, D]
    slots: jax.Array | None  # [B] int32, distinct; None = row b is slot b
    write_pos: jax.Array  # [B, T] int32
    mask: jax.Array  # [B, 1, T, kv_len] bool: new token t may attend cache position s
    layer: int = struct.field(pytree_node=False, default=0)
    kv_len: int = struct.field(pytree_node=False, default=0)

    def update(self, k_new: jax.Array, v_new: jax.Array) -> tuple[CacheView, jax.Array, jax.Array]:
        """Writes [B, T, K, D] new keys/values of this layer.

        Returns (view, keys [B, K, D, kv_len], values [B, K, kv_len, D]).
        """
        batch, _, kv_heads, _ = k_new.shape
        rows = jnp.arange(batch, dtype=jnp.int32) if self.slots is None else self.slots
        heads = jnp.arange(kv_heads, dtype=jnp.int32)
        # Advanced indices split by a slice index [B, K, T] first, then the sliced axis: the
        # update is [B, K, T, D] for both layouts.
        rows, heads, pos = rows[:, None, None], heads[None, :, None], self.write_pos[:, None, :]
        new_k = k_new.transpose(0, 2, 1, 3).astype(self.k[self.layer].dtype)
        new_v = v_new.transpose(0, 2, 1, 3).astype(self.v[self.layer].dtype)
        layer_k = self.k[self.layer].at[rows, heads, :, pos].set(new_k, mode="drop")
        layer_v = self.v[self.layer].at[rows, heads, pos].set(new_v, mode="drop")
        keys, values = layer_k, layer_v
        if self.slots is not None:
            keys, values = keys[self.slots], values[self.slots]
        if self.kv_len != layer_v.shape[2]:
            keys, values = keys[..., : self.kv_len], values[:, :, : self.kv_len]
        view = self.replace(
            k=_replace_at(self.k, self.layer, layer_k), v=_replace_at(self.v, self.layer, layer_v)
        )
        return view, keys.astype(k_new.dtype), values.astype(v_new.dtype)


def _replace_at(items: tuple, index: int, value) -> tuple:
    return items[:index] + (value,) + items[index + 1 :]


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, q/k RMSNorm (Qwen3) and q/k/v biases (Qwen2)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        n, k, d, h = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        column, row = ("embed", "heads"), ("heads", "embed")
        self.q_proj = Linear(h, n * d, config.qkv_bias, axes=column, config=config, rngs=rngs)
        self.k_proj = Linear(h, k * d, config.qkv_bias, axes=column, config=config, rngs=rngs)
        self.v_proj = Linear(h, k * d, config.qkv_bias, axes=column, config=config, rngs=rngs)
        self.o_proj = Linear(n * d, h, config.o_bias, axes=row, config=config, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, config=config)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, config=config)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        seq_lengths: jax.Array | None = None,
        cache: CacheView | None = None,
        visible_end: jax.Array | None = None,
    ) -> tuple[jax.Array, CacheView | None]:
        """Causal self-attention of [B, T, H] ``x`` (or attention to the cache plus itself).

        Args:
          x: [B, T, H] hidden states.
          cos, sin: [B, T, D] rotary tables for the T positions.
          seq_lengths: [B] int32 number of real tokens per row, which must come first (left-aligned
            rows); ``None`` = every token is real. Expressed as lengths rather than a [B, T, T] mask
            so cuDNN can run its padded-causal flash kernel without a mask tensor.
          cache: when given, this step's keys/values are written to the cache and attention runs
            over its first ``kv_len`` positions under ``cache.mask`` (``seq_lengths`` is unused).
          visible_end: [B, T] int32 for packed sequences (trees or rows laid out depth-first):
            key j is seen by queries ``j .. visible_end[b, j]`` (``models.tree_attention``, the
            block-sparse kernel on every backend); replaces ``seq_lengths``.

        Returns:
          ([B, T, H] output, updated cache view or None).
        """
        cfg = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if visible_end is not None:
            out = tree_attention(q, k, v, visible_end)
        elif cache is None:
            out = causal_attention(q, k, v, seq_lengths, impl=cfg.attention_impl)
        else:
            # Decode attention is memory-bound and its mask arbitrary: always the XLA kernel.
            cache, k, v = cache.update(k, v)
            out = masked_attention(q, k, v, cache.mask)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config=config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, config=config
        )
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        seq_lengths: jax.Array | None = None,
        cache: CacheView | None = None,
        visible_end: jax.Array | None = None,
    ) -> tuple[jax.Array, CacheView | None]:
        """[B, T, H] -> ([B, T, H], cache); arguments as in ``Attention.__call__``."""
        attn, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, seq_lengths, cache, visible_end
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache
