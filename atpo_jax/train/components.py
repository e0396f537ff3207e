"""Builds the run's parts from the config: data, tokenizer, model, tools, engine and tree search.

Everything here validates its settings first and fails with one message that names the setting (or
file) and the fix, before any JAX compilation starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from atpo_jax import models
from atpo_jax.data import DatasetError, read_rows
from atpo_jax.data.rows import QARow
from atpo_jax.rollout.engine import Engine, cache_shardings
from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.rollout.tree_search import RolloutConfig, TreeSearch
from atpo_jax.tools.toolbox import Toolbox
from atpo_jax.train.credit import CreditSettings
from atpo_jax.train.policy import LossSettings, check_micro_batches

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A setting is missing, unknown or inconsistent; the message names it and the fix."""


@dataclasses.dataclass
class Data:
    """Questions and (for the synthetic world) its files."""

    train: list[QARow]
    eval: list[QARow]
    tokenizer: Any
    corpus: str | None
    demos: str | None
    world: str | None = None  # the synthetic world's entities (for demonstration renaming)


def dtype_of(name: str, setting: str) -> Any:
    if name not in _DTYPES:
        raise ConfigError(f"{setting}={name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _existing(path: str, setting: str, what: str) -> str:
    if not path:
        raise ConfigError(f"{setting} is empty: set it to {what} (e.g. --config.{setting}=/path)")
    if not os.path.exists(path):
        raise ConfigError(f"{setting}={path!r} does not exist: point it at {what}")
    return path


def load_data(config: ml_collections.ConfigDict, workdir: str, *, training: bool = True) -> Data:
    """The training and evaluation questions, the tokenizer and (synthetic) corpus/demos paths.

    ``training=False`` (evaluation only) needs no training files and reads none (``Data.train`` is
    empty for ``data.source=files``), but refuses an empty ``data.eval_files``.
    """
    source = config.data.source
    if source == "synthetic":
        from atpo_jax.data.synthetic import (
            SyntheticWorldConfig,
            build_synthetic_world,
            load_tokenizer,
        )

        directory = config.data.synthetic_dir or os.path.join(workdir, "synthetic")
        world = config.data.synthetic
        files = build_synthetic_world(
            directory,
            SyntheticWorldConfig(
                seed=world.seed,
                num_people=world.num_people,
                num_companies=world.num_companies,
                demo_mistake_rate=world.demo_mistake_rate,
                demo_shortcut_rate=world.demo_shortcut_rate,
                topk=config.tools.topk,
            ),
        )
        split = config.eval.split
        if split not in ("validation", "test"):
            raise ConfigError(f"eval.split={split!r} must be 'validation' or 'test'")
        return Data(
            train=read_rows(files.train),
            eval=read_rows(getattr(files, split)),
            tokenizer=load_tokenizer(files.tokenizer),
            corpus=files.corpus,
            demos=files.demos,
            world=files.world,
        )
    if source != "files":
        raise ConfigError(f"data.source={source!r} must be 'synthetic' or 'files'")
    train_paths = [p for p in config.data.train_files.split(",") if p] if training else []
    eval_paths = [p for p in config.data.eval_files.split(",") if p]
    if not training and not eval_paths:
        raise ConfigError(
            "data.eval_files is empty: give the evaluation parquet/JSONL files "
            "(comma-separated), e.g. --config.data.eval_files=/data/hotpotqa/test.parquet"
        )
    if training and not train_paths:
        raise ConfigError(
            "data.train_files is empty: give the training parquet/JSONL files "
            "(comma-separated), e.g. --config.data.train_files=/data/hotpotqa/train.parquet"
        )
    for path in train_paths + eval_paths:
        _existing(
            path,
            "data.train_files" if path in train_paths else "data.eval_files",
            "a readable file",
        )
    tokenizer_path = config.data.tokenizer_path or config.model.path
    _existing(
        tokenizer_path, "data.tokenizer_path", "a tokenizer directory (defaults to model.path)"
    )
    train = [row for path in train_paths for row in _read_rows(path, "data.train_files")]
    evaluation = [row for path in eval_paths for row in _read_rows(path, "data.eval_files")]
    try:
        tokenizer = models.load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as e:
        setting = "data.tokenizer_path" if config.data.tokenizer_path else "model.path"
        raise ConfigError(f"{setting}={tokenizer_path!r}: {e}") from e
    return Data(train, evaluation, tokenizer, config.tools.corpus or None, None)


def _read_rows(path: str, setting: str) -> list[QARow]:
    """``read_rows`` with a malformed or unreadable file reported as a ConfigError on ``setting``."""
    try:
        return read_rows(path)
    except (DatasetError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{setting}: {e}; fix or replace the file") from e


def attention_impl(config: ml_collections.ConfigDict) -> str:
    """``model.attention_impl``: ``xla`` (anywhere) or ``cudnn`` (flash attention, GPU only)."""
    impl = config.model.attention_impl
    if impl not in models.ATTENTION_IMPLS:
        raise ConfigError(
            f"model.attention_impl={impl!r} is not one of {', '.join(models.ATTENTION_IMPLS)}"
        )
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention_impl='cudnn' needs a CUDA GPU but JAX runs on "
            f"{jax.default_backend()!r}; use model.attention_impl=xla"
        )
    return impl


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> models.CausalLM:
    """The policy: a Hugging Face checkpoint (``model.path``) or a random model (``model.random``)."""
    dtype = dtype_of(config.model.dtype, "model.dtype")
    param_dtype = dtype_of(config.model.param_dtype, "model.param_dtype")
    if config.model.path:
        path = _existing(config.model.path, "model.path", "a Hugging Face checkpoint directory")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(
                f"model.path={path!r} has no config.json: is it a Hugging Face checkpoint?"
            )
        return models.from_pretrained(
            path,
            dtype,
            param_dtype=param_dtype,
            remat=config.model.remat,
            attention_impl=attention_impl(config),
        )
    r = config.model.random
    model_config = models.ModelConfig(
        model_type=r.model_type,
        vocab_size=vocab_size,
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        num_kv_heads=r.num_kv_heads,
        head_dim=r.head_dim,
        qk_norm=r.model_type == "qwen3",
        qkv_bias=r.model_type == "qwen2",
        tie_word_embeddings=r.tie_word_embeddings,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=config.model.remat,
        attention_impl=attention_impl(config),
    )
    return models.CausalLM(model_config, rngs=nnx.Rngs(config.seed))


def build_toolbox(config: ml_collections.ConfigDict, corpus: str | None) -> Toolbox:
    """Search (HTTP service or local BM25) plus the sandboxed python tool when enabled."""
    from atpo_jax.tools.search import SearchTool

    t = config.tools
    if t.retriever_url:
        from atpo_jax.tools.http_retriever import HttpRetriever, RetryPolicy

        try:
            retry = RetryPolicy(
                read_timeout_s=t.timeout_s,
                connect_timeout_s=min(5.0, t.timeout_s),
                max_attempts=t.retries,
            )
        except ValueError as e:
            raise ConfigError(
                f"tools.timeout_s={t.timeout_s} / tools.retries={t.retries}: {e} "
                "(tools.retries counts attempts, >= 1)"
            ) from e
        try:
            retriever = HttpRetriever(t.retriever_url, retry=retry, cache_path=t.cache_path or None)
        except ValueError as e:
            raise ConfigError(f"tools.retriever_url={t.retriever_url!r}: {e}") from e
    else:
        corpus = t.corpus or corpus
        if not corpus:
            raise ConfigError(
                "no retriever: set tools.retriever_url (a Search-R1 /retrieve service) or "
                "tools.corpus (a JSONL corpus with id/contents for the local BM25 index)"
            )
        _existing(corpus, "tools.corpus", "a JSONL corpus file")
        from atpo_jax.tools.bm25 import LocalBM25Retriever
        from atpo_jax.tools.corpus import CorpusError

        try:
            retriever = LocalBM25Retriever(corpus)
        except CorpusError as e:
            raise ConfigError(f"tools.corpus={corpus!r}: {e}") from e
    tools = [SearchTool(retriever, topk=t.topk, max_chars=t.max_passage_chars)]
    if t.python:
        from atpo_jax.tools.python_sandbox import PythonSandboxConfig, PythonTool

        tools.append(PythonTool(PythonSandboxConfig(enabled=True)))
    return Toolbox(tools, max_workers=config.rollout.tool_workers)


def connect_tools(config: ml_collections.ConfigDict, corpus: str | None) -> Toolbox:
    """``build_toolbox``, then a probe query when search goes to an HTTP service (fail fast)."""
    toolbox = build_toolbox(config, corpus)
    if config.tools.retriever_url:
        check_retriever(toolbox, f"tools.retriever_url={config.tools.retriever_url!r}")
    return toolbox


def build_policy(config: ml_collections.ConfigDict, tokenizer: Any) -> models.CausalLM:
    """``build_model`` sized to ``tokenizer``, refusing a model whose vocabulary is too small."""
    model = build_model(config, len(tokenizer))
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
            f"tokenizer's ({len(tokenizer)}): model.path and data.tokenizer_path disagree"
        )
    return model


