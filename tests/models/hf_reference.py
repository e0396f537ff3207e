"""Tiny random transformers (PyTorch) reference models, built in-test; nothing is downloaded.

Every parameter is re-drawn (norm weights around 1, biases non-zero, weights large enough that the
logits are O(1)), so a mis-mapped tensor, a swapped q/k norm or a dropped bias changes the logits far
beyond the 1e-4 tolerance.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
import transformers

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5


def rope_kwargs(theta: float, scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """RoPE settings in the layout the installed transformers expects (5.x: ``rope_parameters``)."""
    if _TRANSFORMERS_V5:
        rope_type = scaling["rope_type"] if scaling else "default"
        return {"rope_parameters": {**(scaling or {}), "rope_type": rope_type, "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": scaling}


@dataclasses.dataclass(frozen=True)
class Case:
    """One architecture under test: transformers config class name and its kwargs."""

    name: str
    config_class: str
    model_class: str
    kwargs: dict[str, Any]


CASES = {
    # Qwen3: q/k norm, GQA 4:1, head_dim 16 != hidden/heads (8), untied embeddings.
    "qwen3": Case(
        "qwen3",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            vocab_size=160,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=False,
            **rope_kwargs(10000.0),
        ),
    ),
    # Qwen3 with tied embeddings and GQA 2:1.
    "qwen3_tied": Case(
        "qwen3_tied",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
            **rope_kwargs(1000000.0),
        ),
    ),
    # Qwen2.5: q/k/v biases, GQA 3:1, tied embeddings (as the small Qwen2.5 models).
    "qwen2": Case(
        "qwen2",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            vocab_size=150,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **rope_kwargs(1000000.0),
        ),
    ),
    # Llama 3.1: llama3 RoPE scaling whose bands all matter at these lengths, GQA 4:1,
    # head_dim 16 != hidden/heads (8), untied embeddings.
    "llama3": Case(
        "llama3",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
            **rope_kwargs(
                500000.0,
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
        ),
    ),
    # Llama with linear RoPE scaling, plain multi-head attention, tied embeddings.
    "llama_linear": Case(
        "llama_linear",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            **rope_kwargs(10000.0, {"rope_type": "linear", "factor": 2.0}),
        ),
    ),
}


def build_torch_model(case: Case, seed: int = 0) -> torch.nn.Module:
    """A float32 transformers model of ``case`` with every parameter randomised (eval mode)."""
    config = getattr(transformers, case.config_class)(**case.kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(0.15 * noise)
    return model


def save_torch_model(model: torch.nn.Module, directory: str | os.PathLike, **kwargs: Any) -> None:
    """``save_pretrained`` as safetensors (the transformers 4.x default is too, but be explicit)."""
    model.save_pretrained(os.fspath(directory), safe_serialization=True, **kwargs)


def torch_logits(
    model: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
) -> np.ndarray:
    """Reference logits [B, L, V]; positions count real tokens, as in ``generate`` with padding."""
    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        kwargs["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        kwargs["position_ids"] = torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0), dtype=torch.long)
    with torch.no_grad():
        return model(ids, **kwargs).logits.float().numpy()


def random_batch(
    vocab: int, batch: int, length: int, padding: str, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random ids [B, L] and a 0/1 mask for ``padding`` in none/ones/left/right/mixed/holes.

    ``none`` returns mask None; ``ones`` an all-ones mask; ``mixed`` gives rows with left padding,
    right padding and both (the layout of a prompt + response training row); ``holes`` masks
    random positions anywhere, including inside the sequence.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    if padding == "none":
        return ids, None
    mask = np.ones((batch, length), np.int32)
    if padding == "holes":
        mask = (rng.random((batch, length)) < 0.7).astype(np.int32)
        mask[:, 1] = 1  # at least one real token per row
    for b in range(batch if padding != "holes" else 0):
        pad = 1 + (b * 2) % (length // 2)
        if padding == "left" or (padding == "mixed" and b % 3 == 0):
            mask[b, :pad] = 0
        elif padding == "right" or (padding == "mixed" and b % 3 == 1):
            mask[b, length - pad :] = 0
        elif padding == "mixed":
            mask[b, :1] = 0
            mask[b, length - pad :] = 0
    if padding != "ones":
        ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask
