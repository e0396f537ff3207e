"""Rollout settings (the ``rollout`` section of a run's config): tree shape, turn rules, sampling
and the engine's pool. Defaults are the paper's (ALGORITHM.md §5)."""

from __future__ import annotations

import dataclasses
import math

from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.settings import StrEnum, check, coerce_choices


class RolloutMode(StrEnum):
    TREE = "tree"  # AT²PO: initial chains, then entropy-guided expansion rounds
    CHAIN = "chain"  # samples_per_tree independent chains per prompt (the GRPO baselines)
    # AEPO: initial_rollouts chains that branch after tool rounds on an entropy rise
    # (decisions in rollout.aepo, rounds run by the scheduler in rollout.tree_search)
    AEPO = "aepo"


class ExpansionMode(StrEnum):
    ENTROPY = "entropy"  # kernels.select_expansion_nodes: entropy minus a sibling penalty
    RANDOM = "random"  # uniformly among the non-leaf nodes (the paper's ablation)


class EntropyEstimator(StrEnum):
    SAMPLED_NLL = "sampled_nll"  # mean NLL of the turn's sampled tokens (the paper)
    EXACT = "exact"  # mean exact entropy of the sampling distribution


class EmptyCallRule(StrEnum):
    EOS = "eos"  # the reference: append EOS (trained, mask 1) and end the chain
    LEAF = "leaf"  # just end the chain


class ToolFailureRule(StrEnum):
    LEAF = "leaf"  # the reference's tree rollout: the chain ends after the closing tag
    ERROR_TEXT = "error_text"  # the reference's chain rollout: a failure note, then continue


class CallLimitRule(StrEnum):
    WARN = "warn"  # the reference's tree rollout: a masked warning, then the turn goes on
    EOS = "eos"  # the reference's chain rollout (GRPO/AEPO): a trained EOS ends the chain


