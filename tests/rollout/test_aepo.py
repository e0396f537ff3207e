"""AEPO's branching decisions (ALGORITHM.md §5) against hand-computed cases and a transcription of
the reference's loop; its entropy signal against hand sums; its settings' validation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from atpo_jax.rollout import aepo
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.settings import ConfigError

RULE = aepo.BranchRule(samples=16, beam_size=2, entropy_weight=0.2, threshold=0.5, penalty=0.05)


class Scripted:
    """A generator whose ``random()`` returns the given values in order."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


# ------------------------------------------------------------------------------- the entropy


def test_topk_entropy_sums_the_returned_entries_of_the_first_positions():
    # Two positions, entries p = (0.5, 0.25) and (0.9, absent); |V| = 100.
    entries = np.log([[0.5, 0.25], [0.9, 1.0]])
    entries[1, 1] = -np.inf
    want = (0.5 * math.log(2) + 0.25 * math.log(4) + 0.9 * -math.log(0.9)) / math.log(100)
    assert aepo.topk_call_entropy(entries, 100) == pytest.approx(want, rel=1e-12)
    # Only the first `positions` positions count (the reference: 20).
    first = (0.5 * math.log(2) + 0.25 * math.log(4)) / math.log(100)
    assert aepo.topk_call_entropy(entries, 100, positions=1) == pytest.approx(first, rel=1e-12)
    many = np.log(np.full((30, 3), 0.2))
    assert aepo.topk_call_entropy(many, 50) == pytest.approx(
        20 * 3 * 0.2 * math.log(5) / math.log(50), rel=1e-12
    )
    # A call that generated nothing has H = 0 (the reference's empty logprobs).
    assert aepo.topk_call_entropy(np.zeros((0, 10)), 100) == 0.0


def test_returned_entries_add_the_sampled_token_when_it_is_not_in_the_top_k():
    top_ids = np.array([[5, 7], [5, 7]])
    top_lp = np.log([[0.6, 0.3], [0.6, 0.3]])
    got = aepo.returned_entries(top_ids, top_lp, np.array([7, 9]), np.log([0.3, 0.01]))
    np.testing.assert_allclose(got[:, :2], top_lp)
    assert got[0, 2] == -np.inf  # sampled 7 is in the top 2: no extra entry
    assert got[1, 2] == pytest.approx(math.log(0.01))  # sampled 9 is not: its log-prob is added
    h = aepo.topk_call_entropy(got, 1000)
    terms = 2 * (0.6 * -math.log(0.6) + 0.3 * -math.log(0.3)) + 0.01 * -math.log(0.01)
    assert h == pytest.approx(terms / math.log(1000), rel=1e-12)


def test_exact_entropy_option_and_the_settings_dispatch():
    entropies = [1.0, 2.0, 4.0]
    assert aepo.exact_call_entropy(entropies, 8, positions=2) == pytest.approx(3 / math.log(8))
    exact = RolloutSettings(aepo_entropy="exact", aepo_entropy_positions=2)
    assert aepo.call_entropy(exact, 8, entropies=entropies) == pytest.approx(3 / math.log(8))
    topk = RolloutSettings()  # the reference: top-k entries, 20 positions
    entries = np.log([[0.5, 0.5]])
    # (2 · 0.5 ln 2) / ln 4 = 0.5
    assert aepo.call_entropy(topk, 4, entry_log_probs=entries) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="top-k entries"):
        aepo.call_entropy(topk, 4, entropies=entropies)
    with pytest.raises(ValueError, match="per-token entropies"):
        aepo.call_entropy(exact, 4, entry_log_probs=entries)


# ------------------------------------------------------------------------------- one chain


def test_a_copy_needs_the_draw_plus_the_entropy_rise_times_the_penalty_to_reach_the_threshold():
    # u = 0.45 and a rise of 0.3 nats·(1/log|V|): 0.45 + 0.2·0.3 = 0.51 >= 0.5 -> one copy.
    assert aepo.chain_copies(1.3, 1.0, 0, room=8, rule=RULE, rng=Scripted([0.45])) == 1
    # After two consecutive branching rounds the factor is 0.9: 0.51·0.9 = 0.459 < 0.5.
    assert aepo.chain_copies(1.3, 1.0, 2, room=8, rule=RULE, rng=Scripted([0.45])) == 0
    # An entropy drop lowers the score: 0.55 − 0.2·0.5 = 0.45.
    assert aepo.chain_copies(0.5, 1.0, 0, room=8, rule=RULE, rng=Scripted([0.55])) == 0
    # The score is clamped to [0, 1]: a threshold of 1 is reached by any score above 1.
    sure = aepo.BranchRule(beam_size=2, threshold=1.0)
    assert aepo.chain_copies(9.0, 0.0, 0, room=8, rule=sure, rng=Scripted([0.0])) == 1
    # Past 20 consecutive rounds the factor is 0 (not negative): every score is 0, a copy only
    # at threshold 0.
    assert aepo.chain_copies(0.0, 0.0, 25, 8, RULE, Scripted([0.99])) == 0
    assert aepo.chain_copies(0.0, 0.0, 25, 8, aepo.BranchRule(threshold=0.0), Scripted([0.9])) == 1


