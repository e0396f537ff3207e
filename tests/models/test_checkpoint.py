"""Hugging Face checkpoint I/O: round trips through transformers and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from atpo_jax import models
from atpo_jax.models.checkpoint import INDEX_FILE, SINGLE_FILE, hf_param_name
from tests.models.hf_reference import random_batch, save_torch_model, torch_logits


def _params(model: models.CausalLM) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, path)): np.asarray(var[...])
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return os.fspath(dst)


def _edit_config(path, **changes) -> None:
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(config_path, "w") as f:
        json.dump(raw, f)


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "llama3"])
def test_save_then_transformers_load_gives_same_logits(case, reference, ours, tmp_path):
    model = ours(case)
    models.save_pretrained(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32").eval()
    assert type(reloaded).__name__ == type(reference(case).torch_model).__name__

    ids, mask = random_batch(model.config.vocab_size, batch=3, length=9, padding="mixed", seed=5)
    real = mask.astype(bool)
    want = torch_logits(reference(case).torch_model, ids, mask)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask)[real], want[real], atol=1e-4)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "llama3"])
def test_our_load_of_our_save_is_bit_identical(case, ours, tmp_path):
    model = ours(case)
    models.save_pretrained(model, tmp_path)
    again = models.from_pretrained(tmp_path)
    before, after = _params(model), _params(again)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert again.config == model.config


def test_saved_tensor_names_and_layout_match_transformers(reference, ours, tmp_path):
    """Same tensor names, shapes and values as transformers' own export (tied lm_head omitted)."""
    for case in ("qwen3", "qwen2"):
        out = tmp_path / case
        models.save_pretrained(ours(case), out)
        mine = load_file(os.path.join(out, SINGLE_FILE))
        theirs = load_file(os.path.join(reference(case).path, SINGLE_FILE))
        assert sorted(mine) == sorted(theirs)
        for name, array in theirs.items():
            np.testing.assert_array_equal(mine[name], array, err_msg=name)


