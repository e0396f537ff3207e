"""Checkpointer: round trips, keep/every policy, incomplete saves, SIGTERM, resharding."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity

from atpo_jax import models
from atpo_jax.train import checkpointing as C
from atpo_jax.train import optimizer as opt
from tests.train import runs
from tests.train.multidevice import REPO_ROOT, run_python, subprocess_env

TINY = models.ModelConfig(
    model_type="qwen3",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
)


def _train_state(seed: int) -> dict:
    """A realistic state: nnx params, the real optimizer's state after one update, keys, ints."""
    params = nnx.state(models.CausalLM(TINY, rngs=nnx.Rngs(seed)), nnx.Param)
    tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-2))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), params)
    _, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.fold_in(jax.random.key(seed), 7),
        "legacy_rng": jax.random.PRNGKey(seed + 100),
        "step": 10 + seed,
        "data_position": 640 + seed,
        "extra": {"history": np.arange(5, dtype=np.int64) * seed, "loss_scale": 2.0},
    }


def _zeros_like_state(state: dict) -> dict:
    target = jax.tree.map(
        lambda x: x if C.is_typed_key(x) else jnp.zeros_like(x),
        {k: state[k] for k in ("params", "opt_state", "legacy_rng")},
    )
    return {
        **target,
        "rng": jax.random.key(0),
        "step": 0,
        "data_position": 0,
        "extra": {"history": np.zeros(5, np.int64), "loss_scale": 0.0},
    }


def _assert_bitwise_equal(got, want):
    got_leaves, got_def = jax.tree.flatten(C.keys_to_data(got))
    want_leaves, want_def = jax.tree.flatten(C.keys_to_data(want))
    assert got_def == want_def
    for a, b in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype


def test_round_trip_of_a_training_state(tmp_path):
    state = _train_state(1)
    with C.Checkpointer(tmp_path, save_every=5) as ckpt:
        assert ckpt.save(5, state)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        assert ckpt.item_names(5) == sorted(state)
        restored = ckpt.restore(target=_zeros_like_state(state))
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["opt_state"], type(state["opt_state"]))
    assert C.is_typed_key(restored["rng"])
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    assert restored["step"] == 11 and restored["data_position"] == 641
    assert isinstance(restored["extra"]["history"], np.ndarray)
    assert isinstance(restored["params"]["lm_head"]["kernel"][...], jax.Array)
    _assert_bitwise_equal(restored, state)
    # The restored key generates the same numbers.
    np.testing.assert_array_equal(
        np.asarray(jax.random.uniform(restored["rng"], (3,))),
        np.asarray(jax.random.uniform(state["rng"], (3,))),
    )
    assert int(opt.nonfinite_skips(restored["opt_state"])) == 0
    assert int(opt.applied_updates(restored["opt_state"])) == 1


def test_restore_a_subset_of_items(tmp_path):
    state = _train_state(2)
    with C.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(3, state)
        target = {"params": jax.tree.map(jnp.zeros_like, state["params"]), "step": 0}
        restored = ckpt.restore(3, target=target)
    assert sorted(restored) == ["params", "step"]
    _assert_bitwise_equal(restored["params"], state["params"])


def test_save_policy_keep_and_duplicates(tmp_path):
    state = {"x": jnp.arange(3.0), "step": 0}
    with C.Checkpointer(tmp_path, keep=2, save_every=2, async_save=False) as ckpt:
        assert [ckpt.save(s, state) for s in (1, 2, 3, 4)] == [False, True, False, True]
        assert ckpt.save(5, state, force=True)  # e.g. on SIGTERM
        assert not ckpt.save(5, state, force=True)  # already there: not written twice
        assert ckpt.save(6, state)
        assert ckpt.all_steps() == [5, 6]
    assert sorted(os.listdir(tmp_path)) == ["5", "6"]
    with C.Checkpointer(tmp_path / "forced", save_every=0) as ckpt:
        assert not ckpt.save(10, state) and ckpt.save(10, state, force=True)


