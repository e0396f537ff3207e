"""BERT-family bi-encoder (e5) as a Flax NNX module, loaded from a local Hugging Face checkpoint.

The architecture is transformers' ``BertModel`` without its pooler: word + absolute position +
token-type embeddings, LayerNorm, then post-LN encoder layers
(``x = LN(x + attn(x)); x = LN(x + out(act(inter(x))))``). The sentence embedding is the mean of
the last hidden states over the attention mask, L2-normalised (the e5 recipe; ALGORITHM.md §6.1):

    e = normalize(sum_t m_t h_t / sum_t m_t),     normalize(v) = v / max(||v||_2, 1e-12)

Numerics follow PyTorch so that float32 embeddings agree to rounding: LayerNorm with the biased
variance, softmax over keys with padding masked out, exact (erf) GELU for ``hidden_act="gelu"``.
LayerNorm, softmax and pooling run in float32 whatever the compute dtype.

Shape letters: B batch, L length, H hidden, N heads, D head size (H / N), F intermediate size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax.models.config import ConfigError
from atpo_jax.models.layers import matmul

CONFIG_NAME = "config.json"
_INIT = nnx.initializers.normal(stddev=0.02)
# hidden_act -> jax.nn.gelu's ``approximate`` (transformers' ACT2FN names).
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class BertCheckpointError(ValueError):
    """An encoder checkpoint directory lacks a file or holds tensors that do not fit its config."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` the encoder uses, plus the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_heads})"
            )
        if self.hidden_act not in _GELU:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(_GELU)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str, dtype: Any) -> BertConfig:
        """From a parsed ``config.json``; ``ConfigError`` naming ``source`` and the key otherwise."""
        if raw.get("model_type") != "bert":
            raise ConfigError(
                f"{source}: model_type {raw.get('model_type')!r} is not supported by the dense "
                "encoder; it reads BERT-family checkpoints (model_type 'bert', e.g. "
                "intfloat/e5-base-v2)"
            )
        position = raw.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ConfigError(
                f"{source}: position_embedding_type {position!r} is not supported (only 'absolute')"
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
            )
            if k not in raw
        ]
        if missing:
            raise ConfigError(f"{source}: required key {missing[0]!r} is missing")
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                num_layers=raw["num_hidden_layers"],
                num_heads=raw["num_attention_heads"],
                intermediate_size=raw["intermediate_size"],
                max_position_embeddings=raw.get("max_position_embeddings", 512),
                type_vocab_size=raw.get("type_vocab_size", 2),
                layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
                hidden_act=raw.get("hidden_act", "gelu"),
                pad_token_id=raw.get("pad_token_id") or 0,
                dtype=dtype,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with a [in, out] kernel (PyTorch ``Linear`` transposed)."""

    def __init__(self, n_in: int, n_out: int, *, dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(_INIT(rngs.params(), (n_in, n_out), dtype))
        self.bias = nnx.Param(jnp.zeros((n_out,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in the compute dtype."""
        return matmul(x.astype(self.dtype), self.kernel[...]) + self.bias[...]


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in float32 (biased var)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in ``x.dtype``."""
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        normed = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class BertLayer(nnx.Module):
    """One post-LN encoder layer: self-attention, then the GELU feed-forward block."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        h, f, dt = config.hidden_size, config.intermediate_size, config.dtype
        self.config = config
        self.query = Dense(h, h, dtype=dt, rngs=rngs)
        self.key = Dense(h, h, dtype=dt, rngs=rngs)
        self.value = Dense(h, h, dtype=dt, rngs=rngs)
        self.attention_out = Dense(h, h, dtype=dt, rngs=rngs)
        self.attention_norm = LayerNorm(h, config.layer_norm_eps, dtype=dt)
        self.intermediate = Dense(h, f, dtype=dt, rngs=rngs)
        self.output = Dense(f, h, dtype=dt, rngs=rngs)
        self.output_norm = LayerNorm(h, config.layer_norm_eps, dtype=dt)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L, H] hidden, [B, L] bool key mask -> [B, L, H].

        ``softmax_j(q_i . k_j / sqrt(D))`` over the real keys j only; scores and softmax in float32.
        """
        cfg = self.config
        b, length, _ = x.shape
        heads = (b, length, cfg.num_heads, cfg.head_dim)
        q = self.query(x).reshape(heads)
        k = self.key(x).reshape(heads)
        v = self.value(x).reshape(heads)
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (cfg.head_dim**-0.5)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        context = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, length, cfg.hidden_size)
        x = self.attention_norm(x + self.attention_out(context))
        inner = jax.nn.gelu(self.intermediate(x), approximate=_GELU[cfg.hidden_act])
        return self.output_norm(x + self.output(inner))


class BertEncoder(nnx.Module):
    """Embeddings + encoder layers (``BertModel`` without the pooler) and the e5 pooling.

    Build a random one with ``BertEncoder(config, rngs=nnx.Rngs(0))`` or load a checkpoint with
    :func:`load_bert`.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        h, dt = config.hidden_size, config.dtype
        self.config = config

        def table(rows: int) -> nnx.Param:
            return nnx.Param(_INIT(rngs.params(), (rows, h), dt))

        self.word_embeddings = table(config.vocab_size)
        self.position_embeddings = table(config.max_position_embeddings)
        self.token_type_embeddings = table(config.type_vocab_size)
        self.embeddings_norm = LayerNorm(h, config.layer_norm_eps, dtype=dt)
        self.layers = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_layers)])

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden states.

        Args:
          input_ids: [B, L] int token ids, right-padded (positions are 0..L-1, as in BERT).
          attention_mask: [B, L] 0/1, 1 = real token; padded keys are never attended to.
          token_type_ids: [B, L] int segment ids; None = all 0 (a single segment).

        Returns:
          [B, L, H] in the compute dtype; rows at padded positions are finite but meaningless.
        """
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (
            jnp.take(self.word_embeddings[...], input_ids, axis=0)
            + jnp.take(self.token_type_embeddings[...], token_type_ids, axis=0)
            + self.position_embeddings[...][:length][None]
        )
        x = self.embeddings_norm(x.astype(cfg.dtype))
        mask = attention_mask.astype(bool)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """[B, L] ids and mask -> [B, H] float32 unit-norm sentence embeddings (e5 pooling)."""
        return mean_pool_normalize(
            self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask
        )


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """e5 pooling: the masked mean over L, L2-normalised, in float32.

    Args:
      hidden: [B, L, H] hidden states.
      attention_mask: [B, L] 0/1.

    Returns:
      [B, H] float32 with ``||e_b|| = 1`` (a row without real tokens divides by 1, not 0, and
      gives the zero vector).
    """
    m = attention_mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    mean = summed / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------ checkpoints

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# Our per-layer module name -> the HF module path under ``encoder.layer.{i}.``.
_LAYER_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
_TOP_PARAMS = {
    ("word_embeddings",): "embeddings.word_embeddings.weight",
    ("position_embeddings",): "embeddings.position_embeddings.weight",
    ("token_type_embeddings",): "embeddings.token_type_embeddings.weight",
    ("embeddings_norm", "scale"): "embeddings.LayerNorm.weight",
    ("embeddings_norm", "bias"): "embeddings.LayerNorm.bias",
}
# Checkpoint tensors that are not part of the encoder: the pooler, pre-training heads, buffers.
_NOT_ENCODER = re.compile(
    r"^(pooler\.|cls\.|embeddings\.position_ids$|embeddings\.token_type_ids$)"
)


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """Our NNX parameter path -> (HF tensor name, whether it is stored transposed).

    >>> hf_name(("layers", 0, "query", "kernel"))
    ('encoder.layer.0.attention.self.query.weight', True)
    """
    parts = tuple(str(p) for p in path)
    if parts in _TOP_PARAMS:
        return _TOP_PARAMS[parts], False
    _, index, module, leaf = parts
    name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return f"encoder.layer.{index}.{_LAYER_MODULES[module]}.{name}", leaf == "kernel"


def _canonical(name: str) -> str:
    """HF tensor names as ``BertModel`` saves them: no ``bert.`` prefix (task models add it), and
    ``weight``/``bias`` for the ``gamma``/``beta`` of old TF-converted LayerNorms."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def weight_files(directory: str) -> list[str]:
    """The weight files of a checkpoint directory, in the order a loader reads them: one
    ``model.safetensors``, shards listed by ``model.safetensors.index.json``, else
    ``pytorch_model.bin`` (or its shards)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise BertCheckpointError(f"{index_path}: no 'weight_map' object")
            files = [os.path.join(directory, s) for s in sorted(set(weight_map.values()))]
            for file in files:
                if not os.path.isfile(file):
                    raise BertCheckpointError(
                        f"{file}: shard listed in {index_path} is missing; re-download the "
                        "checkpoint"
                    )
            return files
    raise BertCheckpointError(
        f"{directory}: no weights found (expected model.safetensors, pytorch_model.bin, or "
        "their sharded forms with an index.json); point the encoder setting at a Hugging Face "
        "checkpoint directory such as a local copy of intfloat/e5-base-v2"
    )


@contextlib.contextmanager
def _read_tensors(files: list[str]) -> Iterator[dict[str, Any]]:
    """``{canonical name: lazily read array}`` over safetensors or PyTorch weight files."""
    with contextlib.ExitStack() as stack:
        readers: dict[str, Any] = {}
        for file in files:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                handle = stack.enter_context(safe_open(file, framework="numpy"))
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    readers[_canonical(key)] = functools.partial(handle.get_tensor, key)
            else:
                for key, tensor in _torch_state_dict(file).items():
                    readers[_canonical(key)] = functools.partial(_torch_to_numpy, tensor)
        yield readers


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    return tensor.float().numpy()


def _torch_state_dict(file: str) -> dict[str, Any]:
    """A ``pytorch_model.bin`` state dict, read with ``weights_only=True`` (no pickled code runs)."""
    try:
        import torch
    except ImportError:
        raise BertCheckpointError(
            f"{file}: reading PyTorch .bin weights needs torch (pip install torch), or convert "
            "the checkpoint to safetensors with transformers' save_pretrained"
        ) from None
    return torch.load(file, map_location="cpu", weights_only=True)


def read_config(directory: str, dtype: Any = jnp.float32) -> BertConfig:
    """The :class:`BertConfig` of a checkpoint directory's ``config.json``."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path} not found: the encoder must be a local Hugging Face checkpoint directory "
            "(config.json + model.safetensors or pytorch_model.bin + the tokenizer files)"
        )
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return BertConfig.from_hf_dict(raw, path, dtype)


