"""The policy model's settings (the ``model`` section of a run's config)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from atpo_jax.settings import StrEnum, check, coerce_choices


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def jnp(self) -> Any:
        return jnp.dtype(self.value)


class AttentionImpl(StrEnum):
    XLA = "xla"  # the portable grouped kernel (CPU, GPU, TPU)
    CUDNN = "cudnn"  # jax.nn.dot_product_attention's cuDNN flash kernel (CUDA GPUs only)


class ModelType(StrEnum):
    QWEN3 = "qwen3"
    QWEN2 = "qwen2"
    LLAMA = "llama"


@dataclasses.dataclass(frozen=True)
class RandomModelSettings:
    """The shape of a randomly initialised policy (used when ``model.path`` is empty).

    Attributes:
      model_type: ``qwen3`` (q/k norms), ``qwen2`` (q/k/v biases) or ``llama``.
      hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim: the
        decoder's shape (the vocabulary comes from the tokenizer).
      tie_word_embeddings: the output projection is the transposed embedding.
    """

    model_type: ModelType = ModelType.QWEN3
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        coerce_choices(self, "model.random")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            value = getattr(self, name)
            check(value >= 1, f"model.random.{name}={value} must be >= 1")
        check(
            self.head_dim % 2 == 0,
            f"model.random.head_dim={self.head_dim} must be even (rotary embeddings turn pairs "
            "of dimensions)",
        )
        check(
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"model.random.num_kv_heads={self.num_kv_heads} must divide "
            f"model.random.num_heads={self.num_heads}",
        )


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which policy to train and how it computes.

    Attributes:
      path: a local Hugging Face checkpoint directory (``config.json`` + safetensors); empty: a
        random model of shape ``random``.
      dtype: compute dtype (matmul inputs, activations, KV cache); norms, softmax and RoPE always
        run in float32.
      param_dtype: storage dtype of the master weights and the optimizer state. Keep float32:
        at the paper's learning rate (1e-6) bfloat16 masters round most updates away.
      remat: recompute each decoder layer in the backward pass (``nnx.remat``).
      attention_impl: the training/scoring attention kernel: ``xla`` (anywhere) or ``cudnn``
        (flash attention, CUDA GPUs only). Decoding always uses the XLA kernel.
      random: the shape of a random policy.
    """

    path: str = ""
    dtype: DType = DType.FLOAT32
    param_dtype: DType = DType.FLOAT32
    remat: bool = False
    attention_impl: AttentionImpl = AttentionImpl.XLA
    random: RandomModelSettings = RandomModelSettings()

    def __post_init__(self) -> None:
        coerce_choices(self, "model")

    def check_backend(self) -> None:
        """What only the running process can tell (not checked on construction, which must not
        start a JAX backend before ``jax.distributed.initialize``)."""
        check(
            self.attention_impl != AttentionImpl.CUDNN or jax.default_backend() == "gpu",
            f"model.attention_impl='cudnn' needs a CUDA GPU but JAX runs on "
            f"{jax.default_backend()!r}; use model.attention_impl=xla",
        )

    def runtime(self) -> dict[str, Any]:
        """The ``ModelConfig`` runtime options these settings choose."""
        return dict(
            dtype=self.dtype.jnp,
            param_dtype=self.param_dtype.jnp,
            remat=self.remat,
            attention_impl=str(self.attention_impl),
        )