def test_sharded_save_writes_index_and_round_trips(ours, tmp_path):
    model = ours("llama3")
    # A threshold below the largest tensor: every tensor lands in its own small shard or a group.
    models.save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert INDEX_FILE in files and SINGLE_FILE not in files and len(shards) > 2
    with open(tmp_path / INDEX_FILE) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _params(model).values())

    again = models.from_pretrained(tmp_path)
    for name, array in _params(model).items():
        np.testing.assert_array_equal(array, _params(again)[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32").eval()
    ids, _ = random_batch(model.config.vocab_size, batch=2, length=6, padding="none")
    np.testing.assert_allclose(
        torch_logits(reloaded, ids), np.asarray(model(jnp.asarray(ids))), atol=1e-4, rtol=1e-4
    )

    # Saving again unsharded into the same directory removes the old shards and index.
    models.save_pretrained(model, tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == [SINGLE_FILE]


def test_loads_transformers_sharded_checkpoint(reference, ours, tmp_path):
    ref = reference("qwen3")
    save_torch_model(ref.torch_model, tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / INDEX_FILE)
    loaded = models.from_pretrained(tmp_path)
    for name, array in _params(ours("qwen3")).items():
        np.testing.assert_array_equal(array, _params(loaded)[name], err_msg=name)


def test_dtype_options(reference, tmp_path):
    path = reference("qwen3").path
    bf16 = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in _params(bf16).values())
    ids = jnp.zeros((1, 4), jnp.int32)
    assert bf16(ids).dtype == jnp.bfloat16

    mixed = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(a.dtype == jnp.float32 for a in _params(mixed).values())
    assert mixed(ids).dtype == jnp.bfloat16

    # bf16 export: transformers reads it back as bf16, and our reload of it is bit-identical.
    models.save_pretrained(bf16, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    again = models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    for name, array in _params(bf16).items():
        np.testing.assert_array_equal(array, _params(again)[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(next(reloaded.parameters()).dtype) == "torch.bfloat16"


def test_checkpoint_dtype_reads_the_saved_dtype(reference, tmp_path):
    """What a run exports in by default: the dtype the starting checkpoint was saved in."""
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)  # transformers 4 writes torch_dtype, 5 writes dtype
    assert models.checkpoint_dtype(path) == (raw.get("torch_dtype") or raw["dtype"]) == "float32"
    mixed = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    models.save_pretrained(mixed, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert models.checkpoint_dtype(tmp_path / "bf16") == "bfloat16"
    _edit_config(path, torch_dtype=None, dtype="float16")  # the transformers 5 key
    assert models.checkpoint_dtype(path) == "float16"
    _edit_config(path, torch_dtype=None, dtype=None)
    assert models.checkpoint_dtype(path) is None


def test_save_rejects_unsupported_dtype(ours, tmp_path):
    with pytest.raises(ValueError, match="dtype int8 is not one of"):
        models.save_pretrained(ours("qwen3"), tmp_path, dtype=jnp.int8)
    assert not os.path.exists(tmp_path / SINGLE_FILE)


def test_config_round_trip_keeps_extra_keys(reference, ours, tmp_path):
    models.save_pretrained(ours("llama3"), tmp_path)
    with open(reference("llama3").path / "config.json") as f:
        original = json.load(f)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    for key in ("bos_token_id", "eos_token_id", "architectures", "initializer_range"):
        assert written[key] == original[key], key


def test_hf_param_name():
    assert hf_param_name(("embed_tokens", "embedding")) == ("model.embed_tokens.weight", False)
    assert hf_param_name(("layers", 1, "self_attn", "q_proj", "bias")) == (
        "model.layers.1.self_attn.q_proj.bias",
        False,
    )
    assert hf_param_name(("layers", 0, "self_attn", "k_norm", "scale")) == (
        "model.layers.0.self_attn.k_norm.weight",
        False,
    )
    assert hf_param_name(("lm_head", "kernel")) == ("lm_head.weight", True)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the key or tensor.


def test_missing_config_names_the_file(reference, tmp_path):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(models.ConfigError, match=r"ckpt/config\.json: config\.json not found"):
        models.from_pretrained(path)


def test_missing_directory(tmp_path):
    with pytest.raises(models.ConfigError, match="nowhere/config.json"):
        models.from_pretrained(tmp_path / "nowhere")


def test_missing_weights_file_names_the_directory(reference, tmp_path):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    os.remove(os.path.join(path, SINGLE_FILE))
    with pytest.raises(models.CheckpointError, match=r"ckpt: neither model\.safetensors nor"):
        models.from_pretrained(path)


def test_missing_shard_names_the_shard_and_index(reference, tmp_path):
    save_torch_model(reference("qwen3").torch_model, tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(models.CheckpointError) as err:
        models.from_pretrained(tmp_path)
    assert shard in str(err.value) and INDEX_FILE in str(err.value)
    assert "missing" in str(err.value)


def test_shape_mismatch_names_tensor_file_and_config(reference, tmp_path):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    _edit_config(path, intermediate_size=80)
    with pytest.raises(models.CheckpointError) as err:
        models.from_pretrained(path)
    message = str(err.value)
    # Parameters are checked in sorted path order, so down_proj ([hidden, intermediate]) is first.
    assert "'model.layers.0.mlp.down_proj.weight' has shape [32, 64]" in message
    assert SINGLE_FILE in message and "config.json implies [32, 80]" in message


def test_unsupported_model_type_names_key_and_file(reference, tmp_path):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    _edit_config(path, model_type="mistral")
    with pytest.raises(models.ConfigError, match=r"config\.json: unsupported model_type 'mistral'"):
        models.from_pretrained(path)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters.rope_type 'yarn'",
        ),
        ({"num_key_value_heads": 3}, "num_attention_heads .4. must be a multiple"),
    ],
)
def test_unsupported_features_name_the_key(reference, tmp_path, changes, pattern):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    _edit_config(path, **changes)
    with pytest.raises(models.ConfigError, match=r"config\.json: .*" + pattern):
        models.from_pretrained(path)


def test_missing_required_key(reference, tmp_path):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    del raw["hidden_size"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(models.ConfigError, match="required key 'hidden_size' is missing"):
        models.from_pretrained(path)


def test_missing_and_unexpected_tensors(reference, tmp_path):
    path = _copy(reference("qwen3").path, tmp_path / "ckpt")
    weights = os.path.join(path, SINGLE_FILE)
    tensors = load_file(weights)

    extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": np.zeros((64, 32), np.float32)})
    save_file(extra, weights, metadata={"format": "pt"})
    with pytest.raises(models.CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        models.from_pretrained(path)

    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(models.CheckpointError, match=r"tensor 'model\.norm\.weight' is missing"):
        models.from_pretrained(path)


def test_ignores_rotary_buffers_and_duplicate_tied_head(reference, ours, tmp_path):
    """Old exports carry rotary inv_freq buffers and tied models sometimes an lm_head copy."""
    path = _copy(reference("qwen2").path, tmp_path / "ckpt")
    weights = os.path.join(path, SINGLE_FILE)
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    loaded = models.from_pretrained(path)
    for name, array in _params(ours("qwen2")).items():
        np.testing.assert_array_equal(array, _params(loaded)[name], err_msg=name)


def test_save_is_jit_and_device_agnostic(ours, tmp_path):
    """Parameters that were produced under jit (e.g. after an update step) save fine."""
    model = ours("qwen3_tied")
    graphdef, state = nnx.split(model)
    state = jax.jit(lambda s: jax.tree.map(lambda x: x * 1.0, s))(state)
    models.save_pretrained(nnx.merge(graphdef, state), tmp_path)
    names = set(load_file(os.path.join(tmp_path, SINGLE_FILE)))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