def load_bert(path: str | os.PathLike, dtype: Any = jnp.float32) -> BertEncoder:
    """Loads a local BERT checkpoint directory (e.g. ``intfloat/e5-base-v2``) as a
    :class:`BertEncoder` whose parameters are stored in ``dtype`` (inference only).

    Raises:
      ConfigError: ``config.json`` missing or not a supported BERT.
      BertCheckpointError: no weight file, a tensor missing, of the wrong shape, or an unexpected
        encoder tensor (names the file and the tensor).
    """
    directory = os.fspath(path)
    config = read_config(directory, dtype)
    files = weight_files(directory)
    abstract = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    filled = []
    with _read_tensors(files) as tensors:
        used = set()
        for param_path, variable in nnx.to_flat_state(state):
            name, transposed = hf_name(param_path)
            if name not in tensors:
                raise BertCheckpointError(
                    f"{directory}: tensor {name!r} is missing from {', '.join(files)}"
                )
            array = np.asarray(tensors[name]())
            array = array.T if transposed else array
            if array.shape != tuple(variable.shape):
                raise BertCheckpointError(
                    f"{directory}: tensor {name!r} has shape {list(array.shape)} but "
                    f"{CONFIG_NAME} implies {list(variable.shape)}"
                )
            filled.append((param_path, variable.replace(value=jnp.asarray(array, dtype))))
            used.add(name)
        unexpected = sorted(n for n in tensors if n not in used and not _NOT_ENCODER.match(n))
        if unexpected:
            raise BertCheckpointError(
                f"{directory}: {len(unexpected)} tensor(s) a BERT encoder with this "
                f"{CONFIG_NAME} does not have, e.g. {unexpected[:3]}; the checkpoint and its "
                "config disagree (or it is not a plain BERT)"
            )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