def test_up_to_beam_size_minus_one_copies_within_the_room():
    wide = aepo.BranchRule(samples=16, beam_size=4)
    rng = Scripted([0.9, 0.1, 0.7])  # three draws: copy, no copy, copy
    assert aepo.chain_copies(0.0, 0.0, 0, room=8, rule=wide, rng=rng) == 2
    rng = Scripted([0.9, 0.9, 0.9])
    assert aepo.chain_copies(0.0, 0.0, 0, room=2, rule=wide, rng=rng) == 2
    assert rng.values == [0.9]  # only min(beam - 1, room) = 2 draws
    assert aepo.chain_copies(0.0, 0.0, 0, room=0, rule=wide, rng=Scripted([])) == 0
    assert aepo.chain_copies(0.0, 0.0, 0, room=5, rule=aepo.BranchRule(beam_size=1), rng=None) == 0


def test_with_no_entropy_change_a_chain_branches_half_the_time():
    rng = np.random.default_rng(0)
    copies = [aepo.chain_copies(0.7, 0.7, 0, 8, RULE, rng) for _ in range(4000)]
    assert abs(np.mean(copies) - 0.5) < 0.03


# ------------------------------------------------------------------------------- a round


def test_a_round_by_hand():
    # Prompt 0: chains 0 and 2 active, 15 chains so far (room 1). Prompt 1: chain 1 active, 8
    # chains, branched in the last round (c = 1). Prompt 2: no active chain, 10 chains -> fresh.
    # Prompt 3: no active chain but already n = 16 chains -> nothing.
    plan = aepo.plan_round(
        prompt_of_chain=[0, 1, 0],
        h_now=[1.0, 2.0, 1.0],
        h_first=[1.0, 1.0, 1.0],
        chains=[15, 8, 10, 16],
        consecutive=[3, 1, 0, 4],
        rule=RULE,
        # Prompt 0 first (its first chain comes first): chain 0 draws 0.6 (factor 0.85: 0.51 ->
        # copy, the room is used up, chain 2 draws nothing); then prompt 1: chain 1 draws 0.3
        # (0.3 + 0.2·1 = 0.5, factor 0.95: 0.475 < 0.5 -> no copy).
        rng=Scripted([0.6, 0.3]),
    )
    np.testing.assert_array_equal(plan.copies, [1, 0, 0])
    np.testing.assert_array_equal(plan.fresh, [False, False, True, False])
    # New chains (a copy or a fresh chain) continue the count; none resets it.
    np.testing.assert_array_equal(plan.consecutive, [4, 0, 1, 0])
    assert plan.new_chains == 2


def _reference_round(prompt_of_chain, h_now, h_first, chains, consecutive, rule, draw):
    """The reference's branching block, transcribed loop for loop (dicts keyed by chain and
    prompt, ``draw()`` for ``random.random()``), with the per-prompt count update."""
    rollouts = dict(enumerate(chains))
    active_by_sample: dict[int, list[int]] = {}
    for idx, p in enumerate(prompt_of_chain):
        active_by_sample.setdefault(p, []).append(idx)
    copies = [0] * len(prompt_of_chain)
    new_origins = []
    for p, idxs in active_by_sample.items():
        remaining = rule.samples - rollouts[p]
        if remaining <= 0:
            continue
        created = 0
        for idx in idxs:
            per = min(rule.beam_size - 1, remaining - created)
            if per <= 0:
                break
            for _ in range(per):
                prob = draw() + rule.entropy_weight * (h_now[idx] - h_first[idx])
                prob = prob * max(0.0, 1.0 - rule.penalty * consecutive[p])
                if max(0.0, min(1.0, prob)) < rule.threshold:
                    continue
                copies[idx] += 1
                new_origins.append(p)
                rollouts[p] += 1
                created += 1
            if created >= remaining:
                break
    fresh = []
    for p in range(len(chains)):
        wanted = p not in active_by_sample and rollouts[p] < rule.samples
        fresh.append(wanted)
        if wanted:
            new_origins.append(p)
    counts = [consecutive[p] + 1 if p in set(new_origins) else 0 for p in range(len(chains))]
    return copies, fresh, counts


