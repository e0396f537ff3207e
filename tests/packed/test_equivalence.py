"""``rows`` and ``tree`` packing compute what the padded layout computes: loss, metrics, gradients.

Random forests (depth up to 6, 1-8 children, shared and unshared prefixes, rows that end in the
prompt's first turn, empty rows) on a random float32 Qwen3. Two levels:

* For every loss x aggregation x credit x KL on/off: the per-row log-probs (and entropies) of each
  packed layout equal the padded layout's, and so do the loss, its metrics and the parameter
  gradient (each layout's jitted VJP applied to that loss's cotangent on the log-probs).
* The update programs themselves (``PackedUpdate`` against ``make_update_fn``), with micro-batch
  splits that differ between layouts: the same loss, metrics and gradient; and several
  mini-batches x ``ppo_epochs`` of AdamW end at the same weights.

Everything is float32 and compared at rtol 1e-5 (AdamW's weights: see that test).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.train.packed_update import PackedUpdate, packed_log_probs
from atpo_jax.train.packing import pack_mini_batch
from atpo_jax.train.policy import (
    LossSettings,
    loss_from_log_probs,
    make_update_fn,
    mini_batch_totals,
    policy_rows,
    response_log_probs,
)
from tests.packed.random_trees import random_forest

CONFIG = models.ModelConfig(
    model_type="qwen3",
    vocab_size=48,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
)
SEED = 3
BUDGET = 96  # small enough that trees are cut into pieces and rows spread over micro-batches
RTOL = 1e-5


def _model():
    return nnx.split(models.CausalLM(CONFIG, rngs=nnx.Rngs(0)))


def _padded(batch, ref):
    return policy_rows(
        batch.prompt_tokens,
        batch.prompt_mask,
        batch.tree_index,
        batch.response,
        batch.loss_mask,
        advantages=batch.advantages,
        old_log_probs=batch.old_log_probs,
    ).replace(ref_log_probs=ref)


def _packed(batch, ref, mode, budget=BUDGET):
    packed = pack_mini_batch(batch, mode, budget=budget)
    refs = packed.rows_layout(ref)
    micro = [m.replace(ref_log_probs=r) for m, r in zip(packed.micro, refs, strict=True)]
    return packed, micro


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _close_trees(got, want, what):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        _close(g, w, f"{what} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def forest():
    graphdef, params = _model()
    batches = {c: random_forest(SEED, trees=3, max_nodes=14, credit=c) for c in ("tree", "grpo")}
    batch, ref = batches["tree"]
    lengths = batch.row_lengths()
    turns = [np.sum(np.diff(np.r_[0, m]) == 1) for m in batch.loss_mask]
    assert np.any(lengths == 0), "the forest must have an empty row"
    assert any(t == 1 and n > 0 for t, n in zip(turns, lengths, strict=True))
    assert len(set(batch.tree_index.tolist())) == 3 and batch.num_rows > 3
    return graphdef, params, batches


def _vjp_program(graphdef, fn):
    """Jitted (log-probs, entropy, vjp of the log-probs) of ``fn(model, batch)``."""

    @jax.jit
    def run(params, batch, cotangent):
        def log_probs(p):
            return fn(nnx.merge(graphdef, p), batch, return_entropy=True)

        (lp, entropy), vjp = jax.vjp(log_probs, params)
        return lp, entropy, vjp((cotangent, jnp.zeros_like(entropy)))[0]

    return run


@pytest.fixture(scope="module")
def layouts(forest):
    """Per layout, a function ``cotangent [rows, R] -> (log-probs, entropies, param grads)``."""
    graphdef, params, batches = forest
    batch, ref = batches["tree"]  # the log-probs do not depend on the advantages
    padded_program = _vjp_program(graphdef, response_log_probs)
    packed_program = _vjp_program(graphdef, packed_log_probs)
    padded = _padded(batch, ref)

    def padded_fn(cotangent):
        return padded_program(params, padded, jnp.asarray(cotangent))

    def packed_fn(mode):
        packed, micro = _packed(batch, ref, mode)
        assert len(micro) > 1

        def run(cotangent):
            lp = np.zeros(batch.response.shape, np.float32)
            entropy = np.zeros_like(lp)
            grads = None
            for m, ids, ct in zip(
                micro, packed.row_ids, packed.rows_layout(cotangent), strict=True
            ):
                mlp, ment, g = packed_program(params, m, jnp.asarray(ct))
                lp[ids], entropy[ids] = np.asarray(mlp)[: len(ids)], np.asarray(ment)[: len(ids)]
                grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            return lp, entropy, grads

        return run

    return {"padded": padded_fn, "rows": packed_fn("rows"), "tree": packed_fn("tree")}


@pytest.mark.parametrize("kl", [0.0, 0.05], ids=["no_kl", "kl"])
@pytest.mark.parametrize("credit", ["tree", "grpo"])
@pytest.mark.parametrize(
    "loss_agg",
    ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"],
)
@pytest.mark.parametrize("policy_loss", ["atpo", "gspo", "ppo"])
def test_each_loss_is_the_same_in_every_layout(forest, layouts, policy_loss, loss_agg, credit, kl):
    _, _, batches = forest
    batch, ref = batches[credit]
    rows = _padded(batch, ref)
    settings = LossSettings(
        policy_loss=policy_loss, loss_agg=loss_agg, kl_coef=kl, clip_low=0.2, clip_high=0.28
    )

    @jax.jit
    def loss_and_cotangent(lp, entropy):
        grad, (loss, metrics) = jax.grad(
            lambda x: (lambda out: (out[0], out))(loss_from_log_probs(x, entropy, rows, settings)),
            has_aux=True,
        )(lp)
        return loss, metrics, grad

    zero = np.zeros(batch.response.shape, np.float32)
    results = {}
    for name, run in layouts.items():
        lp, entropy, _ = run(zero)
        loss, metrics, cotangent = loss_and_cotangent(jnp.asarray(lp), jnp.asarray(entropy))
        _, _, grads = run(np.asarray(cotangent))
        results[name] = (lp, entropy, loss, metrics, grads)
    want = results["padded"]
    mask = batch.loss_mask != 0
    for name in ("rows", "tree"):
        lp, entropy, loss, metrics, grads = results[name]
        _close(lp[mask], want[0][mask], f"{name} log-probs")
        _close(entropy[mask], want[1][mask], f"{name} entropies")
        _close(loss, want[2], f"{name} loss")
        for key, value in want[3].items():
            _close(metrics[key], value, f"{name} {key}")
        _close_trees(grads, want[4], f"{name} gradient")
    assert float(optax.tree.norm(want[4])) > 0


def _capture_gradients() -> optax.GradientTransformation:
    """An 'optimizer' that leaves the weights alone and keeps the gradient as its state."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )


