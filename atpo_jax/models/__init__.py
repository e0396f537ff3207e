"""Flax NNX decoder LMs (Qwen3, Qwen2/2.5, Llama 3), Hugging Face checkpoint I/O, log-probs.

    from atpo_jax import models
    model = models.from_pretrained("/ckpt/Qwen3-4B", dtype=jnp.bfloat16)
    logits = model(input_ids, attention_mask)                    # [B, L] -> [B, L, V]
    log_probs = models.token_log_probs(model, input_ids, targets, mask)
    models.save_pretrained(model, "/out/policy")

The KV-cache API (``KVCache``, ``init_cache``, ``forward_with_cache``, ``fork_slots``,
``reset_slots``, ``gather_slots``, ``scatter_slots``) and the paged pool (``PagedKVCache``,
``init_paged_cache``, ``gather_pages``, ``scatter_pages``, ``copy_pages``) are what the rollout
engine builds on; see ``docs/models.md``.
"""

from atpo_jax.models.cache import (
    NULL_PAGE,
    KVCache,
    PagedKVCache,
    copy_pages,
    fork_slots,
    forward_with_cache,
    gather_pages,
    gather_slots,
    init_cache,
    init_paged_cache,
    reset_slots,
    scatter_pages,
    scatter_slots,
)
from atpo_jax.models.checkpoint import (
    CheckpointError,
    checkpoint_dtype,
    from_pretrained,
    save_pretrained,
)
from atpo_jax.models.config import ATTENTION_IMPLS, ConfigError, ModelConfig, RopeScaling
from atpo_jax.models.log_probs import log_probs_from_hidden, token_log_probs
from atpo_jax.models.model import CausalLM, compute_params, positions_from_mask
from atpo_jax.models.tokenizer import load_tokenizer

__all__ = [
    "ATTENTION_IMPLS",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "NULL_PAGE",
    "PagedKVCache",
    "RopeScaling",
    "checkpoint_dtype",
    "compute_params",
    "copy_pages",
    "fork_slots",
    "forward_with_cache",
    "from_pretrained",
    "gather_pages",
    "gather_slots",
    "init_cache",
    "init_paged_cache",
    "load_tokenizer",
    "log_probs_from_hidden",
    "positions_from_mask",
    "reset_slots",
    "save_pretrained",
    "scatter_pages",
    "scatter_slots",
    "token_log_probs",
]
