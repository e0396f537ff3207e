"""Greedy evaluation of a policy checkpoint: EM / F1 per ``data_source`` (DESIGN.md §7).

    python -m atpo_jax.evaluate --config=configs/search_qa.py[:variant] --checkpoint=PATH \\
        [--step=K] [--workdir=OUT] [--config.a.b=value ...]

``PATH`` is either

* a run's orbax checkpoint directory (``<run>/checkpoints``): the model is built from the config
  (``model.path`` or ``model.random``) and its parameters are read from step ``K`` (default: the
  newest complete checkpoint; a save that was interrupted is never read), or
* a Hugging Face checkpoint directory (it has ``config.json``, e.g. ``<run>/hf_export``): it
  replaces ``model.path``.

Everything else (data, tokenizer, retriever, ``eval.*``, the device mesh ``mesh.*``) comes from
the config, so pass the same ``--config`` overrides as the training run. It runs as one process
over that process's devices. Evaluation is the trainer's: greedy decoding, one chain
per question, the reward's format check skipped (``atpo_jax.train.evaluation``), so a run's own
``eval_<K>.json`` is reproduced exactly. The markdown table is printed and the results are saved
as ``<OUT>/evaluation_step_<K>.json`` (orbax) or ``<OUT>/evaluation_<directory name>.json`` (Hugging
Face). The paper's Table 1 (per-benchmark EM, multi-hop and single-hop averages; other data sources
in a section of their own, ``atpo_jax.train.table1``) is printed too and saved beside it as
``evaluation_<tag>_table1.json`` and ``.md``. ``OUT`` defaults to the run directory (the parent
of ``PATH`` when that holds a run), else ``runs/evaluate/<directory name>``. A configuration problem (a missing or mismatched checkpoint,
data file, retriever or setting) exits with status 2 and one message on stderr; so does a checkpoint
that cannot be read or fails its integrity check (the evaluator never reports metrics of damaged
weights).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from atpo_jax.builder import build_run
from atpo_jax.cli import fail, parse_flags, quiet_closed_event_loop
from atpo_jax.config import run_settings
from atpo_jax.data.settings import DataSource
from atpo_jax.settings import ConfigError
from atpo_jax.train import evaluation, table1
from atpo_jax.train.checkpointing import Checkpointer, CheckpointError

logger = logging.getLogger(__name__)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/search_qa.py", "Path to an ml_collections config file[:variant]."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A run's checkpoint directory (<run>/checkpoints) or a Hugging Face one."
)
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step to evaluate (orbax directories only; default: the latest)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the JSON goes (default: the run directory, else runs/evaluate/<name>)."
)


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint directory (rather than an orbax one)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metrics.jsonl")) or os.path.isdir(
        os.path.join(path, "checkpoints")
    )


def _checkpoint_step(directory: str, step: int | None) -> int:
    """The step to read from orbax ``directory``: ``step`` if complete there, else the newest."""
    reader = Checkpointer(directory, read_only=True)
    try:
        steps = reader.all_steps()
    finally:
        reader.close()
    if not steps:
        raise ConfigError(
            f"--checkpoint={directory!r} holds no complete checkpoint (nor config.json of a "
            "Hugging Face checkpoint): point it at <run>/checkpoints or a Hugging Face directory"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"--step={step}: {directory!r} has complete checkpoints {steps}")
    return step


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    *,
    step: int | None = None,
    workdir: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Evaluates ``checkpoint`` (see the module doc); returns ``(results, json_path)``.

    ``results`` is :func:`atpo_jax.train.evaluation.evaluate`'s dict plus ``checkpoint``, ``step``
    (None for a Hugging Face directory) and ``eval_split``.

    Raises:
      ConfigError: a missing or unusable checkpoint, data file, retriever or setting.
    """
    checkpoint = os.path.abspath(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint={checkpoint!r} is not a directory")
    settings = run_settings(config)
    hf = is_hf_checkpoint(checkpoint)
    parent = os.path.dirname(checkpoint)
    if hf:
        if step is not None:
            raise ConfigError(
                "--step only applies to orbax checkpoint directories, not to a Hugging Face one"
            )
        settings = dataclasses.replace(
            settings, model=dataclasses.replace(settings.model, path=checkpoint)
        )
        tag = os.path.basename(checkpoint)
    else:
        step = _checkpoint_step(checkpoint, step)
        tag = f"step_{step:06d}"
    run_dir = parent if (not hf or _is_run_dir(parent)) else None
    out = workdir or run_dir or os.path.join("runs", "evaluate", os.path.basename(checkpoint))
    os.makedirs(out, exist_ok=True)

    # The run's synthetic world (<run>/synthetic) when there is one; else one under ``out``.
    run = build_run(settings, run_dir or out, training=False)
    rows = evaluation.eval_rows(run.data.eval, settings.eval)
    if not rows:
        raise ConfigError("no evaluation questions: check eval.split / data.eval_files")
    params = run.initial_params()
    if not hf:
        params = _restore_params(params, checkpoint, step)  # into the placed shardings
    results = evaluation.evaluate(
        run.eval_search,
        run.rollout_params(params),
        run.data.tokenizer,
        rows,
        batch_prompts=settings.eval.batch_prompts,
        reward=settings.reward,
    )
    results.update(
        checkpoint=checkpoint,
        step=step,
        eval_split=str(settings.eval.split)
        if settings.data.source == DataSource.SYNTHETIC
        else settings.data.eval_files,
    )
    path = os.path.join(out, f"evaluation_{tag}.json")
    evaluation.save_results(results, path)
    table1.save(results, path)  # the paper's Table 1 beside it, as JSON and markdown
    return results, path


def _restore_params(params: Any, directory: str, step: int) -> Any:
    """The ``params`` item of orbax checkpoint ``step``, read into ``params``' shardings."""
    reader = Checkpointer(directory, read_only=True)
    try:
        return reader.restore(step, target={"params": params})["params"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"the parameters of {directory!r} step {step} do not fit the model built from the "
            "config (model.path / model.random.*); pass the training run's --config overrides "
            f"({type(e).__name__}: {e})"
        ) from e
    finally:
        reader.close()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required (<run>/checkpoints or a Hugging Face dir)")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("atpo_jax").setLevel(logging.INFO)
    quiet_closed_event_loop()  # a damaged checkpoint's failed read leaves orbax noise behind
    try:
        results, path = evaluate_checkpoint(
            _CONFIG.value, _CHECKPOINT.value, step=_STEP.value, workdir=_WORKDIR.value
        )
    except ConfigError as e:
        fail("configuration error", e)
    except CheckpointError as e:
        fail("checkpoint error", e)
    where = results["checkpoint"] + ("" if results["step"] is None else f" step {results['step']}")
    print(f"Greedy evaluation of {where} ({results['n']} questions):")
    print(evaluation.markdown_table(results))
    print("\nThe paper's Table 1 (EM by benchmark, multi-hop and single-hop averages):")
    print(table1.markdown(table1.table1(results)))
    stem = os.path.splitext(path)[0]
    print(f"saved {path}, {stem}_table1.json and {stem}_table1.md")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
