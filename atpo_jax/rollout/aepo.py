"""AEPO's entropy-triggered chain branching as pure decisions (ALGORITHM.md §5, the AEPO baseline).

The reference's chain rollout (``AEPO/verl_aepo_entropy/verl/workers/rollout/vllm_rollout/
vllm_rollout_with_tools.py``, ``generate_sequences``) starts ``initial_rollouts`` chains per
prompt and, after every round of generation and tool calls, lets chains branch until the prompt
has ``n = samples_per_tree`` chains:

1. Entropy of a call. For each generate call of a chain, over its first ``P = 20`` generated
   positions (fewer if the call generated fewer tokens):

       H = (1 / log |V|) · Σ_{t < min(P, T)} Σ_{v ∈ E_t} −p_t(v) log p_t(v)

   where ``E_t`` are the entries the sampler returned at position t: the top-k tokens (vLLM
   ``logprobs=10``) plus the sampled token when it is not among them, and |V| is the tokenizer's
   vocabulary size (``len(tokenizer.get_vocab())``). It is a SUM over positions, not a mean. A call
   that generated nothing has H = 0. :func:`topk_call_entropy`; :func:`exact_call_entropy` is the
   same sum with each position's exact entropy (``rollout.aepo_entropy='exact'``).
2. ``H_first`` of a chain is the H of its first call (for a copy: its first call after the
   copy; for a fresh chain: its first call from the prompt), ``H_now`` that of its latest call.
3. Copies. For each prompt with ``m`` chains so far (active or finished) and remaining room
   ``n − m``, in chain order, each still-active chain gets up to ``min(beam_size − 1, room left)``
   draws ``u ~ U[0, 1)``; a draw makes one copy when

       clamp((u + w · (H_now − H_first)) · max(0, 1 − α · c), 0, 1) ≥ threshold

   with ``w = entropy_weight`` (0.2), ``α = penalty`` (0.05), ``threshold`` (0.5) and ``c`` the
   prompt's consecutive branching rounds. A copy is the chain as it is now (its tokens up to and
   including the tool result just inserted, its tool-call counter); it then generates on its own.
   :func:`chain_copies` (one chain), :func:`plan_round` (a round).
4. Fresh chains. A prompt with no active chain and fewer than n chains gets ONE new chain from the
   prompt per round (so every prompt ends with exactly n chains).
5. ``c`` of a prompt becomes ``c + 1`` after a round in which it got a new chain (a copy or a
   fresh chain: the reference counts both), else 0.

Deliberate differences from the reference (its defects; the spec above is what it means):

* The reference keeps ``H_first`` in a dict keyed by the chain's index in the batch that is never
  cleared between training steps, so from the second step on ``H_first`` is whatever chain had
  that index first, in an earlier step. Here the caller records ``H_first`` per chain of the
  current rollout.
* Its consecutive counts are updated only in a round in which some prompt of the whole batch got
  a new chain (a round without any leaves every count as it was). Here a prompt's count depends
  on that prompt's rounds only: a round that gives the prompt nothing resets it.
* Draws come from a NumPy ``Generator`` (the caller derives one per prompt and round, as
  ``TreeSearch.tree_rng``), not Python's global ``random``.

The rollout scheduler (``atpo_jax.rollout.tree_search``, ``rollout.mode='aepo'``) runs the rounds:
a tree's chains pause after each tool round, and once all are paused or done it calls
:func:`plan_round` for that tree alone and forks the copies and the fresh chain.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from atpo_jax.rollout.settings import AEPOEntropy, RolloutSettings


@dataclasses.dataclass(frozen=True)
class BranchRule:
    """The constants of the branching decision (defaults: the reference's AEPO script).

    Attributes:
      samples: n, the chains every prompt ends with (``rollout.samples_per_tree``, 16).
      beam_size: an active chain makes up to ``beam_size − 1`` copies per round (2).
      entropy_weight: w of the entropy rise (``rollout.aepo_entropy_weight``, 0.2).
      threshold: the score a draw must reach (``rollout.aepo_branch_threshold``, 0.5).
      penalty: α of the consecutive-branch factor 1 − α c (``rollout.aepo_branch_penalty``, 0.05).
    """

    samples: int = 16
    beam_size: int = 2
    entropy_weight: float = 0.2
    threshold: float = 0.5
    penalty: float = 0.05

    def __post_init__(self) -> None:
        if self.samples < 1 or self.beam_size < 1:
            raise ValueError(
                f"BranchRule: samples={self.samples} and beam_size={self.beam_size} must be >= 1"
            )
        if not (math.isfinite(self.entropy_weight) and math.isfinite(self.penalty)):
            raise ValueError("BranchRule: entropy_weight and penalty must be finite")

    @classmethod
    def from_settings(cls, settings: RolloutSettings) -> BranchRule:
        return cls(
            samples=settings.samples_per_tree,
            beam_size=settings.beam_size,
            entropy_weight=settings.aepo_entropy_weight,
            threshold=settings.aepo_branch_threshold,
            penalty=settings.aepo_branch_penalty,
        )


def returned_entries(
    top_ids: np.ndarray,
    top_log_probs: np.ndarray,
    sampled_ids: np.ndarray,
    sampled_log_probs: np.ndarray,
) -> np.ndarray:
    """The log-probs vLLM returns per position for ``logprobs=k``: the top-k entries plus the
    sampled token when it is not among them.

    Args:
      top_ids, top_log_probs: [T, K] the k most likely tokens of each position and their log-probs.
      sampled_ids, sampled_log_probs: [T] the sampled token of each position and its log-prob.

    Returns:
      [T, K + 1] float64: the top-k log-probs, then the sampled token's log-prob where it is not in
      the top-k and ``-inf`` (no entry) where it is.
    """
    top_ids, top_log_probs = np.asarray(top_ids), np.asarray(top_log_probs, np.float64)
    sampled_ids = np.asarray(sampled_ids)
    if top_ids.shape != top_log_probs.shape or top_ids.ndim != 2:
        raise ValueError(
            f"top_ids {top_ids.shape} and top_log_probs {top_log_probs.shape} must be [T, K]"
        )
    if sampled_ids.shape != (top_ids.shape[0],) or np.shape(sampled_log_probs) != sampled_ids.shape:
        raise ValueError(f"sampled_ids/sampled_log_probs must be [T={top_ids.shape[0]}]")
    outside = ~np.any(top_ids == sampled_ids[:, None], axis=1)
    extra = np.where(outside, np.asarray(sampled_log_probs, np.float64), -np.inf)
    return np.concatenate([top_log_probs, extra[:, None]], axis=1)


def topk_call_entropy(entry_log_probs: np.ndarray, vocab_size: int, positions: int = 20) -> float:
    """H of one generate call from the entries the sampler returned (the reference's signal).

    Args:
      entry_log_probs: [T, E] log-probs of the returned entries of each generated position
        (:func:`returned_entries`); ``-inf`` marks no entry. T may be 0.
      vocab_size: |V|, the tokenizer's vocabulary size (> 1).
      positions: the leading positions summed over (the reference: 20).

    Returns:
      Σ over the first ``min(positions, T)`` positions and their entries of −p log p, divided by
      log |V|; 0 for a call with no tokens.

    Example: one position with entries p = (0.5, 0.25) and |V| = 100:
    ``topk_call_entropy(np.log([[0.5, 0.25]]), 100)`` = (0.5 ln 2 + 0.25 ln 4) / ln 100 ≈ 0.1505.
    """
    entries = np.asarray(entry_log_probs, np.float64)
    if entries.ndim != 2:
        raise ValueError(f"entry_log_probs must be [T, E], got shape {entries.shape}")
    head = entries[: _check_positions(positions, vocab_size)]
    present = np.isfinite(head)
    safe = np.where(present, head, 0.0)
    return float(np.sum(np.where(present, -np.exp(safe) * safe, 0.0)) / math.log(vocab_size))


def exact_call_entropy(entropies: Sequence[float], vocab_size: int, positions: int = 20) -> float:
    """H of one generate call from each position's exact entropy (nats; ``Generation.entropies``):
    Σ over the first ``min(positions, T)`` positions, divided by log |V| (``aepo_entropy='exact'``)."""
    values = np.asarray(entropies, np.float64).reshape(-1)
    return float(np.sum(values[: _check_positions(positions, vocab_size)]) / math.log(vocab_size))


def call_entropy(
    settings: RolloutSettings,
    vocab_size: int,
    *,
    entry_log_probs: np.ndarray | None = None,
    entropies: Sequence[float] | None = None,
) -> float:
    """H of a call by ``rollout.aepo_entropy`` (``topk`` needs ``entry_log_probs``, ``exact``
    ``entropies``), over ``rollout.aepo_entropy_positions`` positions."""
    positions = settings.aepo_entropy_positions
    if settings.aepo_entropy == AEPOEntropy.TOPK:
        if entry_log_probs is None:
            raise ValueError("rollout.aepo_entropy='topk' needs the call's top-k entries")
        return topk_call_entropy(entry_log_probs, vocab_size, positions)
    if entropies is None:
        raise ValueError("rollout.aepo_entropy='exact' needs the call's per-token entropies")
    return exact_call_entropy(entropies, vocab_size, positions)


def chain_copies(
    h_now: float,
    h_first: float,
    consecutive: int,
    room: int,
    rule: BranchRule,
    rng: np.random.Generator,
) -> int:
    """How many copies one active chain makes this round (0 .. min(beam_size − 1, room)).

    Each of the ``min(beam_size − 1, room)`` draws ``u = rng.random()`` makes a copy when
    ``clamp((u + w (h_now − h_first)) · max(0, 1 − α consecutive), 0, 1) >= threshold``.
    Draws are taken even when they cannot succeed, so the generator's stream does not depend
    on the entropies.
    """
    factor = max(0.0, 1.0 - rule.penalty * consecutive)
    rise = rule.entropy_weight * (h_now - h_first)
    copies = 0
    for _ in range(max(0, min(rule.beam_size - 1, room))):
        score = min(1.0, max(0.0, (rng.random() + rise) * factor))
        copies += score >= rule.threshold
    return copies


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What one branching round creates.

    Attributes:
      copies: [C] int, copies each active chain (in the order given) makes.
      fresh: [P] bool, whether the prompt gets one fresh chain from the prompt.
      consecutive: [P] int, each prompt's consecutive branching rounds after this round.
    """

    copies: np.ndarray
    fresh: np.ndarray
    consecutive: np.ndarray

    @property
    def new_chains(self) -> int:
        return int(self.copies.sum() + self.fresh.sum())


def plan_round(
    *,
    prompt_of_chain: Sequence[int],
    h_now: Sequence[float],
    h_first: Sequence[float],
    chains: Sequence[int],
    consecutive: Sequence[int],
    rule: BranchRule,
    rng: np.random.Generator,
) -> RoundPlan:
    """One round of AEPO branching (steps 3-5 of the module docstring).

    Call it once the round's generations and tool calls are done, with the chains that are
    still active (a chain that ended this round, or used its budget, is not passed).

    Args:
      prompt_of_chain: [C] the prompt (in 0..P-1) of each active chain, in chain order (the
        reference: creation order); draws are taken prompt by prompt in order of each prompt's
        first chain here, then chain by chain.
      h_now, h_first: [C] each chain's H of its latest and of its first call.
      chains: [P] chains each prompt has so far, active or finished (initial + copies + fresh).
      consecutive: [P] each prompt's consecutive branching rounds before this one.
      rule: the constants.
      rng: the draws (one ``random()`` per possible copy). For results that do not depend on
        which prompts share a batch, call it per prompt with that prompt's generator.

    Returns:
      the :class:`RoundPlan`; ``chains[p] + copies of p's chains + fresh[p] <= rule.samples``.
    """
    prompt_of_chain = np.asarray(prompt_of_chain, np.int64).reshape(-1)
    h_now = np.asarray(h_now, np.float64).reshape(-1)
    h_first = np.asarray(h_first, np.float64).reshape(-1)
    chains = np.asarray(chains, np.int64).reshape(-1)
    consecutive = np.asarray(consecutive, np.int64).reshape(-1)
    num_chains, num_prompts = prompt_of_chain.shape[0], chains.shape[0]
    if h_now.shape != (num_chains,) or h_first.shape != (num_chains,):
        raise ValueError(f"h_now and h_first must have one entry per chain ({num_chains})")
    if consecutive.shape != (num_prompts,):
        raise ValueError(f"consecutive must have one entry per prompt ({num_prompts})")
    if num_chains and not (prompt_of_chain.min() >= 0 and prompt_of_chain.max() < num_prompts):
        raise ValueError(f"prompt_of_chain must index the {num_prompts} prompts")
    copies = np.zeros(num_chains, np.int64)
    for p in dict.fromkeys(prompt_of_chain.tolist()):  # prompts in order of first appearance
        room = rule.samples - int(chains[p])
        for c in np.flatnonzero(prompt_of_chain == p):
            left = room - int(copies[prompt_of_chain == p].sum())
            if left <= 0:
                break
            copies[c] = chain_copies(h_now[c], h_first[c], int(consecutive[p]), left, rule, rng)
    active = np.zeros(num_prompts, bool)
    active[prompt_of_chain] = True
    fresh = ~active & (chains < rule.samples)
    got = fresh | (np.bincount(prompt_of_chain, weights=copies, minlength=num_prompts) > 0)
    return RoundPlan(copies, fresh, np.where(got, consecutive + 1, 0))


def _check_positions(positions: int, vocab_size: int) -> int:
    if positions < 1 or vocab_size < 2:
        raise ValueError(f"positions={positions} must be >= 1 and vocab_size={vocab_size} >= 2")
    return positions