def eval_rows(config: ml_collections.ConfigDict, data: Data) -> list[QARow]:
    """The evaluation questions: the eval split, cut to ``eval.max_questions`` when set."""
    rows = data.eval
    if config.eval.max_questions:
        rows = rows[: config.eval.max_questions]
    return rows


def check_retriever(toolbox: Toolbox, setting: str) -> None:
    """Fails fast (one clear message) when the search service cannot answer a probe query."""
    result = toolbox.run("search", "probe")
    if not result.ok:
        raise ConfigError(
            f"the retriever ({setting}) did not answer a probe query: {result.status}: "
            f"{result.error}. Start the service or fix the setting."
        )


def rollout_config(config: ml_collections.ConfigDict, *, evaluation: bool = False) -> RolloutConfig:
    r = config.rollout
    kwargs = dict(
        mode=r.mode,
        initial_rollouts=r.initial_rollouts,
        expansion_iterations=r.expansion_iterations,
        beam_size=r.beam_size,
        samples_per_tree=r.samples_per_tree,
        expansion_mode=r.expansion_mode,
        expansion_penalty=r.expansion_penalty,
        entropy_estimator=r.entropy_estimator,
        max_prompt_len=r.max_prompt_len,
        max_response_len=r.max_response_len,
        call_limit=r.call_limit,
        observation_margin=r.observation_margin,
        empty_call=r.empty_call,
        tool_failure=r.tool_failure,
        tool_workers=r.tool_workers,
        tool_timeout_s=max(config.tools.timeout_s * (config.tools.retries + 1), 1.0),
        seed=config.seed,
    )
    if evaluation:
        # Validation (ALGORITHM.md §1.6): greedy, one chain per question.
        kwargs.update(mode="chain", samples_per_tree=1, initial_rollouts=1, expansion_iterations=0)
        if config.eval.max_response_len:
            kwargs["max_response_len"] = config.eval.max_response_len
    try:
        return RolloutConfig(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def sampling_params(
    config: ml_collections.ConfigDict, vocab_size: int, *, greedy: bool
) -> SamplingParams:
    r = config.rollout
    try:
        return SamplingParams(
            temperature=0.0 if greedy else r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            vocab_limit=vocab_size,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_search(
    config: ml_collections.ConfigDict,
    model: models.CausalLM,
    tokenizer: Any,
    toolbox: Toolbox,
    *,
    evaluation: bool = False,
    num_slots: int | None = None,
    mesh: Mesh | None = None,
) -> TreeSearch:
    """An engine + tree search for training rollouts (or greedy single-chain evaluation).

    ``mesh``: the devices the engine runs on, with the model's parameters already placed there;
    its KV-cache pool is sharded by ``rollout.engine.cache_shardings``.
    """
    cfg = rollout_config(config, evaluation=evaluation)
    num_slots = num_slots or config.rollout.num_slots
    max_len = cfg.max_prompt_len + cfg.max_response_len
    engine = Engine(
        model,
        num_slots=num_slots,
        max_len=max_len,
        eos_token_ids=eos_ids(tokenizer),
        sampling=sampling_params(config, len(tokenizer), greedy=evaluation),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=config.rollout.decode_chunk,
        kv_bucket=config.rollout.kv_bucket,
        cache_sharding=cache_shardings(mesh, model.config, num_slots, max_len),
    )
    return TreeSearch(
        engine,
        tokenizer,
        toolbox,
        cfg,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )


def build_eval_search(
    config: ml_collections.ConfigDict,
    model: models.CausalLM,
    tokenizer: Any,
    toolbox: Toolbox,
    *,
    mesh: Mesh | None = None,
) -> TreeSearch:
    """The greedy single-chain search of evaluation, with slots for two batches of questions."""
    return build_search(
        config,
        model,
        tokenizer,
        toolbox,
        evaluation=True,
        num_slots=2 * config.eval.batch_prompts,
        mesh=mesh,
    )


def eos_ids(tokenizer: Any) -> list[int]:
    """The chat EOS plus the tokenizer's end-of-text token when it has a distinct one (Qwen3)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|endoftext|>",):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def loss_settings(config: ml_collections.ConfigDict) -> LossSettings:
    l_ = config.loss
    try:
        return LossSettings(
            policy_loss=l_.policy_loss,
            clip_low=l_.clip_low,
            clip_high=l_.clip_high,
            max_log_ratio=l_.max_log_ratio,
            dual_clip=l_.dual_clip if l_.dual_clip else None,
            loss_agg=l_.loss_agg,
            kl_coef=l_.kl_coef,
            kl_kind=l_.kl_kind,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def credit_settings(config: ml_collections.ConfigDict) -> CreditSettings:
    c = config.credit
    try:
        return CreditSettings(c.mode, c.leaf_value_norm, c.node_value_mode, c.node_adv_mode)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-setting checks that need no files: run before anything is built or compiled."""
    r, t = config.rollout, config.train
    rollout_config(config)
    loss_settings(config)
    credit_settings(config)
    grown = (
        r.samples_per_tree
        if r.mode == "chain"
        else r.initial_rollouts + r.expansion_iterations * r.beam_size
    )
    if r.mode == "tree" and grown != r.samples_per_tree:
        raise ConfigError(
            f"rollout.samples_per_tree={r.samples_per_tree} but the tree grows initial_rollouts + "
            f"expansion_iterations x beam_size = {r.initial_rollouts} + {r.expansion_iterations} x "
            f"{r.beam_size} = {grown} leaves; make them equal (the reference asserts this too)"
        )
    attention_impl(config)
    try:  # the devices' share comes later, with the mesh (Trainer)
        check_micro_batches(
            t.mini_batch_prompts * r.samples_per_tree,
            t.micro_batch_rows,
            rows_are="the mini-batch rows train.mini_batch_prompts x rollout.samples_per_tree",
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ConfigError(
            f"train.mini_batch_prompts={t.mini_batch_prompts} must divide train.prompts_per_step="
            f"{t.prompts_per_step}"
        )
    if config.loss.old_log_probs not in ("recompute", "sampler"):
        raise ConfigError(
            f"loss.old_log_probs={config.loss.old_log_probs!r} must be 'recompute' or 'sampler'"
        )
    if config.loss.old_log_probs == "sampler" and (
        r.temperature != 1.0 or r.top_p < 1.0 or r.top_k > 0
    ):
        raise ConfigError(
            "loss.old_log_probs='sampler' needs rollout.temperature=1, top_p=1, top_k=0 (the sampler's "
            "log-probs are then the policy's); use 'recompute' otherwise"
        )
    if r.mode == "chain" and config.credit.mode == "tree":
        raise ConfigError(
            "rollout.mode='chain' has no tree to assign credit on: set credit.mode='grpo'"
        )
    if t.steps < 0 or t.ppo_epochs < 1:
        raise ConfigError(
            f"train.steps must be >= 0 (0: warm start and evaluation only) and train.ppo_epochs "
            f">= 1, got {t.steps}, {t.ppo_epochs}"
        )
    if t.log_every < 1:
        raise ConfigError(f"train.log_every={t.log_every} must be >= 1 (steps between log lines)")
    if config.variant == "qwen3_4b":
        missing = [k for k in ("model.path", "data.train_files") if not _lookup(config, k)]
        if not (config.tools.retriever_url or config.tools.corpus):
            missing.append("tools.retriever_url (or tools.corpus)")
        if missing:
            raise ConfigError(
                "the qwen3_4b variant needs " + ", ".join(missing) + ": e.g. "
                "--config.model.path=/ckpt/Qwen3-4B --config.data.train_files=/data/train.parquet "
                "--config.tools.retriever_url=http://127.0.0.1:8000/retrieve"
            )


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def workdir_path(workdir: str, *parts: str) -> str:
    path = pathlib.Path(workdir, *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)