@pytest.mark.parametrize(
    "policy_loss, loss_agg, credit, kl, layouts_checked, extra",
    [
        ("atpo", "seq-mean-token-mean", "tree", 0.05, ("rows", "tree"), {}),
        ("ppo", "token-mean", "grpo", 0.0, ("rows", "tree"), {}),
        ("gspo", "seq-mean-token-sum-norm", "grpo", 0.05, ("tree",), {}),
        ("atpo", "seq-mean-token-sum", "tree", 0.0, ("tree",), {}),
        # The entropy bonus: its gradient reaches a shared token once per row that holds it.
        (
            "ppo",
            "seq-mean-token-mean",
            "grpo",
            0.05,
            ("tree",),
            {"entropy_coef": 0.1, "entropy_balanced_clipping": True},
        ),
    ],
)
def test_update_programs_agree(forest, policy_loss, loss_agg, credit, kl, layouts_checked, extra):
    graphdef, params, batches = forest
    batch, ref = batches[credit]
    settings = LossSettings(
        policy_loss=policy_loss,
        loss_agg=loss_agg,
        kl_coef=kl,
        kl_kind="mse" if loss_agg.endswith("norm") else "low_var_kl",
        clip_low=0.2,
        clip_high=0.28,
        **extra,
    )
    opt = _capture_gradients()
    micro_rows = next(m for m in (4, 3, 2, 1) if batch.num_rows % m == 0)
    padded = make_update_fn(graphdef, opt, settings, micro_rows, donate=False)
    _, want_grads, want = padded(params, opt.init(params), _padded(batch, ref))
    totals = mini_batch_totals(batch.loss_mask, settings.loss_agg)
    for mode in layouts_checked:
        _, micro = _packed(batch, ref, mode)
        update = PackedUpdate(graphdef, opt, settings, donate=False)
        _, grads, got = update(params, opt.init(params), micro, totals)
        assert update.programs == 1 and len(micro) > 1
        assert set(got) == set(want)
        for key in want:
            _close(got[key], want[key], f"{mode} {key}")
        _close_trees(grads, want_grads, f"{mode} gradient")


def test_mini_batches_and_epochs_of_adamw_end_at_the_same_weights(forest):
    graphdef, params, batches = forest
    settings = LossSettings(kl_coef=0.05, clip_low=0.2, clip_high=0.28)
    opt = optax.adamw(1e-3, weight_decay=0.01)
    minis = [random_forest(seed, trees=2, max_nodes=10, width=48) for seed in (7, 8)]
    micro_rows = 1
    padded = make_update_fn(graphdef, opt, settings, micro_rows, donate=False)
    packed = PackedUpdate(graphdef, opt, settings, donate=False)
    results = {}
    for name in ("padded", "tree"):
        p, state = params, opt.init(params)
        for _epoch in range(2):
            for batch, ref in minis:
                if name == "padded":
                    p, state, _ = padded(p, state, _padded(batch, ref))
                else:
                    totals = mini_batch_totals(batch.loss_mask, settings.loss_agg)
                    p, state, _ = packed(p, state, _packed(batch, ref, "tree")[1], totals)
        results[name] = p
    moved = max(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), results["padded"], params)
        )
    )
    assert moved > 1e-3
    # Adam divides by the root of the second moment: where a gradient element is near zero, its
    # 1e-6 relative rounding difference grows in the step. The gradients themselves agree at rtol
    # 1e-5 (above); the weights are compared to 1e-3 of the distance they moved.
    for g, w in zip(
        jax.tree.leaves(results["tree"]), jax.tree.leaves(results["padded"]), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=RTOL, atol=1e-3 * float(moved)
        )
