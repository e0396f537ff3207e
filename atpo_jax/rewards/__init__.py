"""QA rewards: answer extraction, SQuAD normalisation, EM/F1, the paper's format check (no JAX)."""

from atpo_jax.rewards.extract import extract_answer, extract_answer_block, last_boxed
from atpo_jax.rewards.format import FormatCheck, validate_format
from atpo_jax.rewards.normalize import exact_match, normalize_answer, token_f1
from atpo_jax.rewards.qa import (
    REWARD_MODES,
    RewardMode,
    RewardResult,
    RewardSettings,
    compute_reward,
)
from atpo_jax.rewards.registry import register_reward, registered_rewards

__all__ = [
    "REWARD_MODES",
    "FormatCheck",
    "RewardMode",
    "RewardResult",
    "RewardSettings",
    "compute_reward",
    "exact_match",
    "extract_answer",
    "extract_answer_block",
    "last_boxed",
    "normalize_answer",
    "register_reward",
    "registered_rewards",
    "token_f1",
    "validate_format",
]
