"""Packed updates on an 8-device simulated mesh equal the padded update on one device.

A child process with 8 CPU devices builds a random forest and a random Qwen3 (float32), runs the
padded update on one device (the reference), and the ``tree`` and ``rows`` updates and scoring
passes on an ``fsdp=8`` and a ``data=2, fsdp=4, tensor=1`` mesh (each layout on each mesh once
over the two losses) (eight sequences per micro-batch,
one per device; parameters and gradients sharded): loss, metrics, log-probs and gradients agree
at rtol 1e-5.
"""

from __future__ import annotations

from tests.train.multidevice import run_python


def test_packed_updates_on_a_mesh_equal_the_padded_update():
    result = run_python(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        from atpo_jax import models, parallel
        from atpo_jax.train.packing import pack_mini_batch
        from atpo_jax.train.packed_update import PackedUpdate, make_packed_log_prob_fn
        from atpo_jax.train.policy import (
            LossSettings, make_log_prob_fn, make_update_fn, mini_batch_totals, policy_rows)
        from tests.packed.random_trees import random_forest
        from tests.packed.test_equivalence import CONFIG, _capture_gradients, _padded

        graphdef, params = nnx.split(models.CausalLM(CONFIG, rngs=nnx.Rngs(0)))
        batch, ref = random_forest(5, trees=4, max_nodes=12, credit="grpo")
        opt = _capture_gradients()
        out = {"rows": batch.num_rows, "cases": {}}
        cases = [("atpo", "seq-mean-token-mean", 0.05, [((1, 8, 1), "tree"), ((2, 4, 1), "rows")]),
                 ("ppo", "token-mean", 0.0, [((2, 4, 1), "tree"), ((1, 8, 1), "rows")])]
        for loss, agg, kl, layouts in cases:
            settings = LossSettings(policy_loss=loss, loss_agg=agg, kl_coef=kl,
                                    clip_low=0.2, clip_high=0.28)
            rows = _padded(batch, ref)
            want_lp = np.asarray(make_log_prob_fn(graphdef, 1)(params, rows))
            _, want_grads, want = make_update_fn(graphdef, opt, settings, 1, donate=False)(
                params, opt.init(params), rows)
            totals = mini_batch_totals(batch.loss_mask, agg)
            for sizes, mode in layouts:
                mesh = parallel.make_mesh(parallel.MeshSettings(*sizes))
                sharded = parallel.shard_params(params, mesh)
                state = jax.jit(opt.init, out_shardings=parallel.param_shardings(mesh, params))(
                    sharded)
                score = make_packed_log_prob_fn(graphdef, mesh=mesh)
                packed = pack_mini_batch(batch, mode, budget=64, sequences=8)
                refs = packed.rows_layout(ref)
                micro = [parallel.shard_batch(m.replace(ref_log_probs=r), mesh)
                         for m, r in zip(packed.micro, refs)]
                lp = np.zeros_like(want_lp)
                for m, ids in zip(micro, packed.row_ids):
                    lp[ids] = np.asarray(score(sharded, m))[: len(ids)]
                update = PackedUpdate(graphdef, opt, settings, mesh=mesh, donate=False)
                _, grads, got = update(sharded, state, micro, totals)
                mask = batch.loss_mask != 0
                scale = {k: max(abs(float(v)), 1e-30) for k, v in want.items()}
                out["cases"][f"{loss} {sizes} {mode}"] = {
                    "micro": len(micro),
                    "lp_err": float(np.max(np.abs(lp - want_lp)[mask])),
                    "metric_errs": {k: abs(float(got[k]) - float(want[k])) / scale[k]
                                    for k in want},
                    "grad_err": max(
                        float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30))
                        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads))),
                    "grad_spec": str(jax.tree.leaves(grads)[0].sharding.spec),
                }
        emit(out)
        """,
        timeout=300,
    )
    assert len(result["cases"]) == 4
    for name, case in result["cases"].items():
        assert case["micro"] >= 1, name
        assert case["lp_err"] < 1e-5, name
        assert max(case["metric_errs"].values()) < 1e-5, (name, case["metric_errs"])
        assert case["grad_err"] < 1e-5, name
