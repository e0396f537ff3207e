"""Mesh construction, logical-axis rules, and sharded vs unsharded numerics (8 simulated devices)."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from atpo_jax import models
from atpo_jax import parallel as S
from atpo_jax.parallel.rules import spec_for
from atpo_jax.train import optimizer as opt
from tests.train.multidevice import run_python


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    """A mesh of any shape without devices: enough for computing PartitionSpecs in-process."""
    return AbstractMesh((data, fsdp, tensor), S.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def tiny_config(**changes) -> models.ModelConfig:
    base = dict(
        model_type="qwen2",  # q/k/v biases: 1-D leaves that must stay replicated
        vocab_size=160,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qkv_bias=True,
    )
    return models.ModelConfig(**{**base, **changes})


def abstract_params(config: models.ModelConfig):
    return nnx.state(nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0))), nnx.Param)


def specs_by_path(tree, mesh, **kwargs) -> dict[str, P]:
    specs = S.partition_specs(tree, mesh, **kwargs)
    leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    return {S.path_str(path).removesuffix("/value"): spec for path, spec in leaves}


# ----------------------------------------------------------------------------------------------
# Mesh shapes


@pytest.mark.parametrize(
    ("sizes", "devices", "want"),
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((2, 1, -1), 8, (2, 1, 4)),
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((1, -1, 1), 1, (1, 1, 1)),
        ((2, -1, 4), 256, (2, 32, 4)),
    ],
)
def test_mesh_shape_resolution(sizes, devices, want):
    config = S.MeshSettings(*sizes)
    assert S.resolve_mesh_shape(config, devices) == want


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (
            (1, 3, 1),
            r"mesh.data=1, mesh.fsdp=3, mesh.tensor=1: the axes multiply to 3 but there "
            r"are 8 devices",
        ),
        ((2, 2, 1), r"multiply to 4 but there are 8 devices \(set one axis to -1"),
        ((3, -1, 1), r"the fixed axes multiply to 3, which does not divide the 8 devices"),
        ((-1, -1, 1), r"at most one mesh axis may be -1"),
        ((0, -1, 1), r"mesh.data=0 must be a positive integer or -1"),
        ((1, 8.0, 1), r"mesh.fsdp=8.0 must be a positive integer or -1"),
        ((1, True, 1), r"mesh.fsdp=True must be a positive integer or -1"),
    ],
)
def test_bad_mesh_sizes_name_the_setting(sizes, message):
    with pytest.raises(ValueError, match=message):
        S.resolve_mesh_shape(dict(zip(S.MESH_AXES, sizes, strict=True)), 8)


def test_missing_mesh_axis_and_make_mesh_on_one_device():
    with pytest.raises(ValueError, match=r"train.mesh.tensor is missing"):
        S.resolve_mesh_shape({"data": 1, "fsdp": -1}, 8, prefix="train.mesh")
    mesh = S.make_mesh(S.MeshSettings(data=1, fsdp=-1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(ValueError, match="multiply to 2 but there are 1 devices"):
        S.make_mesh(S.MeshSettings(data=2, fsdp=1))


# ----------------------------------------------------------------------------------------------
# Logical-axis rules


def test_parameter_specs_follow_the_megatron_layout():
    specs = specs_by_path(abstract_params(tiny_config()), abstract_mesh(2, 2, 2))
    col, row = P("fsdp", "tensor"), P("tensor", "fsdp")
    assert specs["embed_tokens/embedding"] == row  # [V, H]: vocab over tensor
    assert specs["lm_head/kernel"] == col  # [H, V]
    assert specs["norm/scale"] == P()
    for layer in ("layers/0", "layers/1"):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert specs[f"{layer}/self_attn/{name}/kernel"] == col
            assert specs[f"{layer}/self_attn/{name}/bias"] == P()
        assert specs[f"{layer}/self_attn/o_proj/kernel"] == row
        assert specs[f"{layer}/mlp/gate_proj/kernel"] == col
        assert specs[f"{layer}/mlp/up_proj/kernel"] == col
        assert specs[f"{layer}/mlp/down_proj/kernel"] == row
        assert specs[f"{layer}/input_layernorm/scale"] == P()
        assert specs[f"{layer}/post_attention_layernorm/scale"] == P()
    assert len(specs) == 3 + 2 * 12  # every parameter got a spec


def test_tied_qwen3_has_no_lm_head_and_replicated_qk_norms():
    config = tiny_config(model_type="qwen3", qkv_bias=False, qk_norm=True, tie_word_embeddings=True)
    specs = specs_by_path(abstract_params(config), abstract_mesh(1, 4, 2))
    assert "lm_head/kernel" not in specs
    assert specs["layers/0/self_attn/q_norm/scale"] == P()
    assert specs["embed_tokens/embedding"] == P("tensor", "fsdp")


def test_non_divisible_dimension_falls_back_or_raises(caplog):
    # k/v projections have K*D = 2*8 = 16 outputs: not divisible by tensor=32; vocab 150 neither.
    params = abstract_params(tiny_config(vocab_size=150))
    mesh = abstract_mesh(1, 1, 32)
    with caplog.at_level(logging.WARNING, logger="atpo_jax.parallel.rules"):
        specs = specs_by_path(params, mesh)
    assert specs["layers/0/self_attn/k_proj/kernel"] == P("fsdp", None)
    assert specs["layers/0/self_attn/q_proj/kernel"] == P("fsdp", "tensor")  # 32 outputs
    assert specs["embed_tokens/embedding"] == P(None, "fsdp")
    assert "sharding fell back to replication" in caplog.text
    notes = S.sharding_fallbacks(params, mesh)
    assert any(
        "layers/0/self_attn/k_proj/kernel [32, 16]: dim 1 (heads, size 16) is not "
        "divisible by mesh axis 'tensor' of size 32" in n
        for n in notes
    )
    with pytest.raises(ValueError, match=r"cannot shard embed_tokens/embedding \[150, 32\]"):
        S.partition_specs(params, mesh, strict=True)


def test_an_array_without_declared_axes_is_an_error():
    """No silent replication: a matrix that declares nothing (a renamed or new module) fails,
    naming itself; scalars (optimizer counters) need no declaration."""
    mesh = abstract_mesh(1, 2, 2)
    with pytest.raises(S.UndeclaredAxesError, match=r"adapter/kernel \[4, 4\] declares no"):
        S.partition_specs({"adapter": {"kernel": np.zeros((4, 4))}}, mesh)
    assert specs_by_path({"count": np.int32(0)}, mesh) == {"count": P()}
    unknown = nnx.Param(np.zeros((4, 4)), logical_axes=("embed", "experts"))
    with pytest.raises(S.UndeclaredAxesError, match="logical axis 'experts' has no rule"):
        S.partition_specs({"w": unknown}, mesh)
    short = nnx.Param(np.zeros((4, 4)), logical_axes=("embed",))
    with pytest.raises(S.UndeclaredAxesError, match=r"declares 1 logical axes .* for 2 dims"):
        S.partition_specs({"w": short}, mesh)
    declared = nnx.Param(np.zeros((4, 4)), logical_axes=("embed", None))
    assert specs_by_path({"w": declared}, mesh) == {"w": P("fsdp", None)}


def test_every_model_parameter_declares_its_axes():
    for model_type in ("qwen3", "llama", "qwen2"):
        config = tiny_config(
            model_type=model_type, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3"
        )
        for tied in (True, False):
            params = abstract_params(config.replace(tie_word_embeddings=tied))
            S.partition_specs(params, abstract_mesh(1, 2, 2))  # raises on an undeclared one


def test_kv_cache_declares_its_axes():
    cache = jax.eval_shape(lambda: models.init_cache(tiny_config(), 8, 32))
    mesh = abstract_mesh(2, 2, 2)
    axes = cache.logical_axes()
    assert axes.k[0] == axes.v[0] == ("batch", "kv_heads", None, None)
    assert spec_for("k", (8, 2, 8, 32), axes.k[0], mesh) == P(
        ("data", "fsdp"), "tensor", None, None
    )
    # 6 slots do not split 4 ways: replicated on the batch axes, heads still split.
    assert spec_for("k", (6, 2, 8, 32), axes.k[0], mesh) == P(None, "tensor", None, None)


def test_optimizer_state_mirrors_the_parameters():
    params = abstract_params(tiny_config())
    mesh = abstract_mesh(2, 2, 2)
    tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-3))
    opt_state = jax.eval_shape(tx.init, params)
    param_specs = specs_by_path(params, mesh)
    state_specs = specs_by_path(opt_state, mesh)
    moments = 0
    for path, spec in state_specs.items():
        param_path = path.split("/mu/")[-1].split("/nu/")[-1]
        if "/mu/" in path or "/nu/" in path:
            moments += 1
            assert spec == param_specs[param_path], path
        else:
            assert spec == P(), path  # counters and flags
    assert moments == 2 * len(param_specs)


def test_batch_sharding_spec():
    mesh = S.make_mesh(S.MeshSettings(data=1, fsdp=-1))
    assert S.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert S.replicated(mesh).spec == P()
    batch = S.shard_batch({"ids": np.arange(6).reshape(3, 2)}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(6).reshape(3, 2))
    with pytest.raises(ValueError, match="batch leaf scalar has 0 rows"):
        S.shard_batch({"scalar": np.float32(1.0)}, mesh)


# ----------------------------------------------------------------------------------------------
# 8 simulated devices


def test_sharded_forward_and_train_step_match_unsharded():
    result = run_python(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        from atpo_jax import models
        from atpo_jax import parallel as S
        from atpo_jax.train import optimizer as opt

        # One layer keeps the eight compilations (XLA:CPU, 2 cores) to a few seconds each.
        config = models.ModelConfig(model_type="qwen2", vocab_size=160, hidden_size=32,
            intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
            qkv_bias=True)
        graphdef, params = nnx.split(models.CausalLM(config, rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 160, (8, 12)).astype(np.int32)
        targets = rng.integers(0, 160, (8, 12)).astype(np.int32)
        tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-3, grad_clip_norm=0.5))

        def forward(params, ids):
            return nnx.merge(graphdef, params)(ids)

        def loss_fn(params, ids, targets):
            log_probs = jax.nn.log_softmax(forward(params, ids).astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1))

        def train_step(params, opt_state, ids, targets):
            loss, grads = jax.value_and_grad(loss_fn)(params, ids, targets)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        ref_logits = jax.jit(forward)(params, ids)
        ref_params, _, ref_loss = jax.jit(train_step)(params, tx.init(params), ids, targets)

        out = {"devices": jax.device_count(), "meshes": {}}
        # Forward on three layouts; the (slower to compile) train step on the two main ones.
        for sizes in [(1, 8, 1), (2, 2, 2), (1, 1, 8)]:
            mesh = S.make_mesh(S.MeshSettings(*sizes))
            p_shard = S.param_shardings(mesh, params, strict=True)
            sharded = S.shard_params(params, mesh, strict=True)
            opt_state = tx.init(sharded)
            o_shard = S.param_shardings(mesh, opt_state, strict=True)
            opt_state = jax.device_put(opt_state, o_shard)
            b_ids, b_targets = S.shard_batch({"i": ids, "t": targets}, mesh).values()
            logits = jax.jit(forward, in_shardings=(p_shard, S.batch_sharding(mesh)))(
                sharded, b_ids)
            r = out["meshes"][str(sizes)] = {
                "mesh": list(mesh.devices.shape),
                "logits_err": float(jnp.max(jnp.abs(logits - ref_logits))),
                "ids_shard": list(b_ids.addressable_shards[0].data.shape),
            }
            if sizes not in [(1, 8, 1), (2, 2, 2)]:
                continue
            step = jax.jit(train_step,
                in_shardings=(p_shard, o_shard, S.batch_sharding(mesh), S.batch_sharding(mesh)),
                out_shardings=(p_shard, o_shard, S.replicated(mesh)))
            new_params, new_state, loss = step(sharded, opt_state, b_ids, b_targets)
            embed = new_params["embed_tokens"]["embedding"][...]
            r.update({
                "loss_err": abs(float(loss) - float(ref_loss)),
                "param_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                 zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params))),
                "embed_spec": list(embed.sharding.spec),
                "embed_shard": list(embed.addressable_shards[0].data.shape),
                "down_spec": list(new_params["layers"][0]["mlp"]["down_proj"]["kernel"][...]
                                  .sharding.spec),
                "mu_spec": [list(x.sharding.spec) for path, x in
                            jax.tree_util.tree_leaves_with_path(new_state)
                            if "mu/embed_tokens/embedding" in S.path_str(path)],
            })
        mesh = S.make_mesh(S.MeshSettings(data=2, fsdp=2, tensor=2))
        try:
            S.shard_batch({"ids": ids[:6]}, mesh)
        except ValueError as err:
            out["batch_error"] = str(err)
        sub = S.make_mesh(S.MeshSettings(data=1, fsdp=-1), devices=jax.devices()[:4])
        out["sub_mesh"] = [list(sub.devices.shape), sorted(d.id for d in sub.devices.flat)]
        out["ref_loss"] = float(ref_loss)
        emit(out)
        """
    )
    assert result["devices"] == 8
    assert len(result["meshes"]) == 3
    for sizes, r in result["meshes"].items():
        data, fsdp, tensor = eval(sizes)  # noqa: S307 - our own tuple literal
        assert r["mesh"] == [data, fsdp, tensor]
        assert r["logits_err"] < 1e-5, sizes
        assert r["ids_shard"] == [8 // (data * fsdp), 12]
        if "loss_err" not in r:
            continue
        assert r["loss_err"] < 1e-5, sizes
        assert r["param_err"] < 1e-5, sizes  # one AdamW step with clipping, same result
        assert r["embed_spec"] == ["tensor", "fsdp"]
        assert r["embed_shard"] == [160 // tensor, 32 // fsdp]
        assert r["down_spec"] == ["tensor", "fsdp"]
        assert r["mu_spec"] == [["tensor", "fsdp"]]  # Adam's mu of the embedding, like the param
    assert "loss_err" in result["meshes"]["(2, 2, 2)"]
    assert result["ref_loss"] > 4.0  # about log(160): a real, untrained loss
    assert "batch leaf ids has 6 rows" in result["batch_error"]
    assert "not divisible by data*fsdp = 4" in result["batch_error"]
    assert result["sub_mesh"] == [[1, 4, 1], [0, 1, 2, 3]]
