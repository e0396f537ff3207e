"""Hugging Face checkpoint I/O: ``config.json`` + ``*.safetensors`` <-> ``CausalLM``, without torch.

Parameter names map mechanically: our NNX path ``layers.3.self_attn.q_proj.kernel`` is the HF tensor
``model.layers.3.self_attn.q_proj.weight`` transposed (PyTorch ``Linear`` stores [out, in],
``nnx.Linear`` [in, out]); ``embedding`` and RMSNorm ``scale`` are HF ``weight`` as is; ``lm_head``
has no ``model.`` prefix and is absent when embeddings are tied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from atpo_jax.models.config import ModelConfig
from atpo_jax.models.model import CausalLM

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default "5GB" shard size

# Tensors some checkpoints carry that hold no learned state we need (old Llama exports saved the
# RoPE buffer; tied checkpoints sometimes duplicate the embedding as lm_head).
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")
_SHARD_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds tensors that do not fit its config.json."""


def hf_param_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """Maps an NNX parameter path to (HF tensor name, whether the array is stored transposed).

    >>> hf_param_name(("layers", 0, "mlp", "up_proj", "kernel"))
    ('model.layers.0.mlp.up_proj.weight', True)
    """
    *module, leaf = (str(p) for p in path)
    prefix = "" if module[0] == "lm_head" else "model."
    name = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return prefix + ".".join([*module, name]), leaf == "kernel"


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The dtype a Hugging Face checkpoint directory's tensors were saved in, from its
    ``config.json`` (``torch_dtype``, or ``dtype`` in transformers 5); None when it names none.

    A run that trains float32 master weights from a bfloat16 checkpoint exports in this dtype, so
    the exported policy has the size and dtype of the checkpoint it started from.
    """
    with open(os.path.join(os.fspath(path), CONFIG_NAME), encoding="utf-8") as f:
        raw = json.load(f)
    name = raw.get("torch_dtype") or raw.get("dtype")
    return name if name in ("float32", "bfloat16", "float16") else None


def _torch_dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_pretrained: dtype {name} is not one of float32, bfloat16, float16")
    return name


class _TensorSource:
    """Finds and reads the tensors of a checkpoint directory (one file, or shards with an index)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        self.files: dict[str, str] = {}  # tensor name -> file name
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(directory, shard)):
                    raise CheckpointError(
                        f"{os.path.join(directory, shard)}: shard listed in {index_path} is "
                        "missing; re-download or re-export the checkpoint"
                    )
            self.files = dict(weight_map)
            self.origin = index_path
        elif os.path.isfile(single_path):
            with safe_open(single_path, framework="numpy") as f:
                self.files = dict.fromkeys(f.keys(), SINGLE_FILE)
            self.origin = single_path
        else:
            raise CheckpointError(
                f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                "checkpoints are read; convert PyTorch .bin files with transformers' "
                "save_pretrained)"
            )
        self._handles: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self.files[name])

    def _handle(self, name: str) -> Any:
        file = self.files[name]
        if file not in self._handles:
            path = os.path.join(self.directory, file)
            self._handles[file] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._handles[file]


