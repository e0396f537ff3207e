"""Scale-out (DESIGN.md §8): sharded update/log-prob programs and engine on 8 simulated devices, the
trainer on a mesh and in two real processes, checkpoints restored onto other meshes.

The main pytest process keeps its single CPU device: every multi-device check runs in a child
(``tests.train.multidevice``), every multi-process check in children started here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from atpo_jax import parallel as distributed
from atpo_jax.parallel import collectives
from atpo_jax.rollout.stats import merge_rollout_metrics
from atpo_jax.train.evaluation import merge_eval_results
from atpo_jax.train.metrics import read_metrics
from atpo_jax.train.policy import check_micro_batches
from tests.train.multidevice import HANG_GUARD_SCALE, REPO_ROOT, run_python, subprocess_env

# ----------------------------------------------------------------------------------------------
# Host-side helpers (no devices needed)


def test_local_prompt_positions_split_every_mini_batch():
    assert distributed.local_prompt_positions(8, 4, 0, 1) == list(range(8))
    assert distributed.local_prompt_positions(8, 4, 0, 2) == [0, 1, 4, 5]
    assert distributed.local_prompt_positions(8, 4, 1, 2) == [2, 3, 6, 7]
    shares = [distributed.local_prompt_positions(12, 6, b, 3) for b in range(3)]
    assert sorted(sum(shares, [])) == list(range(12))
    with pytest.raises(
        ValueError, match=r"train.mini_batch_prompts=4 must be divisible by .* \(3\)"
    ):
        distributed.local_prompt_positions(8, 4, 0, 3)


def test_batch_layout_errors_name_the_setting():
    check_micro_batches(64, 16, ways=8)
    with pytest.raises(ValueError, match=r"train.micro_batch_rows=12 must be divisible by .* = 8"):
        check_micro_batches(48, 12, ways=8)
    with pytest.raises(
        ValueError, match=r"train.micro_batch_rows=5 must divide the mini-batch rows \(64\)"
    ):
        check_micro_batches(64, 5)


def test_settings_from_flags_then_environment():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "2",
    }
    s = distributed.settings_from({"process_id": None, "num_processes": None}, env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 2)
    s = distributed.settings_from({"process_id": 0, "coordinator_address": "h:1"}, env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("h:1", 4, 0)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='x' is not an integer"):
        distributed.settings_from({}, {"JAX_NUM_PROCESSES": "x"})
    with pytest.raises(ValueError, match=r"--process_id=5 must be in \[0, --num_processes=2\)"):
        distributed.settings_from({"num_processes": 2, "process_id": 5}, {})
    # Nothing given and no cluster: a plain single-process run (jax.distributed not started).
    assert distributed.initialize({}, env={}) is False
    assert distributed.initialize({"mode": "off", "num_processes": 2}, env={}) is False
    assert collectives._cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert collectives._cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert collectives._cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu pod"


def test_merging_per_process_metrics_and_eval_results():
    merged = merge_rollout_metrics(
        [
            {"rollout/tool_calls": 3.0, "rollout/response_length_mean": 10.0,
             "rollout/response_length_max": 40.0, "rollout/leaf_depth_1": 2.0, "time/tools_s": 1.0},
            {"rollout/tool_calls": 5.0, "rollout/response_length_mean": 20.0,
             "rollout/response_length_max": 30.0, "rollout/leaf_depth_2": 4.0, "time/tools_s": 3.0},
        ]
    )  # fmt: skip
    assert merged == {
        "rollout/tool_calls": 8.0,
        "rollout/response_length_mean": 15.0,
        "rollout/response_length_max": 40.0,
        "rollout/leaf_depth_1": 2.0,
        "rollout/leaf_depth_2": 4.0,
        "time/tools_s": 3.0,
    }
    a = {
        "em": 0.5,
        "f1": 0.5,
        "n": 2,
        "by_source": {"x": {"em": 0.5, "f1": 0.5, "n": 2}},
        "samples": [1, 2],
    }
    b = {"em": 1.0, "f1": 0.25, "n": 6, "by_source": {"x": {"em": 1.0, "f1": 0.0, "n": 2},
                                                      "y": {"em": 1.0, "f1": 0.375, "n": 4}},
         "samples": [3, 4, 5, 6]}  # fmt: skip
    r = merge_eval_results([a, b])
    assert r["n"] == 8 and r["em"] == pytest.approx(7 / 8) and r["f1"] == pytest.approx(2.5 / 8)
    assert r["by_source"]["x"] == {"em": 0.75, "f1": 0.25, "n": 4}
    assert r["by_source"]["y"]["n"] == 4
    assert r["samples"] == [1, 2, 3, 4, 5]
    assert distributed.split_evenly(10, 0, 3) == range(0, 3)
    assert [len(distributed.split_evenly(10, b, 3)) for b in range(3)] == [3, 4, 3]


# ----------------------------------------------------------------------------------------------
# 8 simulated devices: one update and log-probs, sharded vs one device; the engine


def test_sharded_update_and_log_probs_match_one_device_and_engine_tokens_match():
    result = run_python(
        """
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from atpo_jax import models
        from atpo_jax.rollout.engine import Engine, cache_shardings
        from atpo_jax.rollout.sampling import SamplingParams
        from atpo_jax import parallel as S
        from atpo_jax.train import optimizer as opt, policy

        config = models.ModelConfig(model_type="qwen3", vocab_size=160, hidden_size=32,
            intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
            qk_norm=True, tie_word_embeddings=True)
        model = models.CausalLM(config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        rng = np.random.default_rng(0)
        rows_n, P, R = 16, 6, 10
        prompt = rng.integers(1, 160, (rows_n // 4, P)).astype(np.int32)
        pmask = np.ones_like(prompt); pmask[:, :2] = 0  # left padding
        response = rng.integers(1, 160, (rows_n, R)).astype(np.int32)
        loss_mask = (rng.random((rows_n, R)) < 0.7).astype(np.int32)
        loss_mask[:, 0] = 1; loss_mask[3] = 0  # one empty row
        rows = policy.policy_rows(prompt, pmask, np.repeat(np.arange(rows_n // 4), 4), response,
                                  loss_mask, advantages=rng.normal(size=(rows_n, R)))
        settings = policy.LossSettings(policy_loss="atpo", clip_low=0.2, clip_high=0.28)
        tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-2, grad_clip_norm=1.0))

        # One device: old log-probs (perturbed so ratios and clipping are non-trivial), one update.
        ref_lp = policy.make_log_prob_fn(graphdef, 8)(params, rows)
        rows = rows.replace(old_log_probs=np.asarray(ref_lp) + rng.normal(0, 0.3, (rows_n, R)))
        update = policy.make_update_fn(graphdef, tx, settings, 8, donate=False)
        ref_params, _, ref_metrics = update(params, tx.init(params), rows)

        out = {"devices": jax.device_count(), "meshes": {}}
        for sizes in [(1, 8, 1), (2, 2, 2)]:
            mesh = S.make_mesh(S.MeshSettings(*sizes))
            sharded = S.shard_params(params, mesh)
            abstract = jax.eval_shape(tx.init, sharded)
            o_shard = S.param_shardings(mesh, abstract)
            opt_state = jax.jit(tx.init, out_shardings=o_shard)(sharded)
            batch = S.shard_batch(rows, mesh)
            lp = policy.make_log_prob_fn(graphdef, 8, mesh=mesh)(sharded, batch)
            new, new_state, metrics = policy.make_update_fn(
                graphdef, tx, settings, 8, mesh=mesh, donate=False)(sharded, opt_state, batch)
            embed = new["embed_tokens"]["embedding"][...]
            out["meshes"][str(sizes)] = {
                "lp_err": float(jnp.max(jnp.abs(lp - ref_lp))),
                "lp_spec": [list(a) if isinstance(a, tuple) else a for a in lp.sharding.spec],
                "loss": float(metrics["loss"]),
                "metric_errs": {k: abs(float(metrics[k]) - float(ref_metrics[k]))
                                for k in ref_metrics},
                "param_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                 zip(jax.tree.leaves(new), jax.tree.leaves(ref_params))),
                "embed_spec": list(embed.sharding.spec),
                "mu_specs": sorted({str(x.sharding.spec) for p, x in
                    jax.tree_util.tree_leaves_with_path(new_state)
                    if "mu/embed_tokens" in S.path_str(p)}),
            }
            if sizes == (1, 8, 1):
                try:
                    policy.make_update_fn(graphdef, tx, settings, 4, mesh=mesh, donate=False)(
                        sharded, opt_state, batch)
                except ValueError as err:
                    out["micro_error"] = str(err)
        out["ref_loss"] = float(ref_metrics["loss"])
        out["ref_clipfrac"] = float(ref_metrics["clipfrac"])
        out["param_change"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                  zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))

        # Engine: greedy tokens with the pool and parameters sharded == on one device.
        model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 20.0
        prompts = [[5, 9, 13], [7, 1, 22, 40, 3, 8, 11], [30], [2, 4, 6, 8, 10, 12, 14, 16]]

        def generate(engine, params):
            slots = engine.allocate(len(prompts))
            engine.prefill_many(params, slots, prompts)
            first = engine.generate(params, slots, [12] * len(slots), jax.random.key(0))
            # A branch: fork a prefix, add an observation, generate again (batch of 2).
            (dst,) = engine.allocate(1)
            engine.fork(slots[1], dst, 9)
            engine.extend_many(params, [dst, slots[2]], [[50, 51, 52], [60]])
            second = engine.generate(params, [dst, slots[2]], [10, 10], jax.random.key(1))
            return [g.tokens for g in first + second], [g.log_probs for g in first + second]

        kwargs = dict(num_slots=8, max_len=64, eos_token_ids=[0], decode_chunk=4, kv_bucket=16,
                      page_size=16, kv_pages=32, sampling=SamplingParams(temperature=0.0))
        ref_tokens, ref_lps = generate(Engine(model, **kwargs), nnx.state(model))
        out["engine"] = {}
        for sizes in [(2, 2, 2)]:  # pages over data x fsdp, kv heads over tensor
            mesh = S.make_mesh(S.MeshSettings(*sizes))
            cache_sharding = cache_shardings(mesh, config, 32, 16)
            engine = Engine(model, cache_sharding=cache_sharding, **kwargs)
            tokens, lps = generate(engine, S.shard_params(nnx.state(model), mesh))
            out["engine"][str(sizes)] = {
                "same_tokens": tokens == ref_tokens,
                "lp_err": max(abs(a - b) for x, y in zip(lps, ref_lps) for a, b in zip(x, y)),
                "cache_spec": [list(a) if isinstance(a, tuple) else a
                               for a in engine.cache.k[0].sharding.spec],
                "cache_shard": list(engine.cache.k[0].addressable_shards[0].data.shape),
            }
        out["tokens"] = ref_tokens
        emit(out)
        """,
        timeout=300,
    )
    assert result["devices"] == 8
    assert result["ref_loss"] != 0.0 and result["ref_clipfrac"] > 0.0  # a real, clipped update
    assert result["param_change"] > 1e-4
    for sizes, r in result["meshes"].items():
        data, fsdp, tensor = eval(sizes)  # noqa: S307 - our own tuple literal
        assert r["lp_err"] < 1e-5, sizes
        assert r["lp_spec"] == [["data", "fsdp"]]
        assert abs(r["loss"] - result["ref_loss"]) < 1e-6, sizes
        assert max(r["metric_errs"].values()) < 1e-4, (sizes, r["metric_errs"])
        assert r["param_err"] < 1e-5, sizes  # same AdamW step (clipped) as one device
        assert r["embed_spec"] == ["tensor", "fsdp"]
        assert r["mu_specs"] == ["P('tensor', 'fsdp')"]
    assert (
        "train.micro_batch_rows=4 must be divisible by the batch parallelism"
        in (result["micro_error"])
    )
    assert "mesh.data x mesh.fsdp = 8" in result["micro_error"]
    assert sum(len(t) for t in result["tokens"]) > 40  # real generations, not immediate EOS
    for sizes, r in result["engine"].items():
        data, fsdp, tensor = eval(sizes)  # noqa: S307
        assert r["same_tokens"], sizes
        assert r["lp_err"] < 1e-4, sizes
        # One array per layer: keys [pages, kv_heads, head_dim, page_size].
        assert r["cache_spec"][:2] == [["data", "fsdp"], "tensor"], sizes
        assert all(a is None for a in r["cache_spec"][2:]), sizes
        assert r["cache_shard"] == [32 // (data * fsdp), 2 // tensor, 8, 16], sizes


# ----------------------------------------------------------------------------------------------
# The trainer: one device, an fsdp=8 mesh, and two real processes on localhost

# The tiny variant, smaller: 4 prompts per step in 2 mini-batches of 2 prompts x 4 leaves (8 rows,
# one micro-batch), a 2-layer model, no warm start (the stand-in reward gives real advantages).
RUN = {
    "rollout.initial_rollouts": 2,
    "rollout.expansion_iterations": 1,
    "rollout.beam_size": 2,
    "rollout.samples_per_tree": 4,
    "rollout.max_response_len": 64,
    "rollout.num_slots": 16,
    "rollout.trace_every": 1,
    "train.steps": 2,
    "train.prompts_per_step": 4,
    "train.mini_batch_prompts": 2,
    "train.micro_batch_rows": 8,
    "sft.steps": 0,
    "eval.max_questions": 4,
    "eval.batch_prompts": 4,
    "checkpoint.every": 1,
    "logging.tensorboard": False,
    "logging.plot": False,
    "model.random.hidden_size": 64,
    "model.random.intermediate_size": 128,
    "model.random.num_layers": 2,
    "mesh.data": 1,
    "mesh.fsdp": -1,
    "mesh.tensor": 1,
}
CONFIG_FILE = REPO_ROOT / "configs" / "search_qa.py"
# Differ by design between a run and its multi-process or sharded twin: packed micro-batches hold
# one sequence per device, so the positions computed (and their padding) follow the device count.
NOT_COMPARED = (
    "time",
    "rollout/generate_calls",
    "train/computed_tokens",
    "train/padding_fraction",
)


def launch(workdir, log, *, devices: int = 1, overrides=(), flags=()) -> subprocess.Popen:
    """Starts ``python -m tests.train.launch_with_test_reward`` on the tiny config + ``RUN``,
    its output going to the file ``log``."""
    args = [f"--config={CONFIG_FILE}:tiny", f"--workdir={workdir}", *flags]
    args += [f"--config.{k}={v}" for k, v in {**RUN, **dict(overrides)}.items()]
    log = open(log, "w")  # noqa: SIM115 - the child holds it
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train.launch_with_test_reward", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(devices, {"TF_CPP_MIN_LOG_LEVEL": "2"}),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout * HANG_GUARD_SCALE
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
        with open(logs[name]) as f:
            log = f.read()
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{log[-6000:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.items()
        if not k.startswith(("time/", "throughput/", "schedule/")) and k not in NOT_COMPARED
    }


def assert_same_metrics(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    got, want = comparable(got), comparable(want)
    assert sorted(got) == sorted(want), what
    for key in want:
        np.testing.assert_allclose(
            got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=f"{what}: {key}"
        )


def load_safetensors(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "model.safetensors"))


def test_trainer_on_fsdp8_and_in_two_processes_matches_one_device(tmp_path):
    workdirs = {name: tmp_path / name for name in ("one", "fsdp8", "two")}
    logs = {name: tmp_path / f"{name}.log" for name in ("one", "fsdp8", "two0", "two1")}
    port = free_port()
    procs = {
        "one": launch(workdirs["one"], logs["one"]),
        "fsdp8": launch(workdirs["fsdp8"], logs["fsdp8"], devices=8, overrides={"train.steps": 1}),
    }
    for rank in range(2):
        procs[f"two{rank}"] = launch(
            workdirs["two"],
            logs[f"two{rank}"],
            flags=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={rank}"],
        )  # fmt: skip
    wait_all(procs, logs, timeout=600)

    one = read_metrics(workdirs["one"] / "metrics.jsonl")
    two = read_metrics(workdirs["two"] / "metrics.jsonl", merge_steps=False)
    fsdp8 = read_metrics(workdirs["fsdp8"] / "metrics.jsonl")
    # One writer in the two-process run: each record exactly once (eval 0, step 1, 2, eval 2).
    assert [r["step"] for r in two] == [r["step"] for r in read_metrics(
        workdirs["one"] / "metrics.jsonl", merge_steps=False)]  # fmt: skip
    two = read_metrics(workdirs["two"] / "metrics.jsonl")
    by_step = {r["step"]: r for r in one}
    assert sorted(by_step) == [0, 1, 2]
    # A real learning signal: varied rewards, non-zero advantages and loss, both steps.
    for step in (1, 2):
        assert by_step[step]["reward/std"] > 0.1
        assert by_step[step]["advantage/std"] > 0.1
        assert abs(by_step[step]["update/pg_loss"]) > 1e-6
        assert by_step[step]["update/grad_norm"] > 1e-3
        assert by_step[step]["trained_tokens"] > 100
    for record in two:
        assert_same_metrics(
            record, by_step[record["step"]], f"two processes, step {record['step']}"
        )
    # The fsdp=8 run stops after step 1; its final evaluation lands in step 1's record.
    assert [r["step"] for r in fsdp8] == [0, 1]
    assert_same_metrics(fsdp8[0], by_step[0], "fsdp=8, step 0")
    step1 = {k: v for k, v in fsdp8[1].items() if not k.startswith("eval/")}
    assert_same_metrics(step1, by_step[1], "fsdp=8, step 1")

    # Only process 0 wrote evaluation results, traces and the export; all wrote checkpoints.
    two_dir = workdirs["two"]
    assert sorted(p.name for p in two_dir.glob("eval_*.json")) == [
        "eval_000000.json", "eval_000002.json"]  # fmt: skip
    assert (two_dir / "traces" / "trace_000002.jsonl").exists()
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["0", "1", "2"]
    with open(logs["two1"]) as f:
        log1 = f.read()
    assert "process 1 of 2: 1 local / 2 global devices" in log1
    final_one, final_two = load_safetensors(workdirs["one"] / "hf_export"), load_safetensors(
        two_dir / "hf_export")  # fmt: skip
    assert sorted(final_one) == sorted(final_two)
    for name in final_one:
        np.testing.assert_allclose(final_two[name], final_one[name], atol=1e-4, err_msg=name)

    # The fsdp=8 checkpoint restores onto data=2,tensor=4 and onto one device, bit for bit.
    restored = run_python(
        f"""
        import importlib.util, jax, numpy as np
        from jax.sharding import SingleDeviceSharding
        from flax import nnx
        from atpo_jax import models
        from atpo_jax.builder import build_run
        from atpo_jax.train.trainer import Trainer

        spec = importlib.util.spec_from_file_location("cfg", {str(CONFIG_FILE)!r})
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        config = module.get_config("tiny")
        config.update_from_flattened_dict({{**{RUN!r}, "train.steps": 1, "mesh.data": 2,
                                            "mesh.fsdp": 1, "mesh.tensor": 4}})
        workdir = {str(workdirs["fsdp8"])!r}
        trainer = Trainer(build_run(config, workdir))
        state = trainer.restore(1)
        one_device = SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device)
            if isinstance(x, jax.Array) else x, state.checkpoint_items())
        single = trainer.checkpointer.restore(1, target=target)
        exported = nnx.state(models.from_pretrained(workdir + "/hf_export"))
        leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
        same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))
        emb = state.params["embed_tokens"]["embedding"][...]
        emit({{
            "mesh": dict(trainer.run.placement.mesh.shape),
            "step": state.step,
            "embed_spec": [a for a in emb.sharding.spec],
            "embed_shard": list(emb.addressable_shards[0].data.shape),
            "embed_shape": list(emb.shape),
            "mesh_equals_export": same(state.params, exported),
            "single_equals_export": same(single["params"], exported),
            "opt_state_equal": same(state.opt_state, single["opt_state"]),
            "single_devices": sorted({{d.id for x in jax.tree.leaves(single["params"])
                                      for d in x.devices()}}),
        }})
        """,
        timeout=300,
    )
    assert restored["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert restored["step"] == 1
    assert restored["embed_spec"] == ["tensor", "fsdp"]
    vocab, hidden = restored["embed_shape"]
    assert restored["embed_shard"] == [vocab // 4, hidden]
    assert restored["mesh_equals_export"]
    assert restored["single_equals_export"]
    assert restored["opt_state_equal"]
    assert restored["single_devices"] == [0]


# ----------------------------------------------------------------------------------------------
# launch/ scripts (their commands, without a cluster)


def script_output(script: str, args: list[str], env: dict[str, str]) -> str:
    path = REPO_ROOT / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    proc = subprocess.run(
        ["bash", str(path), *args],
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def test_launch_scripts_run_the_same_command_on_every_process():
    out = script_output(
        "local_multiprocess.sh",
        ["2", "4", "--", "--config=configs/search_qa.py", "--config.data.train_files=a b"],
        {"PYTHON": sys.executable, "PORT": "4321"},
    ).splitlines()
    assert len(out) == 2
    for rank, line in enumerate(out):
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in line
        assert f"--coordinator_address=127.0.0.1:4321 --num_processes=2 --process_id={rank}" in line
        assert line.endswith(r"--config=configs/search_qa.py --config.data.train_files=a\ b ")
    out = script_output(
        "tpu_pod.sh", ["--config=configs/search_qa.py:qwen3_4b"], {"TPU_NAME": "t", "ZONE": "z"}
    )
    assert out.startswith("gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command=")
    assert r"-m\ atpo_jax.launch\ --distributed=on\ --config=configs/search_qa.py:qwen3_4b" in out
    assert "--config=configs/search_qa.py" in script_output(
        "slurm_gpu.sbatch", ["--config=configs/search_qa.py"], {}
    )
    out = script_output("slurm_gpu.sbatch", ["--config=c"], {"PROCESS_PER": "node"})
    assert out.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m atpo_jax.launch")
    assert r"--distributed=on --local_device_ids=0\,1\,2\,3\,4\,5\,6\,7 --config=c" in out
