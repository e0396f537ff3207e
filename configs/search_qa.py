"""AT²PO on search-augmented QA (ml_collections config).

Usage::

    python -m atpo_jax.launch --config=configs/search_qa.py[:variant] [--config.a.b=value ...]

Variants:
  ``tiny`` (default) — the synthetic multi-hop world, a tiny random Llama, a supervised warm
      start on noisy expert demonstrations, then AT²PO; runs on a 2-core CPU in about 9 minutes.
  ``qwen3_4b`` — the paper's recipe (ALGORITHM.md §5). It needs ``model.path``, ``data.train_files``,
      ``data.eval_files`` and ``tools.retriever_url`` (or ``tools.index`` with
      ``tools.method=dense``, or ``tools.corpus``) and refuses to start without them.
  ``qwen3_4b_grpo``, ``qwen3_4b_gspo``, ``qwen3_4b_aepo`` — the paper's baselines with the
      reference scripts' settings (ALGORITHM.md §5: ``AEPO/scripts/{GRPO,AEPO}_qwen3_4B.sh``):
      chain rollouts of 16 per prompt, GRPO advantages, the token PPO loss (GSPO: sequence
      ratio; AEPO: entropy-triggered chain branching), needing what ``qwen3_4b`` needs.
  ``tiny_grpo``, ``tiny_gspo``, ``tiny_aepo`` — the same baselines on the ``tiny`` run (its world,
      model, warm start, reward and 8 rows per question), for the paper's comparison on a CPU.

Every setting, its default and its meaning is in the dataclass of the section that owns it
(``RunSettings`` in ``atpo_jax/train/settings.py`` lists them: ``model`` ->
``atpo_jax.models.settings.ModelSettings``, ``rollout`` -> ``atpo_jax.rollout.settings.RolloutSettings``,
...); this file only overrides values.

Every paper ablation is one switch: ``--config.rollout.expansion_mode=random`` (random expansion),
``--config.credit.mode=grpo`` (outcome advantage on the tree's leaves), ``--config.loss.policy_loss=gspo``
(sequence-level ratio); the baselines are the ``*_grpo``, ``*_gspo`` and ``*_aepo`` variants.
"""

from __future__ import annotations

import functools

import ml_collections

from atpo_jax.config import default_config

BASELINES = ("grpo", "gspo", "aepo")

VARIANTS = (
    "tiny",
    "qwen3_4b",
    "qwen3_4b_grpo",
    "qwen3_4b_gspo",
    "qwen3_4b_aepo",
    "tiny_grpo",
    "tiny_gspo",
    "tiny_aepo",
)


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The default CPU run: the synthetic world, a 0.13M-parameter Llama, SFT warm start, AT²PO.

    The warm start is a supervised pass over expert demonstrations (entity names swapped three
    times over, so the model learns to copy names out of search results rather than memorise
    them). 70% of the 3-hop demonstrations stop one hop early, so the warm-started policy answers
    3-hop questions with the intermediate entity; RL has to discover the third search from
    reward alone. On a 2-core CPU the whole run takes about 9 minutes.

    The reward is plain exact match (``em``), not the paper's −1/0/1 ``em_format``: at this model
    size the −1 for a malformed answer dominates the signal, and the policy learns to stop
    searching and answer at once (no format risk) before it learns to search better.
    """
    c.variant = "tiny"
    c.model.random.model_type = "llama"
    c.model.random.hidden_size = 64
    c.model.random.intermediate_size = 192
    c.model.random.num_layers = 2
    c.model.random.num_heads = 4
    c.model.random.num_kv_heads = 2
    c.model.random.head_dim = 16
    c.data.synthetic.demo_shortcut_rate = 0.7
    c.rollout.initial_rollouts = 4
    c.rollout.expansion_iterations = 2
    c.rollout.beam_size = 2
    c.rollout.samples_per_tree = 8
    c.rollout.max_prompt_len = 64
    c.rollout.max_response_len = 224
    c.rollout.observation_margin = 16
    c.rollout.num_slots = 96
    c.rollout.kv_bucket = 64
    c.rollout.trace_every = 40
    c.reward.mode = "em"
    c.loss.clip_low = 0.2
    c.loss.clip_high = 0.28
    c.loss.old_log_probs = "sampler"
    c.optim.learning_rate = 3e-4
    c.optim.weight_decay = 0.0
    c.train.steps = 120
    c.train.prompts_per_step = 16
    c.train.mini_batch_prompts = 16  # one on-policy update per step
    c.train.micro_batch_tokens = (
        2048  # each tree's nodes once (train.packing=tree), 2k-token sequences
    )
    c.train.log_every = 10
    c.sft.steps = 1200
    c.sft.rename_copies = 3
    c.eval.every = 20
    c.eval.batch_prompts = 120
    c.checkpoint.every = 20
    # mesh: the default (data=-1): one device here, plain data parallelism on a GPU node.
    return c


def qwen3_4b(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's recipe (ALGORITHM.md §5): Qwen3-4B, 64 prompts x 22 leaves, lr 1e-6, bf16."""
    c.variant = "qwen3_4b"
    c.required = (
        "model.path",
        "data.train_files",
        "tools.retriever_url|tools.index|tools.corpus",  # a service, a dense index, or BM25
    )
    c.data.source = "files"
    c.model.dtype = "bfloat16"  # bf16 compute on float32 master weights (the reference's FSDP
    c.model.param_dtype = "float32"  # mixed precision): bf16 masters barely move at lr 1e-6
    c.model.remat = True
    c.mesh.data = 1
    c.mesh.fsdp = -1  # ZeRO-3 over every device: a 4B policy + AdamW does not fit replicated
    # The KV pool in tokens, not slots x max_len (that dense equivalent, 256 x 8192 tokens, is 309 GB
    # in bf16): 32,768 pages x 16 = 524k tokens, 77 GB over the mesh (9.7 GB per device on 8
    # GPUs). Trees share prefixes page by page and a paper tree holds ~33k unique tokens, so the 11
    # trees 256 slots admit fit; if a run's chains are longer they wait for pages
    # (schedule/kv_pool_waits) instead of failing.
    c.rollout.kv_pages = 32768
    # train.packing=tree (the default): each tree's nodes once, 16,384 tokens per device per
    # micro-batch (train.micro_batch_tokens, the reference's per-GPU budget). For
    # train.packing=padded: 1 row of 8192 tokens per device on 8 GPUs (47 GB of the train step; 2
    # rows take 83 GB with the XLA attention kernel, docs/scale_out.md).
    c.train.micro_batch_rows = 8
    c.train.steps = 5 * 100  # the paper trains 5 epochs; set to your dataset size / 64
    c.eval.every = 20
    c.eval.batch_prompts = 512
    c.checkpoint.every = 50
    return c


