"""What the training loop runs on: a frozen record of a run's built parts.

``atpo_jax.builder.build_run(config, workdir)`` makes one from a config file; a test or a notebook
can also fill one in by hand. It holds no weights: those are the :class:`~atpo_jax.train.state.
TrainState`'s alone; :meth:`Run.initial_params` makes the step-0 parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import optax
from flax import nnx

from atpo_jax import models
from atpo_jax.data.rows import QARow
from atpo_jax.parallel import Placement
from atpo_jax.rollout.tree_search import TreeSearch
from atpo_jax.tools.toolbox import Toolbox
from atpo_jax.train.optimizer import OptimizerSettings
from atpo_jax.train.settings import RunSettings


@dataclasses.dataclass(frozen=True)
class Data:
    """The questions of a run and (for the synthetic world) its files.

    Attributes:
      train, eval: the training and evaluation questions.
      tokenizer: the Hugging Face tokenizer.
      corpus: the search corpus the data comes with (synthetic: the world's), or None.
      demos: the demonstrations file (synthetic), or None.
      world: the synthetic world's entities file (for demonstration renaming), or None.
      retrieval_noise: ``(miss rate, seed)`` of the retrieval noise the data's world is searched
        with (the synthetic ``noisy`` and ``mixed`` worlds: their manifest's ``world.retrieval``);
        the run's search tool wraps its retriever in a ``NoisyRetriever`` when the rate is > 0.
    """

    train: Sequence[QARow]
    eval: Sequence[QARow]
    tokenizer: Any
    corpus: str | None = None
    demos: str | None = None
    world: str | None = None
    retrieval_noise: tuple[float, int] = (0.0, 0)


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's built parts.

    Attributes:
      settings: every setting of the run.
      workdir: where checkpoints, metrics, traces and exports go.
      data: the questions and the tokenizer.
      train_prompts: the training questions' prompt token ids (chat template applied).
      model: the policy's structure (``nnx.eval_shape`` of the module: no weights).
      initial_params: makes the step-0 parameters (loaded or randomly initialised, placed).
      placement: the mesh, the parameters' shardings and this process's share of each batch.
      toolbox: the agent's tools.
      search, eval_search: the training tree search (None in a run built for evaluation only)
        and the greedy single-chain evaluation search, each with its engine.
      optimizer: the optax transformation; ``optim`` its settings, horizon resolved.
      update_fn: ``(params, opt_state, rows) -> (params, opt_state, metrics)``, one mini-batch.
      log_prob_fn: ``(params, rows) -> [rows, R]`` log-probs (old and reference scoring).
      export_dtype: dtype of the final Hugging Face export.
    """

    settings: RunSettings
    workdir: str
    data: Data
    train_prompts: Sequence[Sequence[int]]
    model: models.CausalLM
    initial_params: Callable[[], Any]
    placement: Placement
    toolbox: Toolbox
    search: TreeSearch | None
    eval_search: TreeSearch
    optimizer: optax.GradientTransformation
    optim: OptimizerSettings
    update_fn: Callable
    log_prob_fn: Callable
    export_dtype: Any

    @property
    def graphdef(self) -> nnx.GraphDef:
        return nnx.graphdef(self.model)

    @property
    def model_config(self) -> models.ModelConfig:
        return self.model.config

    def rollout_params(self, params: Any) -> Any:
        """The policy as the engines run it: in the compute dtype (decoding reads bf16 weights,
        not the float32 masters: ``models.compute_params``), on this process's devices."""
        return self.placement.for_rollout(models.compute_params(params, self.model.config))