@pytest.mark.parametrize("seed", range(6))
def test_rounds_match_the_reference_loop(seed):
    rng = np.random.default_rng(seed)
    rule = aepo.BranchRule(samples=8, beam_size=int(rng.integers(1, 4)))
    prompts = int(rng.integers(1, 6))
    chains = rng.integers(1, 10, prompts).tolist()
    actives = [int(rng.integers(0, min(c, 8) + 1)) for c in chains]
    prompt_of_chain = rng.permutation(np.repeat(range(prompts), actives)).tolist()
    h_now = rng.uniform(0, 3, len(prompt_of_chain)).tolist()
    h_first = rng.uniform(0, 3, len(prompt_of_chain)).tolist()
    consecutive = rng.integers(0, 25, prompts).tolist()
    draws = random.Random(seed)
    want = _reference_round(
        prompt_of_chain, h_now, h_first, chains, consecutive, rule, draws.random
    )
    got = aepo.plan_round(
        prompt_of_chain=prompt_of_chain,
        h_now=h_now,
        h_first=h_first,
        chains=chains,
        consecutive=consecutive,
        rule=rule,
        rng=random.Random(seed),  # the same stream of draws
    )
    assert got.copies.tolist() == want[0]
    assert got.fresh.tolist() == want[1]
    assert got.consecutive.tolist() == want[2]
    per_prompt = np.bincount(prompt_of_chain, weights=got.copies, minlength=prompts)
    assert np.all(np.asarray(chains) + per_prompt + got.fresh <= np.maximum(chains, 8))


def test_a_rollout_of_rounds_ends_with_n_chains_per_prompt():
    """Rounds of a simulated rollout (chains end at random) always bring every prompt to n."""
    rng = np.random.default_rng(1)
    rule = aepo.BranchRule(samples=16, beam_size=2)
    chains = [8, 8, 8]
    active = [p for p in range(3) for _ in range(8)]
    consecutive = [0, 0, 0]
    for _ in range(200):
        if not active:
            break
        active = [p for p in active if rng.random() < 0.7]  # some chains finish this round
        plan = aepo.plan_round(
            prompt_of_chain=active,
            h_now=rng.uniform(0, 2, len(active)),
            h_first=rng.uniform(0, 2, len(active)),
            chains=chains,
            consecutive=consecutive,
            rule=rule,
            rng=rng,
        )
        born = [p for p, k in zip(active, plan.copies, strict=True) for _ in range(k)]
        born += [p for p in range(3) if plan.fresh[p]]
        for p in born:
            chains[p] += 1
        active += born
        consecutive = plan.consecutive
    assert chains == [16, 16, 16] and not active


def test_bad_round_inputs_are_refused():
    with pytest.raises(ValueError, match="one entry per chain"):
        aepo.plan_round(
            prompt_of_chain=[0], h_now=[], h_first=[0.0], chains=[1], consecutive=[0],
            rule=RULE, rng=Scripted([]),
        )  # fmt: skip
    with pytest.raises(ValueError, match="index the 1 prompts"):
        aepo.plan_round(
            prompt_of_chain=[1], h_now=[0.0], h_first=[0.0], chains=[1], consecutive=[0],
            rule=RULE, rng=Scripted([]),
        )  # fmt: skip


# ------------------------------------------------------------------------------- settings


def test_aepo_settings_and_their_checks():
    s = RolloutSettings(mode="aepo", initial_rollouts=8, beam_size=2, samples_per_tree=16)
    assert s.initial_chains == 8 and s.chains_per_tree == 16 and s.rounds == 0
    assert aepo.BranchRule.from_settings(s) == RULE
    with pytest.raises(ConfigError, match="initial_rollouts must be <= samples_per_tree"):
        RolloutSettings(mode="aepo", initial_rollouts=17, samples_per_tree=16, beam_size=2)
    with pytest.raises(ConfigError, match="beam_size >= 1"):
        RolloutSettings(mode="aepo", initial_rollouts=8, samples_per_tree=16, beam_size=0)
    with pytest.raises(ConfigError, match=r"rollout.aepo_branch_threshold=1.5 must be in \[0, 1\]"):
        RolloutSettings(aepo_branch_threshold=1.5)
    with pytest.raises(ConfigError, match="rollout.aepo_entropy_weight must be a finite"):
        RolloutSettings(aepo_entropy_weight=math.nan)
    with pytest.raises(ConfigError, match="rollout.aepo_entropy_positions must be >= 1"):
        RolloutSettings(aepo_entropy_positions=0)
    with pytest.raises(ConfigError, match="rollout.aepo_entropy='mean' is not one of"):
        RolloutSettings(aepo_entropy="mean")
