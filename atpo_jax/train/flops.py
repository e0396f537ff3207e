"""Analytic FLOP, parameter and byte counts for the decoder, and MFU / MBU.

Shape letters as in ``models/layers.py``: L layers, H hidden, N query heads, K key/value heads,
D head_dim, F intermediate size, V vocabulary.

Matmul parameters per token (``matmul_param_count``):
    P_mm = L * (H*N*D [q] + 2*H*K*D [k, v] + N*D*H [o] + 3*H*F [gate, up, down]) + H*V [lm_head]
The lm_head is counted whether or not it is tied to the embedding (tied, it is still a matmul);
the embedding lookup is a gather and is not counted.

Forward FLOPs of one token that attends to ``c`` keys (``forward_flops_per_token``):
    2 * P_mm  +  4 * L * N * D * c
(2 FLOPs per multiply-add; scores q.k and the value sum a.v are N*D*c multiply-adds each).
Norms, RoPE, softmax, SiLU and biases are O(H) per token and left out, as in the PaLM / Megatron
MFU convention. For a causal sequence of S tokens the mean ``c`` is (S + 1) / 2; use
``forward_flops_for_sequence`` for the exact sum. Training = forward + backward = 3 x forward
(the backward pass costs two matmuls per forward matmul); remat recomputation is *not* counted,
so MFU measures useful work.

Decode bytes per step (``decode_bytes_per_step``) = every weight read once (the embedding table
only for the B gathered rows, unless tied, where it is read whole as the lm_head) + the KV cache
read: B * kv_len * L * 2 * K * D * kv_bytes. Activations are ignored (small at decode).
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from atpo_jax.models import ModelConfig

log = logging.getLogger(__name__)

# (substring of the lower-cased ``device_kind``, dense bf16 FLOP/s, HBM bytes/s), first match wins,
# so more specific names come first. Vendor datasheet numbers (dense, no sparsity).
_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 4.8e12),
    ("h100 pcie", 756e12, 2.0e12),
    ("h100", 989e12, 3.35e12),
    ("h800", 989e12, 3.35e12),
    ("a100", 312e12, 2.039e12),
    ("tpu v6 lite", 918e12, 1.64e12),
    ("tpu v6e", 918e12, 1.64e12),
    ("tpu v5 lite", 197e12, 0.819e12),
    ("tpu v5e", 197e12, 0.819e12),
    ("tpu v5p", 459e12, 2.765e12),
    ("tpu v5", 459e12, 2.765e12),
    ("tpu v4", 275e12, 1.2e12),
)
_warned_kinds: set[str] = set()


def param_count(config: ModelConfig) -> int:
    """Number of parameters (tied embeddings counted once); equals transformers'
    ``model.num_parameters()`` and the size of our ``CausalLM``'s ``nnx.Param`` state."""
    h, n, k, d, f, v = _dims(config)
    attn = h * n * d + 2 * h * k * d + n * d * h
    if config.qkv_bias:
        attn += n * d + 2 * k * d
    if config.o_bias:
        attn += h
    if config.qk_norm:
        attn += 2 * d
    layer = attn + 3 * h * f + 2 * h  # + input and post-attention RMSNorm
    lm_head = 0 if config.tie_word_embeddings else h * v
    return v * h + config.num_layers * layer + h + lm_head


def matmul_param_count(config: ModelConfig) -> int:
    """P_mm: weights that take part in a matmul per token (see the module doc)."""
    h, n, k, d, f, v = _dims(config)
    per_layer = h * n * d + 2 * h * k * d + n * d * h + 3 * h * f
    return config.num_layers * per_layer + h * v


def forward_flops_per_token(config: ModelConfig, context_len: float) -> float:
    """Forward FLOPs of one token attending to ``context_len`` keys: 2 P_mm + 4 L N D c."""
    if context_len < 0:
        raise ValueError(f"context_len={context_len} must be >= 0")
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * context_len
    return float(2 * matmul_param_count(config) + attention)


def train_flops_per_token(config: ModelConfig, context_len: float) -> float:
    """Forward + backward FLOPs of one token: 3 x ``forward_flops_per_token``."""
    return 3.0 * forward_flops_per_token(config, context_len)


def forward_flops_for_sequence(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of a causal sequence of ``seq_len`` tokens (token t attends to t + 1 keys):
    ``seq_len * 2 P_mm + 4 L N D * seq_len (seq_len + 1) / 2``."""
    if seq_len < 0:
        raise ValueError(f"seq_len={seq_len} must be >= 0")
    mean_context = (seq_len + 1) / 2
    return seq_len * forward_flops_per_token(config, mean_context) if seq_len else 0.0


def decode_bytes_per_step(
    config: ModelConfig, batch: int, kv_len: int, param_bytes: float, kv_bytes: float
) -> float:
    """HBM bytes one decode step of ``batch`` sequences reads (see the module doc).

    Args:
      config: the model.
      batch: sequences decoded together (B).
      kv_len: cached positions each sequence attends to, the new token included.
      param_bytes: bytes per stored parameter (2 for bf16).
      kv_bytes: bytes per KV-cache element.
    """
    h, v = config.hidden_size, config.vocab_size
    table_unread = 0 if config.tie_word_embeddings else v * h
    weights = (param_count(config) - table_unread + batch * h) * param_bytes
    kv = batch * kv_len * config.num_layers * 2 * config.num_kv_heads * config.head_dim * kv_bytes
    return float(weights + kv)


def mfu(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``peak_flops`` (all devices' total);
    None when the peak is unknown (CPU, unlisted device)."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds} must be > 0")
    return None if not peak_flops else flops / seconds / peak_flops


def mbu(num_bytes: float, seconds: float, peak_bandwidth: float | None) -> float | None:
    """Memory-bandwidth utilisation: achieved bytes/s over ``peak_bandwidth`` (all devices);
    None when the peak is unknown."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds} must be > 0")
    return None if not peak_bandwidth else num_bytes / seconds / peak_bandwidth


def _device_peaks(device: Any) -> tuple[float, float] | None:
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    kind = str(device.device_kind).lower()
    for name, flops, bandwidth in _PEAKS:
        if name in kind:
            return flops, bandwidth
    if kind not in _warned_kinds:
        _warned_kinds.add(kind)
        log.warning(
            "no peak FLOP/s or bandwidth known for device kind %r; MFU/MBU not reported "
            "(pass the peak explicitly)",
            device.device_kind,
        )
    return None


def peak_flops_per_device(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (default: the first device); None for CPU and
    unknown kinds (H100/H200 989e12, A100 312e12, TPU v4 275e12, v5e 197e12, v5p 459e12,
    v6e 918e12)."""
    peaks = _device_peaks(device)
    return None if peaks is None else peaks[0]


def peak_bandwidth_per_device(device: Any = None) -> float | None:
    """Peak HBM bandwidth in bytes/s of ``device``; None for CPU and unknown kinds."""
    peaks = _device_peaks(device)
    return None if peaks is None else peaks[1]


def _dims(config: ModelConfig) -> tuple[int, int, int, int, int, int]:
    return (
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
    )
