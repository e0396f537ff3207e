"""Parameter, FLOP and byte counts: vs transformers, vs our model, vs hand computation and XLA."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.train import flops
from tests.models.hf_reference import CASES, build_torch_model
from tests.models.test_config import QWEN3_4B


@pytest.mark.parametrize("case", ["qwen3", "qwen3_tied", "qwen2", "llama3", "llama_linear"])
def test_param_count_matches_transformers_and_our_model(case):
    torch_model = build_torch_model(CASES[case])
    config = models.ModelConfig.from_hf_dict(torch_model.config.to_dict())
    assert flops.param_count(config) == torch_model.num_parameters()
    ours = models.CausalLM(config, rngs=nnx.Rngs(0))
    n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert flops.param_count(config) == n_ours


def test_param_count_of_qwen3_4b():
    # 4,022,468,096: the published checkpoint's safetensors total_size (8,044,936,192 bytes) / 2.
    assert flops.param_count(models.ModelConfig.from_hf_dict(QWEN3_4B)) == 4_022_468_096


# L=2, H=8, N=4, K=2, D=4, F=16, V=32, untied, no biases.
TINY = models.ModelConfig(
    model_type="llama",
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
)


def test_forward_flops_by_hand():
    # Per layer: q 8*16=128, k 8*8=64, v 64, o 16*8=128, mlp 3*8*16=384 -> 768; x2 layers = 1536;
    # lm_head 8*32 = 256 -> P_mm = 1792. Attention: 4 * L(2) * N(4) * D(4) * c = 128 c.
    assert flops.matmul_param_count(TINY) == 1792
    assert flops.forward_flops_per_token(TINY, 0) == 2 * 1792
    assert flops.forward_flops_per_token(TINY, 10) == 2 * 1792 + 128 * 10
    assert flops.train_flops_per_token(TINY, 10) == 3 * (2 * 1792 + 1280)
    # Tying keeps the lm_head matmul (and only drops the parameter count).
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert flops.matmul_param_count(tied) == 1792
    assert flops.param_count(TINY) - flops.param_count(tied) == 256


def test_sequence_flops_is_the_sum_over_causal_positions():
    for seq_len in (0, 1, 7, 64):
        want = sum(flops.forward_flops_per_token(TINY, t + 1) for t in range(seq_len))
        assert flops.forward_flops_for_sequence(TINY, seq_len) == pytest.approx(want)


def test_formula_agrees_with_xla_cost_analysis():
    config = models.ModelConfig(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    )
    graphdef, state = nnx.split(models.CausalLM(config, rngs=nnx.Rngs(0)))
    batch, length = 2, 64
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    cost = forward.lower(state, jnp.zeros((batch, length), jnp.int32)).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    causal = batch * flops.forward_flops_for_sequence(config, length)
    full = batch * length * flops.forward_flops_per_token(config, length)
    # XLA counts the elementwise work we leave out (a few %), and may compute the masked upper
    # triangle of the scores (full context) or skip it (causal).
    assert 0.99 * causal <= xla <= 1.05 * full


def test_decode_bytes_by_hand():
    # Untied: every weight but the embedding table is read, plus its B gathered rows (H each).
    # Tied: the table is read whole as the lm_head.
    n = flops.param_count(TINY)
    kv = 3 * 20 * 2 * 2 * 2 * 4 * 1  # B * kv_len * L * 2 * K * D * kv_bytes
    assert flops.decode_bytes_per_step(TINY, 3, 20, 2, 1) == (n - 32 * 8 + 3 * 8) * 2 + kv
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    n_tied = flops.param_count(tied)
    assert flops.decode_bytes_per_step(tied, 3, 20, 2, 1) == (n_tied + 3 * 8) * 2 + kv


def test_mfu_and_mbu():
    assert flops.mfu(2e12, 2.0, 1e12) == pytest.approx(1.0)
    assert flops.mfu(1e12, 4.0, 1e12) == pytest.approx(0.25)
    assert flops.mbu(3e9, 1.5, 4e9) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, None) is None
    assert flops.mbu(1e12, 1.0, None) is None
    with pytest.raises(ValueError, match="seconds=0"):
        flops.mfu(1.0, 0, 1e12)


@dataclasses.dataclass
class FakeDevice:
    platform: str
    device_kind: str


@pytest.mark.parametrize(
    ("device", "peak_flops", "peak_bandwidth"),
    [
        (FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), 989e12, 3.35e12),
        (FakeDevice("gpu", "NVIDIA H100 PCIe"), 756e12, 2.0e12),
        (FakeDevice("gpu", "NVIDIA H200"), 989e12, 4.8e12),
        (FakeDevice("gpu", "NVIDIA A100-SXM4-80GB"), 312e12, 2.039e12),
        (FakeDevice("tpu", "TPU v4"), 275e12, 1.2e12),
        (FakeDevice("tpu", "TPU v5 lite"), 197e12, 0.819e12),
        (FakeDevice("tpu", "TPU v5p"), 459e12, 2.765e12),
        (FakeDevice("tpu", "TPU v6 lite"), 918e12, 1.64e12),
        (FakeDevice("cpu", "cpu"), None, None),
        (FakeDevice("gpu", "Some Future GPU"), None, None),
    ],
)
def test_peak_table(device, peak_flops, peak_bandwidth):
    assert flops.peak_flops_per_device(device) == peak_flops
    assert flops.peak_bandwidth_per_device(device) == peak_bandwidth


def test_peak_of_this_cpu_is_unknown():
    assert flops.peak_flops_per_device() is None
