"""``build_run(config, workdir) -> Run``: a run's parts, built once from its settings.

The one place a config (``ml_collections.ConfigDict``) becomes a run: it is converted to
``RunSettings`` (``atpo_jax.config.run_settings``), then every part is built from those typed
settings, each validated first so that a bad value, a missing file or an unreachable service fails
with one message naming the setting (or file) and the fix, before any JAX compilation starts.
``launch.py``, ``evaluate.py`` and the benchmarks use it; ``train.Trainer`` runs on its result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from atpo_jax import models, parallel
from atpo_jax.config import run_settings
from atpo_jax.data import DatasetError, read_rows
from atpo_jax.data.prompts import encode_prompt
from atpo_jax.data.rows import QARow
from atpo_jax.data.settings import DataSource
from atpo_jax.data.synthetic import build_synthetic_world, load_tokenizer, world_noise
from atpo_jax.rollout.engine import Engine, cache_shardings, dense_equivalent_pages
from atpo_jax.rollout.settings import AEPOEntropy, RolloutMode
from atpo_jax.rollout.tree_search import TreeSearch
from atpo_jax.settings import ConfigError
from atpo_jax.tools.settings import build_toolbox, check_retriever
from atpo_jax.tools.toolbox import Toolbox
from atpo_jax.train.optimizer import build_optimizer
from atpo_jax.train.packed_update import PackedUpdate, make_packed_log_prob_fn
from atpo_jax.train.packing import Packing
from atpo_jax.train.policy import check_micro_batches, make_log_prob_fn, make_update_fn
from atpo_jax.train.run import Data, Run
from atpo_jax.train.settings import RunSettings

logger = logging.getLogger(__name__)


def build_run(
    config: Mapping[str, Any] | RunSettings, workdir: str, *, training: bool = True
) -> Run:
    """Builds every part of a run from ``config`` (a ``ConfigDict`` or ``RunSettings``).

    ``training=False`` (evaluation only) reads no training files (``data.source=files``), needs
    ``data.eval_files`` and builds no training search (``Run.search`` is None: its KV pool is
    the largest allocation of a run).

    Raises:
      ConfigError: a setting, file or service that cannot be used; the message names it.
    """
    settings = config if isinstance(config, RunSettings) else run_settings(config)
    if training:  # evaluation brings its own checkpoint and needs no training files
        settings.check_required()
    settings.model.check_backend()
    settings.reward.load()  # a custom reward.fn is imported and checked before anything else
    os.makedirs(workdir, exist_ok=True)
    # Process 0 writes the synthetic world's files first; the others then only read them.
    data = parallel.main_process_first(
        lambda: load_data(settings, workdir, training=training), "load_data"
    )
    train_prompts = encode_prompts(data.tokenizer, data.train, settings.rollout.max_prompt_len)
    toolbox = build_toolbox(
        settings.tools,
        default_corpus=data.corpus,
        max_workers=settings.rollout.tool_workers,
        retrieval_noise=data.retrieval_noise,
    )
    check_retriever(toolbox, settings.tools)
    model, initial = policy_model(settings, data.tokenizer)
    placement = build_placement(settings, nnx.state(model), check_batches=training)
    graphdef = nnx.graphdef(model)
    t = settings.train
    optim = settings.optim.with_horizon(t.steps * t.updates_per_step)
    optimizer = build_optimizer(optim)
    return Run(
        settings=settings,
        workdir=workdir,
        data=data,
        train_prompts=train_prompts,
        model=model,
        initial_params=lambda: placement.place(initial()),
        placement=placement,
        toolbox=toolbox,
        search=build_search(settings, model, data.tokenizer, toolbox, placement.rollout_mesh)
        if training
        else None,
        eval_search=build_search(
            settings, model, data.tokenizer, toolbox, placement.rollout_mesh, evaluation=True
        ),
        optimizer=optimizer,
        optim=optim,
        update_fn=_update_fn(settings, graphdef, optimizer, placement.train_mesh),
        log_prob_fn=_log_prob_fn(settings, graphdef, placement.train_mesh),
        export_dtype=export_dtype(settings, model.config),
    )


def _update_fn(settings: RunSettings, graphdef, optimizer, mesh) -> Any:
    """The update program of the run's ``train.packing``."""
    if settings.train.packing == Packing.PADDED:
        return make_update_fn(
            graphdef, optimizer, settings.loss, settings.train.micro_batch_rows, mesh=mesh
        )
    return PackedUpdate(graphdef, optimizer, settings.loss, mesh=mesh)


