"""config.json parsing: both transformers layouts, defaults, round trip, clear errors."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest

from atpo_jax import models
from tests.models.hf_reference import CASES

# The Qwen3-4B config.json as published (transformers 4.x layout), abridged to the keys that matter.
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

LLAMA31_ROPE_V4 = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_parses_published_qwen3_4b_config():
    config = models.ModelConfig.from_hf_dict(QWEN3_4B)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (36, 32, 8)
    assert config.head_dim == 128 != config.hidden_size // config.num_heads
    assert config.qk_norm and not config.qkv_bias and not config.o_bias
    assert config.tie_word_embeddings and config.rope_theta == 1e6 and config.rope_scaling is None
    assert config.extra["eos_token_id"] == 151645 and config.extra["max_window_layers"] == 36


def test_transformers_4_and_5_rope_layouts_agree():
    base = {k: v for k, v in QWEN3_4B.items() if not k.startswith("rope")}
    base["model_type"] = "llama"
    v4 = models.ModelConfig.from_hf_dict({**base, **LLAMA31_ROPE_V4})
    v5 = models.ModelConfig.from_hf_dict(
        {
            **base,
            "rope_parameters": {
                **LLAMA31_ROPE_V4["rope_scaling"],
                "rope_theta": LLAMA31_ROPE_V4["rope_theta"],
            },
        }
    )
    legacy_type_key = dict(LLAMA31_ROPE_V4["rope_scaling"])
    legacy_type_key["type"] = legacy_type_key.pop("rope_type")
    v4_type = models.ModelConfig.from_hf_dict(
        {**base, "rope_theta": 500000.0, "rope_scaling": legacy_type_key}
    )
    want = models.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    for config in (v4, v5, v4_type):
        assert config.rope_scaling == want and config.rope_theta == 500000.0


def test_defaults_for_omitted_keys():
    raw = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    config = models.ModelConfig.from_hf_dict(raw)
    assert config.num_kv_heads == 4 and config.head_dim == 4
    assert not config.tie_word_embeddings and config.rope_scaling is None
    qwen2 = models.ModelConfig.from_hf_dict({**raw, "model_type": "qwen2"})
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_hf_dict(case, ours):
    config = ours(case).config
    again = models.ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
    assert again == config


def test_runtime_options_and_hashability():
    config = models.ModelConfig.from_hf_dict(QWEN3_4B, dtype=jnp.bfloat16, remat=True)
    assert config.dtype == jnp.bfloat16 and config.remat
    assert hash(config) == hash(dataclasses.replace(config))
    assert config.replace(remat=False) != config
    assert "dtype" in config.to_hf_dict(torch_dtype="bfloat16")
    with pytest.raises(models.ConfigError, match="attention_impl 'flash'"):
        config.replace(attention_impl="flash")


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"model_type": "gemma"}, "unsupported model_type 'gemma'"),
        ({"model_type": None}, "unsupported model_type None"),
        ({"vocab_size": None}, "required key 'vocab_size' is missing"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor is required"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "rope_scaling.low_freq_factor is required",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"head_dim": 7}, "head_dim .7. must be even"),
    ],
)
def test_bad_configs_name_source_and_key(changes, pattern):
    with pytest.raises(models.ConfigError, match=r"^my/config\.json: .*" + pattern):
        models.ModelConfig.from_hf_dict({**QWEN3_4B, **changes}, source="my/config.json")


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(models.ConfigError, match="config.json: not valid JSON"):
        models.ModelConfig.from_json_file(tmp_path / "config.json")