class AEPOEntropy(StrEnum):
    """AEPO's branching entropy over the first ``aepo_entropy_positions`` tokens of a call."""

    TOPK = "topk"  # the reference: -sum p log p over the top-k entries the sampler returned
    EXACT = "exact"  # the exact entropy of each position's distribution


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How trees are grown, how turns end, how tokens are sampled, and the engine's KV pool.

    Attributes:
      mode: ``tree`` (AT²PO), ``chain`` (independent chains, the GRPO/GSPO baselines) or
        ``aepo`` (``initial_rollouts`` chains that branch on an entropy rise up to
        ``samples_per_tree`` chains, the AEPO baseline; ``atpo_jax.rollout.aepo``).
      initial_rollouts, expansion_iterations, beam_size: the tree shape (I, E, B): I chains, then
        E rounds that each branch B picked nodes of every tree.
      samples_per_tree: leaves kept per tree (training rows per prompt); a tree recipe must grow
        exactly I + E·B (checked by the run), otherwise leaves are pruned or duplicated.
      expansion_mode: ``entropy`` or ``random``.
      expansion_penalty: α in score = entropy − α · max(0, siblings − 1).
      entropy_estimator: the branching signal: ``sampled_nll`` (the paper) or ``exact``.
      max_prompt_len, max_response_len: token limits; the response budget is per row.
      call_limit: tool calls per chain; what a later call gets is ``call_limit_rule``.
      call_limit_rule: ``warn`` (the reference's tree: a masked warning, generation goes on) or
        ``eos`` (the reference's chain rollout: a trained EOS ends the chain).
      observation_margin: a tool result that does not fit is cut to leave this many tokens.
      empty_call: ``eos`` (the reference: a trained EOS ends the chain) or ``leaf``.
      tool_failure: ``leaf`` (end the chain) or ``error_text`` (insert a failure note, continue).
      tool_workers: concurrent tool calls.
      tool_rejoin_chunks: a tool result rejoins decoding K decode chunks after its call was made
        (the chain waits there for a late result, and the scheduler with it): a point fixed by the
        trees, so decode batches, hence every float, do not depend on tool timing. Decoding
        overlaps a call for up to K chunks: raise K where calls take longer than K chunks (short
        chunks of a small model on CPU); when nothing else can decode, results are taken as they
        come.
      temperature, top_p, top_k: sampling (temperature 0 = greedy; top_k 0 and top_p 1 = off).
      num_slots: sequences the engine tracks at once (prompts, chains, finished chains of live
        trees) and the most rows of one decode call; trees are admitted while they fit.
      decode_chunk: decode steps per device call between host checks (stop strings end rows
        inside the call; the scheduler refills the batch between calls).
      kv_bucket: granularity of the attended cache length (attention cost follows it); a
        multiple of ``page_size``.
      page_size: positions per KV-cache page (shared prefixes are shared page by page).
      kv_pages: pages in the engine's KV pool, the pool's size in tokens divided by
        ``page_size`` (0: enough for ``num_slots`` full sequences, so nothing waits; set it to
        what the device memory holds, see docs/rollout.md). When it is full, chains wait.
      trace_every: write an HTML/JSONL tree trace every k training steps (0: never).
      aepo_entropy: AEPO's branching entropy H of a call (``atpo_jax.rollout.aepo``): ``topk``
        (the reference: over the sampler's top-``aepo_entropy_topk`` entries) or ``exact``; H
        sums over the call's first ``aepo_entropy_positions`` tokens, divided by log |V|.
      aepo_entropy_topk: entries per position of the ``topk`` entropy (the reference's vLLM
        ``logprobs=10``; the sampled token is added when it is not among them).
      aepo_entropy_positions: leading tokens of a call that H sums over (the reference: 20).
      aepo_entropy_weight: w in the branching score u + w (H_now − H_first) (the reference's
        ``entropy_weight``).
      aepo_branch_threshold: a copy is made when the score, times the consecutive-branch
        factor and clamped to [0, 1], is >= this (the reference's ``branch_probability``).
      aepo_branch_penalty: the factor is max(0, 1 − penalty × consecutive branching rounds).
    """

    mode: RolloutMode = RolloutMode.TREE
    initial_rollouts: int = 10
    expansion_iterations: int = 2
    beam_size: int = 6
    samples_per_tree: int = 22
    expansion_mode: ExpansionMode = ExpansionMode.ENTROPY
    expansion_penalty: float = 0.05
    entropy_estimator: EntropyEstimator = EntropyEstimator.SAMPLED_NLL
    max_prompt_len: int = 2000
    max_response_len: int = 6192
    call_limit: int = 6
    call_limit_rule: CallLimitRule = CallLimitRule.WARN
    observation_margin: int = 100
    empty_call: EmptyCallRule = EmptyCallRule.EOS
    tool_failure: ToolFailureRule = ToolFailureRule.LEAF
    tool_workers: int = 32
    tool_rejoin_chunks: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_slots: int = 256
    decode_chunk: int = 32
    kv_bucket: int = 256
    page_size: int = 16
    kv_pages: int = 0
    trace_every: int = 0
    aepo_entropy: AEPOEntropy = AEPOEntropy.TOPK
    aepo_entropy_topk: int = 10
    aepo_entropy_positions: int = 20
    aepo_entropy_weight: float = 0.2
    aepo_branch_threshold: float = 0.5
    aepo_branch_penalty: float = 0.05

    def __post_init__(self) -> None:
        coerce_choices(self, "rollout")
        for name in (
            "initial_rollouts",
            "samples_per_tree",
            "max_prompt_len",
            "max_response_len",
            "tool_workers",
            "tool_rejoin_chunks",
            "num_slots",
            "decode_chunk",
            "kv_bucket",
            "page_size",
            "aepo_entropy_topk",
            "aepo_entropy_positions",
        ):
            check(
                getattr(self, name) >= 1, f"rollout.{name} must be >= 1, got {getattr(self, name)}"
            )
        for name in (
            "expansion_iterations",
            "beam_size",
            "call_limit",
            "observation_margin",
            "top_k",
            "trace_every",
            "kv_pages",
        ):
            check(
                getattr(self, name) >= 0, f"rollout.{name} must be >= 0, got {getattr(self, name)}"
            )
        # NaN fails every comparison, so these read "finite and in range".
        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"rollout.temperature must be a finite number >= 0 (0: greedy), got {self.temperature}",
        )
        check(
            math.isfinite(self.expansion_penalty),
            f"rollout.expansion_penalty must be a finite number, got {self.expansion_penalty}",
        )
        check(
            self.kv_bucket % self.page_size == 0,
            f"rollout.kv_bucket={self.kv_bucket} must be a multiple of rollout.page_size="
            f"{self.page_size}",
        )
        check(
            self.kv_pages == 0 or self.kv_pages >= 2,
            f"rollout.kv_pages={self.kv_pages} must be 0 (dense-equivalent) or >= 2",
        )
        check(0.0 < self.top_p <= 1.0, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        self._check_aepo()
        # The tree search keeps one slot for the prompt plus one per chain of a tree.
        check(
            self.num_slots >= 1 + self.chains_per_tree,
            f"rollout.num_slots={self.num_slots} cannot hold one tree: it needs 1 + chains per "
            f"tree = {1 + self.chains_per_tree} engine slots; raise rollout.num_slots to at least "
            f"{1 + self.chains_per_tree}",
        )

    def _check_aepo(self) -> None:
        for name in ("aepo_entropy_weight", "aepo_branch_penalty"):
            value = getattr(self, name)
            check(math.isfinite(value), f"rollout.{name} must be a finite number, got {value}")
        check(
            self.aepo_branch_penalty >= 0,
            f"rollout.aepo_branch_penalty={self.aepo_branch_penalty} must be >= 0",
        )
        check(
            0.0 <= self.aepo_branch_threshold <= 1.0,
            f"rollout.aepo_branch_threshold={self.aepo_branch_threshold} must be in [0, 1] (the "
            "branching score is clamped to [0, 1] before the comparison)",
        )
        if self.mode == RolloutMode.AEPO:
            check(
                self.initial_rollouts <= self.samples_per_tree and self.beam_size >= 1,
                f"rollout.mode='aepo' starts rollout.initial_rollouts={self.initial_rollouts} "
                f"chains and grows them to rollout.samples_per_tree={self.samples_per_tree} "
                f"(n), each active chain making up to rollout.beam_size - 1 copies per round "
                f"(beam_size={self.beam_size}): initial_rollouts must be <= samples_per_tree and "
                "beam_size >= 1 (1: no copies, fresh chains only)",
            )

    @property
    def initial_chains(self) -> int:
        """Chains started from the prompt before any expansion."""
        return self.samples_per_tree if self.mode == RolloutMode.CHAIN else self.initial_rollouts

    @property
    def chains_per_tree(self) -> int:
        """Chains (hence leaves) a tree grows before pruning/duplication (AEPO: exactly n, its
        copies and fresh chains stop there)."""
        if self.mode in (RolloutMode.CHAIN, RolloutMode.AEPO):
            return self.samples_per_tree
        return self.initial_rollouts + self.expansion_iterations * self.beam_size

    @property
    def rounds(self) -> int:
        """Expansion rounds after the initial chains (tree mode only: AEPO branches inside
        its chains' growth)."""
        return self.expansion_iterations if self.mode == RolloutMode.TREE else 0

    @property
    def max_len(self) -> int:
        """Tokens per sequence: prompt plus response."""
        return self.max_prompt_len + self.max_response_len

    @property
    def samples_from_policy(self) -> bool:
        """Whether the sampler draws from the policy itself (temperature 1, no truncation), so
        its log-probs are the policy's."""
        return self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k <= 0

    def sampling(self, vocab_limit: int | None, *, greedy: bool = False) -> SamplingParams:
        """The engine's sampling parameters (greedy for evaluation)."""
        return SamplingParams(
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            vocab_limit=vocab_limit,
        )

    def for_evaluation(self, max_response_len: int = 0) -> RolloutSettings:
        """Validation (ALGORITHM.md §1.6): one greedy chain per question (``max_response_len``
        0 keeps the training budget)."""
        return dataclasses.replace(
            self,
            mode=RolloutMode.CHAIN,
            samples_per_tree=1,
            initial_rollouts=1,
            expansion_iterations=0,
            max_response_len=max_response_len or self.max_response_len,
        )
