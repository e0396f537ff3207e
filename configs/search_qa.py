"""AT²PO on search-augmented QA (ml_collections config).

Usage: ``python -m atpo_jax.launch --config=configs/search_qa.py[:variant] [--config.a.b=value ...]``.
Variants: ``tiny`` (default; the synthetic CPU run) and ``qwen3_4b`` (the paper's recipe, ALGORITHM.md §5).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every setting with its default in one place (DESIGN.md §10: no scattered getattr defaults)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Tree rollout (ALGORITHM.md §2): I initial chains + E rounds x B branches = leaves per tree.
    config.rollout = ml_collections.ConfigDict()
    config.rollout.mode = "tree"  # tree | chain (independent samples, GRPO baselines)
    config.rollout.initial_rollouts = 10
    config.rollout.expansion_iterations = 2
    config.rollout.beam_size = 6
    config.rollout.samples_per_tree = 22
    config.rollout.expansion_mode = "entropy"  # entropy | random
    config.rollout.expansion_penalty = 0.05  # α, additive penalty per sibling
    config.rollout.entropy_estimator = "sampled_nll"  # sampled_nll (paper) | exact

    # Turn-wise credit assignment (ALGORITHM.md §3.2).
    config.credit = ml_collections.ConfigDict()
    config.credit.mode = "tree"  # tree | grpo (outcome advantage on the leaves)
    config.credit.leaf_value_norm = True
    config.credit.node_value_mode = "child_softmax"  # child_mean | child_softmax | leaf_mean
    config.credit.node_adv_mode = (
        "node_value"  # node_value | diff_parent | diff_global | diff_localglobal
    )

    # Policy loss (ALGORITHM.md §4).
    config.loss = ml_collections.ConfigDict()
    config.loss.policy_loss = "atpo"  # atpo | gspo | ppo
    config.loss.clip_low = 3e-3
    config.loss.clip_high = 4e-3
    config.loss.max_log_ratio = 10.0
    config.loss.dual_clip = 3.0  # ppo only
    config.loss.loss_agg = "seq-mean-token-mean"
    config.loss.kl_coef = 0.0
    config.loss.kl_kind = "low_var_kl"

    # Demo batch (used by the kernel demo until the trainer lands).
    config.demo = ml_collections.ConfigDict()
    config.demo.num_trees = 8
    config.demo.response_length = 256
    return config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    config = base_config()
    variant = variant or "tiny"
    if variant == "tiny":
        return config
    if variant == "qwen3_4b":
        config.demo.num_trees = 64
        config.demo.response_length = 6192
        return config
    raise ValueError(
        f"configs/search_qa.py: unknown variant {variant!r}; use 'tiny' or 'qwen3_4b' "
        "(e.g. --config=configs/search_qa.py:qwen3_4b)"
    )