def from_pretrained(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    remat: bool = False,
    attention_impl: str = "xla",
) -> CausalLM:
    """Loads a local Hugging Face checkpoint directory into a ``CausalLM``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards plus
        ``model.safetensors.index.json``).
      dtype: compute dtype; also the parameter dtype unless ``param_dtype`` is given.
      param_dtype: storage dtype of the parameters (e.g. float32 master weights, bfloat16 compute).
      remat: gradient checkpointing per decoder layer.
      attention_impl: ``"xla"`` or ``"cudnn"`` (GPU flash attention; see ``ModelConfig``).

    Raises:
      ConfigError: config.json missing or describing an unsupported model (names file and key).
      CheckpointError: a shard or tensor missing, an unexpected tensor, or a tensor whose shape does
        not match config.json (names the file and the tensor).
    """
    directory = os.fspath(path)
    config_path = os.path.join(directory, CONFIG_NAME)
    config = ModelConfig.from_json_file(
        config_path,
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
        remat=remat,
        attention_impl=attention_impl,
    )
    # Build the module abstractly (no random init, no memory), then fill every parameter from disk.
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    filled = []
    with _TensorSource(directory) as source:
        used = set()
        for param_path, variable in nnx.to_flat_state(state):
            name, transposed = hf_param_name(param_path)
            if name not in source.files:
                raise CheckpointError(
                    f"{source.origin}: tensor {name!r} is missing (required by {config_path})"
                )
            expected = tuple(variable.shape[::-1] if transposed else variable.shape)
            got = source.shape(name)
            if got != expected:
                raise CheckpointError(
                    f"{source.file_of(name)}: tensor {name!r} has shape {list(got)} but "
                    f"{config_path} implies {list(expected)}"
                )
            array = source.read(name)
            array = array.T if transposed else array
            filled.append(
                (param_path, variable.replace(value=jnp.asarray(array, config.param_dtype)))
            )
            used.add(name)
        unexpected = sorted(
            n
            for n in source.files
            if n not in used
            and not _IGNORABLE.match(n)
            and not (n == "lm_head.weight" and config.tie_word_embeddings)
        )
        if unexpected:
            raise CheckpointError(
                f"{source.origin}: {len(unexpected)} tensor(s) not used by a "
                f"{config.model_type!r} model with this {CONFIG_NAME}, e.g. {unexpected[:3]}; the "
                "checkpoint and the config disagree"
            )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _host_array(value: jax.Array) -> np.ndarray:
    """Brings a (possibly multi-host sharded) parameter to this host as a NumPy array."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def _plan_shards(
    params: list[tuple[tuple[Any, ...], Any]], itemsize: int, max_shard_bytes: int
) -> list[list[tuple[tuple[Any, ...], Any]]]:
    """Groups parameters greedily, in order, into shards of at most ``max_shard_bytes`` (like
    transformers); a tensor larger than the threshold gets a shard of its own. Sizes come from
    shapes, so nothing is materialised before its shard is written."""
    shards: list[list[tuple[tuple[Any, ...], Any]]] = [[]]
    shard_bytes = 0
    for param_path, variable in params:
        nbytes = int(np.prod(variable.shape)) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((param_path, variable))
        shard_bytes += nbytes
    return shards


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: Any = None,
) -> None:
    """Writes ``model`` as a Hugging Face checkpoint directory that transformers and vLLM load.

    Writes ``config.json`` (the original keys plus ours) and ``model.safetensors``, or, when the
    tensors exceed ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors`` shards with
    ``model.safetensors.index.json``. Earlier ``model*.safetensors`` files in ``path`` are removed
    so a loader never mixes two exports. In a multi-host run every process must call this (sharded
    parameters are gathered collectively); only process 0 writes.

    Args:
      model: the model to export.
      path: output directory (created if needed).
      dtype: dtype of the written tensors; default the model's ``param_dtype``.
      max_shard_bytes: shard size threshold in bytes.
      tokenizer: optional tokenizer (``transformers`` object) saved alongside.
    """
    config = model.config
    dtype = config.param_dtype if dtype is None else dtype
    torch_dtype = _torch_dtype_name(dtype)
    directory = os.fspath(path)
    write = jax.process_index() == 0
    if write:
        os.makedirs(directory, exist_ok=True)
        for old in os.listdir(directory):
            if _SHARD_PATTERN.match(old) or old == INDEX_FILE:
                os.remove(os.path.join(directory, old))

    params = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shards = _plan_shards(params, jnp.dtype(dtype).itemsize, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(shards, start=1):
        file = (
            SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for param_path, variable in group:
            name, transposed = hf_param_name(param_path)
            # Every process joins the gather of sharded parameters; only process 0 writes.
            array = _host_array(variable[...]).astype(jnp.dtype(dtype))
            tensors[name] = np.ascontiguousarray(array.T if transposed else array)
            total += array.nbytes
        if write:
            save_file(tensors, os.path.join(directory, file), metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, file))
    if not write:
        return
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(torch_dtype=torch_dtype), f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