def _log_prob_fn(settings: RunSettings, graphdef, mesh) -> Any:
    """The scoring program (old and reference log-probs) of the run's ``train.packing``."""
    chunk = settings.loss.log_prob_chunk
    if settings.train.packing == Packing.PADDED:
        return make_log_prob_fn(graphdef, settings.train.micro_batch_rows, chunk=chunk, mesh=mesh)
    return make_packed_log_prob_fn(graphdef, chunk=chunk, mesh=mesh)


def default_workdir(settings: RunSettings) -> str:
    """Where a run goes when no ``--workdir`` is given: ``runs/<variant>``."""
    return os.path.join("runs", settings.variant)


# ---------------------------------------------------------------------------------------- data


def load_data(settings: RunSettings, workdir: str, *, training: bool = True) -> Data:
    """The training and evaluation questions, the tokenizer and (synthetic) corpus/demos paths."""
    d = settings.data
    if d.source == DataSource.SYNTHETIC:
        directory = d.synthetic_dir or os.path.join(workdir, "synthetic")
        files = build_synthetic_world(directory, d.synthetic, topk=settings.tools.topk)
        return Data(
            train=read_rows(files.train),
            eval=read_rows(files.split(str(settings.eval.split))),
            tokenizer=load_tokenizer(files.tokenizer),
            corpus=files.corpus,
            demos=files.demos,
            world=files.world,
            retrieval_noise=world_noise(files),
        )
    train_paths = d.train_paths if training else []
    if not training and not d.eval_paths:
        raise ConfigError(
            "data.eval_files is empty: give the evaluation parquet/JSONL files "
            "(comma-separated), e.g. --config.data.eval_files=/data/hotpotqa/test.parquet"
        )
    if training and not train_paths:
        raise ConfigError(
            "data.train_files is empty: give the training parquet/JSONL files "
            "(comma-separated), e.g. --config.data.train_files=/data/hotpotqa/train.parquet"
        )
    for path in train_paths:
        _existing(path, "data.train_files", "a readable file")
    for path in d.eval_paths:
        _existing(path, "data.eval_files", "a readable file")
    tokenizer_path = d.tokenizer_path or settings.model.path
    _existing(
        tokenizer_path, "data.tokenizer_path", "a tokenizer directory (defaults to model.path)"
    )
    train = [row for path in train_paths for row in _read_rows(path, "data.train_files")]
    evaluation = [row for path in d.eval_paths for row in _read_rows(path, "data.eval_files")]
    try:
        tokenizer = models.load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as e:
        setting = "data.tokenizer_path" if d.tokenizer_path else "model.path"
        raise ConfigError(f"{setting}={tokenizer_path!r}: {e}") from e
    return Data(train, evaluation, tokenizer)


def encode_prompts(tokenizer: Any, rows: Sequence[QARow], limit: int) -> list[list[int]]:
    """Every row's prompt through the chat template; refuses a prompt over ``limit`` tokens."""
    encoded = [encode_prompt(tokenizer, row.prompt) for row in rows]
    too_long = [i for i, p in enumerate(encoded) if len(p) > limit]
    if too_long:
        raise ConfigError(
            f"{len(too_long)} training prompts are longer than rollout.max_prompt_len={limit} "
            f"(first: row {too_long[0]} with {len(encoded[too_long[0]])} tokens); raise it"
        )
    return encoded


def _existing(path: str, setting: str, what: str) -> str:
    if not path:
        raise ConfigError(f"{setting} is empty: set it to {what} (e.g. --config.{setting}=/path)")
    if not os.path.exists(path):
        raise ConfigError(f"{setting}={path!r} does not exist: point it at {what}")
    return path


def _read_rows(path: str, setting: str) -> list[QARow]:
    """``read_rows`` with a malformed or unreadable file reported as a ConfigError on ``setting``."""
    try:
        return read_rows(path)
    except (DatasetError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{setting}: {e}; fix or replace the file") from e


# ---------------------------------------------------------------------------------------- model


def policy_model(settings: RunSettings, tokenizer: Any) -> tuple[models.CausalLM, Any]:
    """The policy's structure (an abstract module: no weights yet) and a function that makes its
    step-0 parameters: read from ``model.path``, or initialised from the run's seed."""
    m = settings.model
    runtime = m.runtime()
    if m.path:
        path = _existing(m.path, "model.path", "a Hugging Face checkpoint directory")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(
                f"model.path={path!r} has no config.json: is it a Hugging Face checkpoint?"
            )
        try:
            config = models.ModelConfig.from_json_file(os.path.join(path, "config.json"), **runtime)
        except models.ConfigError as e:
            raise ConfigError(f"model.path={path!r}: {e}") from e

        def initial() -> Any:
            return nnx.state(models.from_pretrained(path, config.dtype, **_load_options(runtime)))

    else:
        r = m.random
        config = models.ModelConfig(
            model_type=str(r.model_type),
            vocab_size=len(tokenizer),
            hidden_size=r.hidden_size,
            intermediate_size=r.intermediate_size,
            num_layers=r.num_layers,
            num_heads=r.num_heads,
            num_kv_heads=r.num_kv_heads,
            head_dim=r.head_dim,
            qk_norm=r.model_type == "qwen3",
            qkv_bias=r.model_type == "qwen2",
            tie_word_embeddings=r.tie_word_embeddings,
            **runtime,
        )

        def initial() -> Any:
            return nnx.state(models.CausalLM(config, rngs=nnx.Rngs(settings.seed)))

    if config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than the "
            f"tokenizer's ({len(tokenizer)}): model.path and data.tokenizer_path disagree"
        )
    structure = nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))
    return structure, initial