def baseline(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """One of the paper's baselines (``grpo``, ``gspo``, ``aepo``) on top of a recipe: what the
    reference's ``AEPO/scripts/{GRPO,AEPO}_qwen3_4B.sh`` set over their ``ppo_trainer_dr.yaml``
    (ALGORITHM.md §5), the sizes (rows per question, lengths, batch, learning rate) staying the
    recipe's.

    All three: chain rollouts (``sync_with_tool``) whose call limit appends a trained EOS and ends
    the chain, whose failed tool call inserts ``Tool(search) returned empty output.`` and goes on,
    and whose empty tool call just ends the chain (no EOS); the GRPO outcome advantage per
    question; ``clip_ratio`` 0.2/0.2 and no entropy term (``entropy_coeff`` 0).

    * ``grpo``: ``INITIAL_ROLLOUTS = n`` (independent chains), both entropy-balanced flags off
      (so the token PPO loss with dual clip ``clip_ratio_c`` 3), ``token-mean``, KL loss
      ``low_var_kl`` with coefficient 0.001.
    * ``gspo``: the reference ships no GSPO script; this is its AEPO code's
      ``enable_policy_loss_gspo=True`` on the GRPO script: the same chains, credit, clip range
      (0.2/0.2 of the yaml, passed to ``compute_policy_loss_gspo`` unchanged) and KL, the sequence
      ratio with its hard-coded ``seq-mean-token-mean``.
    * ``aepo``: ``INITIAL_ROLLOUTS=8``, ``BEAM_SIZE=2``: chains that branch on an entropy rise up
      to n (``rollout.mode=aepo``, ``entropy_weight`` 0.2, ``branch_probability`` 0.5), both
      entropy-balanced flags on (only the clipping acts: the advantage reshaping needs entropies
      that ``entropy_coeff`` 0 never computes, ALGORITHM.md §8 item 22), KL coefficient 0.
    """
    c.rollout.mode = "aepo" if method == "aepo" else "chain"
    c.rollout.call_limit_rule = "eos"
    c.rollout.tool_failure = "error_text"
    c.rollout.empty_call = "leaf"
    c.credit.mode = "grpo"
    c.loss.clip_low = 0.2
    c.loss.clip_high = 0.2
    c.loss.entropy_coef = 0.0
    c.loss.kl_kind = "low_var_kl"
    if method == "gspo":
        c.loss.policy_loss = "gspo"
        c.loss.loss_agg = "seq-mean-token-mean"
        c.loss.max_log_ratio = 10.0
        c.loss.kl_coef = 0.001
    else:
        c.loss.policy_loss = "ppo"
        c.loss.loss_agg = "token-mean"
        c.loss.dual_clip = 3.0
        c.loss.entropy_balanced_clipping = method == "aepo"
        c.loss.kl_coef = 0.0 if method == "aepo" else 0.001
    if method == "aepo":
        c.rollout.aepo_entropy = "topk"
        c.rollout.aepo_entropy_topk = 10
        c.rollout.aepo_entropy_positions = 20
        c.rollout.aepo_entropy_weight = 0.2
        c.rollout.aepo_branch_threshold = 0.5
        c.rollout.aepo_branch_penalty = 0.05
    return c


def qwen3_4b_baseline(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The ``qwen3_4b`` recipe as the paper's ``method`` baseline: n = 16 chains per question
    (``ROLLOUT_N``), AEPO starting 8 with beam 2."""
    c = baseline(qwen3_4b(c), method)
    c.variant = f"qwen3_4b_{method}"
    c.rollout.samples_per_tree = 16
    c.rollout.initial_rollouts = 8 if method == "aepo" else 16
    c.rollout.beam_size = 2
    return c  # train.micro_batch_rows = 8 divides the 8 x 16 rows of a mini-batch too


def tiny_baseline(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The ``tiny`` run as the ``method`` baseline, at its 8 rows per question (AEPO: 4 chains
    that branch with beam 2, as the reference's 8 of 16)."""
    c = baseline(tiny(c), method)
    c.variant = f"tiny_{method}"
    c.rollout.samples_per_tree = 8
    c.rollout.initial_rollouts = 4 if method == "aepo" else 8
    c.rollout.beam_size = 2
    return c


RECIPES = {
    "tiny": tiny,
    "qwen3_4b": qwen3_4b,
    **{f"qwen3_4b_{m}": functools.partial(qwen3_4b_baseline, method=m) for m in BASELINES},
    **{f"tiny_{m}": functools.partial(tiny_baseline, method=m) for m in BASELINES},
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/search_qa.py: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)} "
            "(e.g. --config=configs/search_qa.py:qwen3_4b)"
        )
    return RECIPES[variant](default_config())
