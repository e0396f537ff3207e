"""The baseline recipes of configs/search_qa.py carry the reference scripts' values.

The expected values are written out here from ALGORITHM.md §5 and the reference's
``AEPO/scripts/{GRPO,AEPO}_qwen3_4B.sh`` over their ``ppo_trainer_dr.yaml`` (not read from the
config file), and each variant must build valid settings.
"""

from __future__ import annotations

import pytest

from atpo_jax.config import run_settings
from tests.train import runs

# What the three baselines share: the chain rollout's rules, GRPO credit, the clip range, no
# entropy term.
SHARED = {
    "rollout.call_limit": 6,
    "rollout.call_limit_rule": "eos",  # the call limit appends EOS and stops
    "rollout.tool_failure": "error_text",  # "Tool(search) returned empty output." and go on
    "rollout.empty_call": "leaf",  # an empty tool call ends the chain, no EOS
    "credit.mode": "grpo",
    "loss.clip_low": 0.2,
    "loss.clip_high": 0.2,
    "loss.entropy_coef": 0.0,
    "loss.kl_kind": "low_var_kl",
}
METHODS = {
    "grpo": {
        "rollout.mode": "chain",
        "loss.policy_loss": "ppo",
        "loss.dual_clip": 3.0,
        "loss.loss_agg": "token-mean",
        "loss.entropy_balanced_clipping": False,
        "loss.kl_coef": 0.001,
    },
    "gspo": {
        "rollout.mode": "chain",
        "loss.policy_loss": "gspo",
        "loss.loss_agg": "seq-mean-token-mean",
        "loss.max_log_ratio": 10.0,
        "loss.kl_coef": 0.001,
    },
    "aepo": {
        "rollout.mode": "aepo",
        "rollout.beam_size": 2,
        "rollout.aepo_entropy": "topk",
        "rollout.aepo_entropy_topk": 10,
        "rollout.aepo_entropy_positions": 20,
        "rollout.aepo_entropy_weight": 0.2,
        "rollout.aepo_branch_threshold": 0.5,
        "rollout.aepo_branch_penalty": 0.05,
        "loss.policy_loss": "ppo",
        "loss.dual_clip": 3.0,
        "loss.loss_agg": "token-mean",
        "loss.entropy_balanced_clipping": True,
        "loss.kl_coef": 0.0,
    },
}
# The paper's sizes (ALGORITHM.md §5): n = 16 for the baselines, AEPO starting 8 chains.
QWEN = {
    "model.dtype": "bfloat16",
    "rollout.samples_per_tree": 16,
    "rollout.max_prompt_len": 2000,
    "rollout.max_response_len": 6192,
    "rollout.temperature": 1.0,
    "optim.learning_rate": 1e-6,
    "train.prompts_per_step": 64,
    "train.mini_batch_prompts": 8,
    "train.micro_batch_tokens": 16384,
}
INITIAL = {"grpo": 16, "gspo": 16, "aepo": 8}


def _check(settings, expected: dict) -> None:
    for dotted, want in expected.items():
        got = settings.lookup(dotted)
        assert got == want, f"{settings.variant}: {dotted} = {got!r}, want {want!r}"


@pytest.mark.parametrize("method", ["grpo", "gspo", "aepo"])
def test_the_qwen3_4b_baselines_have_the_reference_values(method):
    settings = run_settings(runs.load_config(f"qwen3_4b_{method}"))
    assert settings.variant == f"qwen3_4b_{method}"
    _check(settings, {**SHARED, **METHODS[method], **QWEN})
    assert settings.rollout.initial_chains == INITIAL[method]
    assert settings.rollout.chains_per_tree == 16
    # The paper recipe's requirements stay (a model, data, a retriever).
    assert settings.required == runs.load_config("qwen3_4b").required


@pytest.mark.parametrize("method", ["grpo", "gspo", "aepo"])
def test_the_tiny_baselines_change_only_the_method(method):
    settings = run_settings(runs.load_config(f"tiny_{method}"))
    tiny = run_settings(runs.load_config("tiny"))
    _check(settings, {**SHARED, **METHODS[method], "rollout.samples_per_tree": 8})
    assert settings.rollout.initial_chains == {"grpo": 8, "gspo": 8, "aepo": 4}[method]
    # The world, the model, the warm start, the reward and the budgets are the tiny run's, so
    # the comparison with it is about the method alone.
    for section in ("data", "model", "sft", "reward", "optim", "train", "eval"):
        assert getattr(settings, section) == getattr(tiny, section), section
    assert settings.rollout.max_response_len == tiny.rollout.max_response_len