def _load_options(runtime: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in runtime.items() if k != "dtype"}


def export_dtype(settings: RunSettings, config: models.ModelConfig) -> Any:
    """``checkpoint.export_dtype``, by default the dtype of the checkpoint the run started from
    (float32 masters trained from a bfloat16 Qwen3 export as bfloat16), else the parameters'."""
    if settings.checkpoint.export_dtype:
        return settings.checkpoint.export_dtype
    source = models.checkpoint_dtype(settings.model.path) if settings.model.path else None
    return source or config.param_dtype


# ---------------------------------------------------------------------------------------- devices


def build_placement(
    settings: RunSettings, params: Any, *, check_batches: bool = True
) -> parallel.Placement:
    """The mesh of every device of every process and this run's layout on it; checks (for a
    training run) that the mini- and micro-batches split over its batch devices and processes."""
    t, r = settings.train, settings.rollout
    try:
        placement = parallel.Placement.create(parallel.make_mesh(settings.mesh), params)
        if not check_batches:
            return placement
        if t.packing == Packing.PADDED:
            check_micro_batches(
                t.mini_batch_prompts * r.samples_per_tree,
                t.micro_batch_rows,
                parallel.batch_parallelism(placement.mesh),
                "the mini-batch rows train.mini_batch_prompts x rollout.samples_per_tree",
            )
        parallel.local_prompt_positions(
            t.prompts_per_step, t.mini_batch_prompts, placement.batch_block, placement.batch_blocks
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return placement


# ---------------------------------------------------------------------------------------- rollout


def build_search(
    settings: RunSettings,
    model: models.CausalLM,
    tokenizer: Any,
    toolbox: Toolbox,
    mesh: Any = None,
    *,
    evaluation: bool = False,
) -> TreeSearch:
    """An engine + tree search for training rollouts, or (``evaluation``) the greedy single-chain
    search of validation with slots for two batches of questions. ``mesh``: the devices the
    engine runs on (its KV-cache pool is sharded over them)."""
    rollout = settings.rollout
    if evaluation:
        rollout = rollout.for_evaluation(settings.eval.max_response_len)
    num_slots = 2 * settings.eval.batch_prompts if evaluation else rollout.num_slots
    aepo_topk = rollout.mode == RolloutMode.AEPO and rollout.aepo_entropy == AEPOEntropy.TOPK
    num_pages = (0 if evaluation else rollout.kv_pages) or dense_equivalent_pages(
        num_slots, rollout.max_len, rollout.page_size
    )
    if mesh is not None:  # pages split over the batch axes only where their count divides
        split = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        num_pages = -(-num_pages // split) * split
    engine = Engine(
        model,
        num_slots=num_slots,
        max_len=rollout.max_len,
        eos_token_ids=eos_ids(tokenizer),
        sampling=rollout.sampling(len(tokenizer), greedy=evaluation),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=rollout.decode_chunk,
        kv_bucket=rollout.kv_bucket,
        page_size=rollout.page_size,
        kv_pages=num_pages,
        cache_sharding=cache_shardings(mesh, model.config, num_pages, rollout.page_size),
        # AEPO's branching entropy reads vLLM-style top-k entries of a call's first positions.
        top_logprobs=rollout.aepo_entropy_topk if aepo_topk else 0,
        top_logprobs_positions=rollout.aepo_entropy_positions if aepo_topk else 0,
    )
    try:
        return TreeSearch(
            engine,
            tokenizer,
            toolbox,
            rollout,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            seed=settings.seed,
            tool_timeout_s=settings.tools.call_deadline_s,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def eos_ids(tokenizer: Any) -> list[int]:
    """The chat EOS plus the tokenizer's end-of-text token when it has a distinct one (Qwen3)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|endoftext|>",):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
