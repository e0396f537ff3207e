"""Model behaviour beyond transformers parity: remat, jit/grad, dtypes, random init, attention bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from atpo_jax import models
from tests.models.hf_reference import (
    CASES,
    build_torch_model,
    random_batch,
    save_torch_model,
    torch_logits,
)


def test_positions_from_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    want = [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2], [0, 1, 2, 3, 4]]
    np.testing.assert_array_equal(np.asarray(models.positions_from_mask(mask)), want)


def _loss(model, ids, mask):
    return jnp.sum(jnp.tanh(model(ids, mask)) * mask[..., None])


def test_remat_gives_same_logits_and_gradients(reference, ours):
    model = ours("qwen3")
    remat = models.from_pretrained(reference("qwen3").path, remat=True)
    assert remat.config.remat and not model.config.remat
    ids, mask = random_batch(model.config.vocab_size, batch=2, length=8, padding="left", seed=4)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    np.testing.assert_allclose(
        np.asarray(remat(ids, mask)), np.asarray(model(ids, mask)), atol=1e-6
    )
    got = nnx.jit(nnx.grad(_loss))(remat, ids, mask)
    want = nnx.jit(nnx.grad(_loss))(model, ids, mask)
    flat_got = dict(nnx.to_flat_state(got))
    for path, value in nnx.to_flat_state(want):
        np.testing.assert_allclose(
            np.asarray(flat_got[path][...]),
            np.asarray(value[...]),
            atol=1e-5,
            rtol=1e-5,
            err_msg=str(path),
        )


def test_jit_with_split_state_equals_eager(ours):
    """The pure-function style a trainer uses: split once, merge inside jit."""
    model = ours("llama3")
    graphdef, state = nnx.split(model)
    ids, mask = random_batch(model.config.vocab_size, batch=2, length=7, padding="right", seed=6)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    np.testing.assert_allclose(
        np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(mask))),
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
        atol=1e-5,
    )


def test_mixed_precision_gradients_are_float32(reference):
    model = models.from_pretrained(
        reference("qwen3_tied").path, dtype=jnp.bfloat16, param_dtype=jnp.float32
    )
    ids, mask = random_batch(model.config.vocab_size, batch=2, length=6, padding="left", seed=9)
    lp = nnx.jit(models.token_log_probs)(
        model, jnp.asarray(ids), jnp.asarray(np.roll(ids, -1, 1)), jnp.asarray(mask)
    )
    assert lp.dtype == jnp.float32 and np.isfinite(np.asarray(lp)).all()
    grads = nnx.jit(nnx.grad(_loss))(model, jnp.asarray(ids), jnp.asarray(mask))
    for path, value in nnx.to_flat_state(grads):
        assert value[...].dtype == jnp.float32, path
        assert np.isfinite(np.asarray(value[...])).all(), path


def test_random_init_shapes(ours):
    config = ours("llama3").config
    model = nnx.jit(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))()
    attn = model.layers[0].self_attn
    h, d = config.hidden_size, config.head_dim
    assert attn.q_proj.kernel.shape == (h, config.num_heads * d)
    assert attn.k_proj.kernel.shape == (h, config.num_kv_heads * d)
    assert model.lm_head.kernel.shape == (h, config.vocab_size)
    assert model(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, config.vocab_size)
    assert model.lm_head_weight().shape == (h, config.vocab_size)
    tied = nnx.jit(lambda: models.CausalLM(ours("qwen2").config, rngs=nnx.Rngs(0)))()
    assert not hasattr(tied, "lm_head")
    assert tied.lm_head_weight().shape == (tied.config.hidden_size, tied.config.vocab_size)


def test_llama_attention_bias_matches_transformers(tmp_path):
    """Llama / Qwen3 ``attention_bias=true`` puts biases on q, k, v and o."""
    case = CASES["llama_linear"]
    case = type(case)("llama_bias", case.config_class, case.model_class, {
        **case.kwargs, "attention_bias": True,
    })  # fmt: skip
    torch_model = build_torch_model(case, seed=3)
    assert torch_model.model.layers[0].self_attn.o_proj.bias is not None
    save_torch_model(torch_model, tmp_path)
    model = models.from_pretrained(tmp_path)
    assert model.config.qkv_bias and model.config.o_bias
    ids, mask = random_batch(model.config.vocab_size, batch=2, length=7, padding="left", seed=2)
    real = mask.astype(bool)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], torch_logits(torch_model, ids, mask)[real], atol=1e-4)


@pytest.mark.parametrize("case", ["qwen3", "llama3"])
def test_bfloat16_forward_tracks_float32(case, reference, ours):
    """bf16 compute is a rounding of the float32 model, not a different function."""
    bf16 = models.from_pretrained(reference(case).path, dtype=jnp.bfloat16)
    ids, mask = random_batch(bf16.config.vocab_size, batch=2, length=8, padding="left", seed=1)
    real = mask.astype(bool)
    lo = np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))[real]
    hi = np.asarray(ours(case)(jnp.asarray(ids), jnp.asarray(mask)))[real]
    assert np.corrcoef(lo.ravel(), hi.ravel())[0, 1] > 0.99
    assert transformers  # transformers is the float32 reference for `ours` (test_parity)
