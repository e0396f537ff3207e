"""The trainer's update and credit programs against direct computations.

The update splits a mini-batch into micro-batches and accumulates weighted gradients; its result must
be the gradient of the kernel loss over the whole mini-batch (log-probs from the full forward). The
credit program must equal the GRPO formula (NumPy) and the kernels' tree chain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atpo_jax import kernels, models
from atpo_jax.rollout.pack import RowArrays, TreeArrays
from atpo_jax.train.credit import CreditSettings, assign_credit
from atpo_jax.train.policy import LossSettings, make_update_fn, policy_rows
from tests.kernels.numpy_reference import aggregation_weights

CONFIG = models.ModelConfig(
    model_type="llama",
    vocab_size=48,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
)
ROWS, PROMPT, RESPONSE = 6, 4, 10


def _rows(seed: int):
    rng = np.random.default_rng(seed)
    loss_mask = (rng.random((ROWS, RESPONSE)) < 0.6).astype(np.int32)  # several turns per row
    loss_mask[2] = 0  # an all-masked row: excluded by the seq-mean aggregations
    response = rng.integers(1, 48, (ROWS, RESPONSE))
    prompt_mask = np.ones((3, PROMPT), np.int32)
    prompt_mask[1, :2] = 0  # a left-padded prompt
    return policy_rows(
        rng.integers(1, 48, (3, PROMPT)),
        prompt_mask,
        np.repeat(np.arange(3), 2),
        response,
        loss_mask,
        advantages=rng.normal(size=(ROWS, RESPONSE)).astype(np.float32),
        # Old log-probs near the new ones, so some tokens are clipped and some are not.
        old_log_probs=rng.normal(-3.9, 0.3, (ROWS, RESPONSE)).astype(np.float32),
    )


def _direct_loss(model: models.CausalLM, rows, settings: LossSettings) -> jax.Array:
    """The kernel loss on log-probs gathered from the full-vocabulary forward of every row,
    minus the entropy bonus: entropy_coef x the full softmax's entropy, weighted per token as
    the aggregation weighs it."""
    logits = model(rows.input_ids, rows.attention_mask)[:, PROMPT - 1 : -1]
    log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32))
    log_probs = jnp.take_along_axis(log_softmax, rows.response[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_softmax) * log_softmax, axis=-1)
    weights = aggregation_weights(np.asarray(rows.loss_mask), str(settings.loss_agg))
    bonus = settings.entropy_coef * jnp.sum(entropy * weights)
    return _direct_policy_loss(log_probs, rows, settings) - bonus


def _direct_policy_loss(log_probs, rows, settings: LossSettings) -> jax.Array:
    args = (log_probs, rows.old_log_probs, rows.advantages, rows.loss_mask)
    common = dict(
        clip_low=settings.clip_low, clip_high=settings.clip_high, loss_agg=settings.loss_agg
    )
    if settings.policy_loss == "atpo":
        return kernels.atpo_policy_loss(*args, **common)[0]
    if settings.policy_loss == "gspo":
        return kernels.gspo_policy_loss(*args, **common)[0]
    return kernels.ppo_policy_loss(
        *args,
        dual_clip=settings.dual_clip,
        entropy_balanced_clipping=settings.entropy_balanced_clipping,
        **common,
    )[0]


@pytest.mark.parametrize(
    ("policy_loss", "loss_agg", "extra"),
    [
        ("atpo", "seq-mean-token-mean", {}),
        ("atpo", "token-mean", {}),
        ("atpo", "seq-mean-token-sum", {}),
        ("atpo", "seq-mean-token-sum-norm", {}),
        ("gspo", "seq-mean-token-mean", {}),
        ("ppo", "token-mean", {}),
        # The entropy bonus (its gradient through the chunked lm_head) and AEPO's clipping.
        ("atpo", "seq-mean-token-mean", {"entropy_coef": 0.5}),
        ("ppo", "token-mean", {"entropy_coef": 0.5, "entropy_balanced_clipping": True}),
    ],
)
def test_micro_batched_update_is_the_full_batch_gradient(policy_loss, loss_agg, extra):
    rows = jax.tree.map(jnp.asarray, _rows(0))
    settings = LossSettings(
        policy_loss=policy_loss, clip_low=0.2, clip_high=0.28, loss_agg=loss_agg, **extra
    )
    model = models.CausalLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def direct(p):
        return _direct_loss(nnx.merge(graphdef, p), rows, settings)

    loss, grads = jax.value_and_grad(direct)(params)
    assert float(optax.tree.norm(grads)) > 0
    if extra:  # the options change the gradient on these rows (a test that can fail)
        plain = LossSettings(
            policy_loss=policy_loss, clip_low=0.2, clip_high=0.28, loss_agg=loss_agg
        )
        plain_grads = jax.grad(lambda p: _direct_loss(nnx.merge(graphdef, p), rows, plain))(params)
        moved = optax.tree.norm(jax.tree.map(jnp.subtract, grads, plain_grads))
        assert float(moved) > 1e-3 * float(optax.tree.norm(grads))
    sgd = optax.sgd(1.0)  # new params = params - gradient
    # The options' cases check the options (one micro-batch split: the others check the splits).
    for micro_rows in (2,) if extra else (1, 2, ROWS):
        update = make_update_fn(graphdef, sgd, settings, micro_rows, donate=False)
        new_params, _, metrics = update(params, sgd.init(params), rows)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5, atol=1e-6)
        if "entropy_coef" in extra:
            # The bonus and the entropy metric aggregate the same entropies (equal under
            # token-mean), whatever the micro-batches.
            assert float(metrics["entropy_loss"]) > 0
            if loss_agg == "token-mean":
                np.testing.assert_allclose(metrics["entropy_loss"], metrics["entropy"], rtol=1e-5)
        np.testing.assert_allclose(
            metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4, atol=1e-7
        )
        for new, old, g in zip(
            jax.tree.leaves(new_params),
            jax.tree.leaves(params),
            jax.tree.leaves(grads),
            strict=True,
        ):
            np.testing.assert_allclose(old - new, g, rtol=1e-4, atol=1e-6)


def _rows_arrays(tree_index, leaf_node, token_node) -> RowArrays:
    """RowArrays with the fields credit reads (the token arrays are placeholders)."""
    rows, length = token_node.shape
    zeros = np.zeros((rows, length), np.int32)
    return RowArrays(
        prompt_tokens=np.zeros((1, 1), np.int32),
        prompt_mask=np.ones((1, 1), np.int32),
        response_tokens=zeros,
        loss_mask=zeros,
        token_node=np.asarray(token_node, np.int32),
        sampled_log_probs=zeros.astype(np.float32),
        tree_index=np.asarray(tree_index, np.int32),
        leaf_node=np.asarray(leaf_node, np.int32),
    )


def test_grpo_credit_is_the_group_z_score_on_response_tokens():
    rng = np.random.default_rng(2)
    samples, groups, length = 4, 3, 5
    rewards = rng.choice([-1.0, 0.0, 1.0], size=groups * samples).astype(np.float32)
    rewards[:samples] = 1.0  # a group with equal rewards: advantage 0, not NaN
    token_node = rng.integers(-1, 3, (groups * samples, length)).astype(np.int32)
    # Each group is a root with `samples` leaf children (nodes 1..samples); row i's leaf is i + 1.
    nodes = samples + 1
    parent = np.full((groups, nodes), 0, np.int32)
    parent[:, 0] = -1
    is_leaf = np.ones((groups, nodes), bool)
    is_leaf[:, 0] = False
    trees = TreeArrays(
        parent=parent,
        valid=np.ones((groups, nodes), bool),
        is_leaf=is_leaf,
        entropy=np.zeros((groups, nodes), np.float32),
        leaf_reward=np.zeros((groups, nodes), np.float32),
        depth=np.zeros((groups, nodes), np.int32),
    )
    rows = _rows_arrays(
        np.repeat(np.arange(groups), samples),
        np.tile(np.arange(1, samples + 1), groups),
        token_node,
    )
    trees = trees.with_leaf_rewards(rows, rewards)
    out = assign_credit(trees, rows, settings=CreditSettings(mode="grpo"), samples_per_tree=samples)
    expected = np.zeros((groups * samples, length), np.float32)
    for g in range(groups):
        r = rewards[g * samples : (g + 1) * samples].astype(np.float64)
        adv = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
        for i in range(samples):
            row = g * samples + i
            expected[row] = np.where(token_node[row] >= 0, adv[i], 0.0)
    np.testing.assert_allclose(out["advantages"], expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out["advantages"])[:samples] == 0)


def test_tree_credit_is_the_kernel_chain():
    # root 0 -> 1 -> {3, 4}; root -> 2 (leaf); one tree, three leaf rows.
    parent = jnp.array([[-1, 0, 0, 1, 1]])
    is_leaf = jnp.array([[False, False, True, True, True]])
    valid = jnp.ones((1, 5), bool)
    entropy = jnp.array([[0.0, 0.7, 0.2, 0.4, 0.9]])
    leaf_reward = jnp.array([[0.0, 0.0, 1.0, -1.0, 0.0]])
    token_node = jnp.array([[1, 1, 3, 3, -1], [2, 2, 2, -1, -1], [1, 1, 4, 4, 4]])
    trees = TreeArrays(
        parent=parent,
        valid=valid,
        is_leaf=is_leaf,
        entropy=entropy,
        leaf_reward=leaf_reward,
        depth=jnp.zeros((1, 5), jnp.int32),
    )
    rows = _rows_arrays(np.zeros(3, np.int32), np.array([3, 2, 4]), np.asarray(token_node))
    out = assign_credit(trees, rows, settings=CreditSettings(), samples_per_tree=3)
    z = kernels.normalize_leaf_rewards(leaf_reward, is_leaf, valid)
    values = kernels.tree_node_values(parent, is_leaf, z, entropy, valid, mode="child_softmax")
    node_adv = kernels.tree_node_advantages(values, parent, valid, mode="node_value")
    np.testing.assert_allclose(out["node_values"], values, rtol=1e-6)
    expected = np.where(token_node >= 0, np.asarray(node_adv)[0][np.maximum(token_node, 0)], 0)
    np.testing.assert_allclose(out["advantages"], expected, rtol=1e-6, atol=1e-7)
    # Hand check of the leaves: z-scores of (1, -1, 0) with the population std.
    np.testing.assert_allclose(np.asarray(z)[0, 2:], [1.2247449, -1.2247449, 0.0], rtol=1e-5)
