"""A training run's settings: the loop's own section (``train``) and the composite of every
section, with the checks that span sections.

Each section is its owner's frozen dataclass, with its defaults and its own validation
(``models.ModelSettings``, ``rollout.RolloutSettings``, ``train.policy.LossSettings``, ...).
:class:`RunSettings` only puts them together and checks what no single section can; a config file
is built from these dataclasses and converted back in one call (``atpo_jax.config``).
"""

from __future__ import annotations

import dataclasses

from atpo_jax.data.settings import DataSettings, DataSource
from atpo_jax.models.settings import ModelSettings
from atpo_jax.parallel import MeshSettings
from atpo_jax.rewards.qa import RewardSettings
from atpo_jax.rollout.settings import RolloutMode, RolloutSettings
from atpo_jax.settings import ConfigError, check, coerce_choices
from atpo_jax.tools.settings import ToolSettings
from atpo_jax.train.checkpointing import CheckpointSettings
from atpo_jax.train.credit import CreditMode, CreditSettings
from atpo_jax.train.evaluation import EvalSettings
from atpo_jax.train.metrics import LoggingSettings
from atpo_jax.train.optimizer import OptimizerSettings, Schedule
from atpo_jax.train.packing import Packing
from atpo_jax.train.policy import LossSettings, OldLogProbs, check_micro_batches
from atpo_jax.train.sft import SFTSettings


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The RL loop (the ``train`` section of a run's config).

    Attributes:
      steps: RL steps (0: warm start and evaluation only).
      prompts_per_step: questions rolled out per step (each a tree of ``samples_per_tree`` rows).
      mini_batch_prompts: questions per optimizer update (``prompts_per_step`` must be a multiple).
      ppo_epochs: passes over the step's mini-batches.
      packing: how a mini-batch's leaf rows are laid out for the policy passes
        (``atpo_jax.train.packing``): ``tree`` (each tree's nodes computed once: shared prefixes
        are not recomputed), ``rows`` (rows end to end, no padding) or ``padded`` (one row per
        leaf padded to ``rollout.max_prompt_len + max_response_len``, the reference layout).
      micro_batch_tokens: ``rows`` / ``tree``: tokens per packed sequence, one sequence per batch
        device per micro-batch (the reference's ``use_dynamic_bsz`` budget, 16,384 per GPU). A
        single row longer than this gets a sequence of twice (four times, ...) the budget: set it
        to at least ``max_prompt_len + max_response_len`` to keep to one program shape.
      micro_batch_rows: ``padded``: rows per gradient-accumulation micro-batch; divides a
        mini-batch's rows and is divisible by the batch devices (``mesh.data x mesh.fsdp``).
      log_every: a progress line every k steps when stderr is not a terminal.
      max_nonfinite_skips: consecutive optimizer updates skipped for a non-finite loss or
        gradient after which the run stops with an error (0: never stop, only count them).
    """

    steps: int = 100
    prompts_per_step: int = 64
    mini_batch_prompts: int = 8
    ppo_epochs: int = 1
    packing: Packing = Packing.TREE
    micro_batch_tokens: int = 16384
    micro_batch_rows: int = 22
    log_every: int = 1
    max_nonfinite_skips: int = 3

    def __post_init__(self) -> None:
        coerce_choices(self, "train")
        check(
            self.max_nonfinite_skips >= 0,
            f"train.max_nonfinite_skips={self.max_nonfinite_skips} must be >= 0 (0: never stop)",
        )
        check(
            self.micro_batch_tokens >= 1,
            f"train.micro_batch_tokens={self.micro_batch_tokens} must be >= 1",
        )
        check(
            self.steps >= 0 and self.ppo_epochs >= 1,
            f"train.steps must be >= 0 (0: warm start and evaluation only) and train.ppo_epochs "
            f">= 1, got {self.steps}, {self.ppo_epochs}",
        )
        check(
            self.log_every >= 1,
            f"train.log_every={self.log_every} must be >= 1 (steps between log lines)",
        )
        check(
            self.prompts_per_step >= 1,
            f"train.prompts_per_step={self.prompts_per_step} must be >= 1 (questions rolled out "
            "per RL step)",
        )
        check(
            self.mini_batch_prompts >= 1,
            f"train.mini_batch_prompts={self.mini_batch_prompts} must be >= 1 (questions per "
            f"optimizer update) and divide train.prompts_per_step={self.prompts_per_step}",
        )
        check(
            self.prompts_per_step % self.mini_batch_prompts == 0,
            f"train.mini_batch_prompts={self.mini_batch_prompts} must divide "
            f"train.prompts_per_step={self.prompts_per_step}",
        )

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.prompts_per_step // self.mini_batch_prompts)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Every setting of a run, one section per consumer.

    Attributes:
      variant: the config file's variant (names the default workdir, ``runs/<variant>``).
      seed: the root of all randomness (model init, data order, rollouts).
      required: settings the recipe refuses to start without; ``"a|b"`` means either.
      model, data, tools, rollout, credit, reward, loss, optim, train, sft, eval, checkpoint,
        logging, mesh: the sections (see each dataclass).
    """

    variant: str = "tiny"
    seed: int = 0
    required: tuple[str, ...] = ()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    tools: ToolSettings = ToolSettings()
    rollout: RolloutSettings = RolloutSettings()
    credit: CreditSettings = CreditSettings()
    reward: RewardSettings = RewardSettings()
    loss: LossSettings = LossSettings()
    optim: OptimizerSettings = OptimizerSettings()
    train: TrainSettings = TrainSettings()
    sft: SFTSettings = SFTSettings()
    eval: EvalSettings = EvalSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    logging: LoggingSettings = LoggingSettings()
    mesh: MeshSettings = MeshSettings()

    def __post_init__(self) -> None:
        # NumPy refuses a negative seed (the data order, in the first RL step) and JAX one that
        # does not fit 64 bits.
        check(0 <= self.seed < 2**63, f"seed={self.seed} must be in [0, 2**63)")
        r = self.rollout
        if r.mode == RolloutMode.TREE and r.chains_per_tree != r.samples_per_tree:
            raise ConfigError(
                f"rollout.samples_per_tree={r.samples_per_tree} but the tree grows initial_rollouts "
                f"+ expansion_iterations x beam_size = {r.initial_rollouts} + "
                f"{r.expansion_iterations} x {r.beam_size} = {r.chains_per_tree} leaves; make them "
                "equal (the reference asserts this too)"
            )
        if self.train.packing == Packing.PADDED:  # rows/tree packing size by micro_batch_tokens
            check(
                self.train.micro_batch_rows >= 1,
                f"train.micro_batch_rows={self.train.micro_batch_rows} must be >= 1 (rows per "
                "micro-batch with train.packing='padded')",
            )
        try:  # the devices' share is checked with the mesh (build_run)
            if self.train.packing == Packing.PADDED:
                check_micro_batches(
                    self.train.mini_batch_prompts * r.samples_per_tree,
                    self.train.micro_batch_rows,
                    rows_are="the mini-batch rows train.mini_batch_prompts x "
                    "rollout.samples_per_tree",
                )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        check(
            self.loss.old_log_probs != OldLogProbs.SAMPLER or r.samples_from_policy,
            "loss.old_log_probs='sampler' needs rollout.temperature=1, top_p=1, top_k=0 (the "
            "sampler's log-probs are then the policy's); use 'recompute' otherwise",
        )
        check(
            not (r.mode != RolloutMode.TREE and self.credit.mode == CreditMode.TREE),
            f"rollout.mode={str(r.mode)!r} has no tree to assign credit on (the reference's "
            "chain baselines, AEPO's included, use the GRPO advantage): set credit.mode='grpo'",
        )
        check(
            self.sft.steps == 0 or self.data.source == DataSource.SYNTHETIC,
            "sft.steps > 0 needs demonstrations (data.source=synthetic); set sft.steps=0",
        )
        self._check_schedule_horizon()

    def _check_schedule_horizon(self) -> None:
        """The RL learning-rate schedule against the run's optimizer updates, here rather than
        when the optimizer is built so that it fails before the warm start."""
        o, t = self.optim, self.train
        updates = t.steps * t.updates_per_step
        counted = (
            f"the run's {updates} optimizer updates (train.steps x train.ppo_epochs x "
            "train.prompts_per_step / train.mini_batch_prompts)"
        )
        if o.schedule != Schedule.CONSTANT and not o.total_steps:
            check(
                updates > o.warmup_steps,
                f"optim.schedule={str(o.schedule)!r} decays over {counted}, which must exceed "
                f"optim.warmup_steps={o.warmup_steps}: lower optim.warmup_steps, raise "
                "train.steps, or set optim.total_steps",
            )
        if o.schedule == Schedule.CONSTANT and t.steps > 0:
            # A warm-up longer than the run never reaches optim.learning_rate.
            check(
                o.warmup_steps <= updates,
                f"optim.warmup_steps={o.warmup_steps} is longer than {counted}: the learning "
                "rate would never reach optim.learning_rate; lower optim.warmup_steps",
            )

    def check_required(self) -> None:
        """Raises ``ConfigError`` naming every ``required`` setting that is empty (checked by the
        builder, before anything is read or built)."""
        missing = [n for n in self.required if not any(self.lookup(m) for m in n.split("|"))]
        if missing:
            wanted = ", ".join(_alternatives(m) for m in missing)
            example = " ".join(f"--config.{m.split('|')[0]}=..." for m in missing)
            raise ConfigError(f"the {self.variant} variant needs {wanted}: e.g. {example}")

    def lookup(self, dotted: str) -> object:
        """The value of ``section.field`` (e.g. ``"model.path"``)."""
        value: object = self
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(value) or part not in {
                f.name for f in dataclasses.fields(value)
            }:
                raise ConfigError(f"required={self.required}: {dotted!r} names no setting")
            value = getattr(value, part)
        return value


def _alternatives(required: str) -> str:
    """``"a|b|c"`` -> ``"a (or b or c)"``."""
    first, *rest = required.split("|")
    return first + (f" (or {' or '.join(rest)})" if rest else "")