def test_errors(tmp_path):
    ckpt = C.Checkpointer(tmp_path, save_every=1)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        ckpt.restore(target={"x": jnp.zeros(2)})
    ckpt.save(1, {"x": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 9 .*have \[1\]"):
        ckpt.restore(9, target={"x": jnp.zeros(2)})
    with pytest.raises(KeyError, match=r"has no item\(s\) \['params'\]; it has \['x'\]"):
        ckpt.restore(1, target={"params": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"item 'x': leaf \['f'\] has type object"):
        ckpt.save(2, {"x": {"a": jnp.ones(2), "f": object()}})
    with pytest.raises(ValueError, match="non-empty dict"):
        ckpt.save(2, {})
    with pytest.raises(TypeError, match="concrete key array"):
        ckpt.restore(1, target={"x": jax.ShapeDtypeStruct((), jax.random.key(0).dtype)})
    ckpt.close()
    with pytest.raises(ValueError, match="keep=0"):
        C.Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="save_every=-1"):
        C.Checkpointer(tmp_path, save_every=-1)


def test_key_helpers_round_trip():
    for impl in ("threefry2x32", "rbg"):
        key = jax.random.key(3, impl=impl)
        data = C.key_to_data(key)
        assert data.dtype == jnp.uint32
        back = C.key_from_data(data, impl)
        np.testing.assert_array_equal(jax.random.key_data(back), data)
        tree = {"k": jax.random.split(key, 4), "n": jnp.ones(2)}
        stored = C.keys_to_data(tree)
        assert stored["k"].shape == (4, *data.shape) and not C.is_typed_key(stored["k"])
        restored = C.keys_from_data(stored, tree)
        assert jax.random.key_impl(restored["k"]) == jax.random.key_impl(key)
        np.testing.assert_array_equal(jax.random.key_data(restored["k"]), stored["k"])
    with pytest.raises(TypeError, match="expected a typed PRNG key"):
        C.key_to_data(jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------------------------
# Incomplete saves


def test_a_save_in_flight_is_not_reported(tmp_path, monkeypatch):
    gate = threading.Event()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def gated_finalize(self, *args, **kwargs):
        await asyncio.to_thread(gate.wait, 60)
        return await finalize(self, *args, **kwargs)

    with C.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, {"x": jnp.ones(2)})
        ckpt.wait()
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", gated_finalize)
        assert ckpt.save(2, {"x": jnp.full(2, 2.0)})
        assert ckpt.latest_step() == 1  # step 2 is still being written
        # Nor seen by a reader in another process (read_only: it must not clean up the live
        # save's temporary directory).
        reader = C.Checkpointer(tmp_path, read_only=True)
        assert reader.latest_step() == 1
        with pytest.raises(RuntimeError, match="read_only"):
            reader.save(3, {"x": jnp.ones(2)}, force=True)
        gate.set()
        ckpt.wait()
        assert ckpt.latest_step() == 2


def test_leftover_temporary_directory_is_ignored_and_removed(tmp_path):
    with C.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(4, {"x": jnp.full(2, 4.0)})
    # What a save of step 6 killed while writing leaves behind.
    partial = tmp_path / "6.orbax-checkpoint-tmp" / "x"
    partial.mkdir(parents=True)
    (partial / "garbage").write_bytes(b"\0" * 10)
    with C.Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.latest_step() == 4
        np.testing.assert_array_equal(ckpt.restore(target={"x": jnp.zeros(2)})["x"], [4.0, 4.0])
        assert ckpt.save(6, {"x": jnp.full(2, 6.0)})
        ckpt.wait()
        assert ckpt.latest_step() == 6
        np.testing.assert_array_equal(ckpt.restore(target={"x": jnp.zeros(2)})["x"], [6.0, 6.0])
    assert sorted(os.listdir(tmp_path)) == ["4", "6"]


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=subprocess_env(devices=1),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_process_killed_mid_save_leaves_the_last_complete_checkpoint(tmp_path):
    ready = tmp_path / "finalizing"
    proc = _spawn(
        f"""
        import asyncio, pathlib
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from atpo_jax.train.checkpointing import Checkpointer

        ckpt = Checkpointer({str(tmp_path / "ckpt")!r}, save_every=1)
        ckpt.save(1, {{"x": jnp.full(3, 1.0), "step": 1}})
        ckpt.wait()

        async def hang(self, *args, **kwargs):  # every file is written; the commit never comes
            pathlib.Path({str(ready)!r}).touch()
            while True:
                await asyncio.sleep(1)

        atomicity.AtomicRenameTemporaryPath.finalize = hang
        ckpt.save(2, {{"x": jnp.full(3, 2.0), "step": 2}})
        ckpt.wait()
        """
    )
    try:
        runs.wait_for(ready.exists, proc, timeout=90, what="the hanging save")
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2.orbax-checkpoint-tmp"]
    with C.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 1
        restored = ckpt.restore(target={"x": jnp.zeros(3), "step": 0})
    np.testing.assert_array_equal(restored["x"], [1.0, 1.0, 1.0])
    assert restored["step"] == 1


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(tmp_path):
    proc = _spawn(
        f"""
        import time
        import jax.numpy as jnp
        from atpo_jax.train.checkpointing import Checkpointer, install_sigterm_handler

        ckpt = Checkpointer({str(tmp_path)!r}, save_every=1000)
        step, x = 0, jnp.zeros(2)

        def save_now():
            ckpt.save(step, {{"x": x, "step": step}}, force=True)
            ckpt.close()
            print("saved", step, flush=True)

        shutdown = install_sigterm_handler(save_now)
        try:
            for step in range(1, 100_000):
                x = jnp.full(2, float(step))
                ckpt.save(step, {{"x": x, "step": step}})
                print("step", step, flush=True)
                time.sleep(0.02)
                shutdown.check()
        finally:
            print("finally ran", flush=True)
        """
    )
    lines: list[str] = []

    def read_until_step_3() -> bool:
        lines.append(proc.stdout.readline().strip())
        return lines[-1] == "step 3"

    runs.wait_for(read_until_step_3, proc, timeout=90, what="step 3")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    lines += out.split("\n")
    assert proc.returncode == 0, err[-4000:]
    last_step = max(int(line.split()[1]) for line in lines if line.startswith("step "))
    assert f"saved {last_step}" in lines and "finally ran" in lines
    with C.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == last_step
        restored = ckpt.restore(target={"x": jnp.zeros(2), "step": 0})
    assert restored["step"] == last_step
    np.testing.assert_array_equal(restored["x"], [last_step, last_step])


def test_shutdown_request_in_process():
    before = signal.getsignal(signal.SIGTERM)
    calls = []
    shutdown = C.install_sigterm_handler(lambda: calls.append("saved"), exit_code=3)
    try:
        shutdown.check()  # nothing requested: no-op
        assert not shutdown.requested and calls == []
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not shutdown.requested and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert shutdown.requested
        with pytest.raises(SystemExit) as exit_info:
            shutdown.check()
        assert exit_info.value.code == 3 and calls == ["saved"]
    finally:
        shutdown.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before

    errors = []
    thread = threading.Thread(
        target=lambda: errors.append(_catch(lambda: C.install_sigterm_handler(None)))
    )
    thread.start()
    thread.join()
    assert "main thread" in str(errors[0])


def _catch(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - returned for the assertion
        return err
    return None


# ----------------------------------------------------------------------------------------------
# Resharding (8 simulated devices in a subprocess)


def test_restore_onto_a_different_mesh_and_one_device(tmp_path):
    result = run_python(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
        from atpo_jax import models
        from atpo_jax import parallel as sharding
        from atpo_jax.train.checkpointing import Checkpointer

        config = models.ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=32,
            intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
        params = nnx.state(models.CausalLM(config, rngs=nnx.Rngs(0)), nnx.Param)
        mesh8 = sharding.make_mesh(sharding.MeshSettings(data=1, fsdp=8))
        saved = {{
            "params": sharding.shard_params(params, mesh8),
            "table": jax.device_put(jnp.arange(64.0).reshape(16, 4),
                                    NamedSharding(mesh8, P("fsdp", None))),
        }}
        kernel = saved["params"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
        out = {{"saved_spec": list(kernel.sharding.spec),
                "saved_shards": len(kernel.addressable_shards)}}
        with Checkpointer({str(tmp_path)!r}, save_every=1) as ckpt:
            ckpt.save(1, saved)
            ckpt.wait()

            mesh = sharding.make_mesh(sharding.MeshSettings(data=2, fsdp=1, tensor=4))
            shardings = sharding.param_shardings(mesh, params)
            target = {{
                "params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=s), params, shardings),
                "table": jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                              sharding=NamedSharding(mesh, P(None, "tensor"))),
            }}
            resharded = ckpt.restore(target=target)
            one = SingleDeviceSharding(jax.devices()[5])
            single = ckpt.restore(target=jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), saved))

        def equal(a, b):
            return all(np.array_equal(np.asarray(x), np.asarray(y))
                       for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

        def shardings_of(tree):
            return [x.sharding for x in jax.tree.leaves(tree)]

        out["mesh_equal"] = equal(resharded, saved)
        out["mesh_shardings_match"] = (shardings_of(resharded["params"])
                                       == jax.tree.leaves(shardings))
        out["table_spec"] = list(resharded["table"].sharding.spec)
        out["resharded_spec"] = list(
            resharded["params"]["layers"][0]["mlp"]["up_proj"]["kernel"][...].sharding.spec)
        out["single_equal"] = equal(single, saved)
        out["single_devices"] = sorted({{d.id for x in jax.tree.leaves(single)
                                         for d in x.devices()}})
        emit(out)
        """
    )
    assert result["saved_spec"] == ["fsdp", "tensor"]
    assert result["saved_shards"] == 8
    assert result["mesh_equal"] and result["single_equal"]
    assert result["mesh_shardings_match"]
    assert result["resharded_spec"] == ["fsdp", "tensor"]  # fsdp has size 1 on this mesh
    assert result["table_spec"] == [None, "tensor"]
    assert result["single_devices"] == [5]


# --------------------------------------------------------------------------------------------
# Integrity


@pytest.mark.parametrize(
    "array",
    [
        np.linspace(-3, 3, 35, dtype=np.float32).reshape(5, 7),
        np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4).astype(jnp.bfloat16),
        np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        np.array([True, False, True]),
        np.array(2.5, np.float32),
    ],
    ids=["f32", "bf16", "int32", "bool", "scalar"],
)
def test_checksum_is_the_weighted_sum_of_the_bits(array):
    # Hand formula: sum_i bits(x_i) * (2 i + 1) mod 2^32, i the row-major position.
    flat = np.asarray(array).reshape(-1)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize]
    bits = flat.astype(np.uint8) if flat.dtype == np.bool_ else flat.view(width)
    want = sum(int(b) * (2 * i + 1) for i, b in enumerate(bits)) % 2**32
    assert C.numpy_checksum(np.asarray(array)) == want
    assert int(C._weighted_sum(jnp.asarray(array))) == want
    assert int(jax.jit(C._weighted_sum)(jnp.asarray(array))) == want


def test_checksum_sees_one_changed_element_and_a_swap():
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 32)), np.float32)
    base = C.numpy_checksum(x)
    flipped = x.copy()
    flipped.view(np.uint32)[17, 3] ^= 1  # one bit of one weight
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert C.numpy_checksum(flipped) != base
    assert C.numpy_checksum(swapped) != base


def _garble(path, offset: int | None = None) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + 16, len(data))):
        data[i] ^= 0x5A
    with open(path, "wb") as f:
        f.write(bytes(data))


def _largest_file(directory) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


@pytest.fixture
def two_steps(tmp_path):
    state = _train_state(3)
    with C.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    return tmp_path, state


@pytest.mark.parametrize("damage", ["params_data", "params_manifest", "params_metadata"])
def test_damaged_files_are_an_error_naming_the_step(two_steps, damage):
    directory, state = two_steps
    params = directory / "2" / "params"
    if damage == "params_data":
        _garble(_largest_file(params / "d"))
    elif damage == "params_manifest":
        _garble(params / "manifest.ocdbt", offset=0)
    else:
        _garble(params / "_METADATA", offset=0)
    ckpt = C.Checkpointer(directory, read_only=True)
    with pytest.raises(C.CheckpointError, match=r"checkpoint step 2 in .* cannot be read") as err:
        ckpt.restore(2, target=_zeros_like_state(state))
    assert err.value.step == 2
    # The step before is untouched and restores exactly.
    _assert_bitwise_equal(ckpt.restore(1, target=_zeros_like_state(state)), state)


def test_values_that_differ_from_the_saved_ones_fail_verification(two_steps, monkeypatch):
    # Damage the storage layer cannot see (its own checks pass): one weight's bits change.
    directory, state = two_steps
    ckpt = C.Checkpointer(directory, read_only=True)
    read = ckpt._manager.restore

    def tampered(step, args):
        out = dict(read(step, args=args))
        if "params" in out:  # not the read of the integrity record alone
            kernel = out["params"]["lm_head"]["kernel"]
            kernel[...] = kernel[...].at[0, 0].add(1.0)
        return out

    monkeypatch.setattr(ckpt._manager, "restore", tampered)
    with pytest.raises(C.CheckpointError, match=r"step 2: params.*lm_head.*kernel.* differs"):
        ckpt.restore(2, target=_zeros_like_state(state))


def test_a_checkpoint_without_an_integrity_record_restores_with_a_warning(two_steps, caplog):
    directory, state = two_steps
    import shutil

    shutil.rmtree(directory / "2" / C.CHECKSUM_ITEM)  # as saved before integrity records
    ckpt = C.Checkpointer(directory, read_only=True)
    with caplog.at_level("WARNING", logger=C.__name__):
        restored = ckpt.restore(2, target=_zeros_like_state(state))
    _assert_bitwise_equal(restored, state)
    assert "no integrity record" in caplog.text


def test_quarantine_moves_a_step_aside(two_steps):
    directory, _ = two_steps
    ckpt = C.Checkpointer(directory, save_every=1)
    moved = ckpt.quarantine(2)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert os.path.dirname(moved) == f"{directory}_damaged"
    assert "params" in os.listdir(moved)
    ckpt.close()


def test_a_target_that_does_not_fit_is_a_settings_error_not_damage(tmp_path):
    with C.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, {"params": {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, "step": 1})
    ckpt = C.Checkpointer(tmp_path, read_only=True)
    other = {"params": {"w": jnp.zeros((4, 2)), "b": jnp.zeros(3)}, "step": 0}
    with pytest.raises(
        C.CheckpointMismatchError, match=r"params\['w'\] was saved with shape \(4, 3\)"
    ):
        ckpt.restore(1, target=other)
    renamed = {"params": {"v": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, "step": 0}
    with pytest.raises(C.CheckpointMismatchError, match=r"holds no params\['v'\]"):
        ckpt.restore(1, target=renamed)
    from atpo_jax.settings import ConfigError

    assert issubclass(C.CheckpointMismatchError, ConfigError)
    assert not issubclass(C.CheckpointMismatchError, C.CheckpointError)
