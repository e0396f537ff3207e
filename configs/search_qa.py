"""AT²PO on search-augmented QA (ml_collections config).

Usage::

    python -m atpo_jax.launch --config=configs/search_qa.py[:variant] [--config.a.b=value ...]

Variants:
  ``tiny`` (default) — the synthetic multi-hop world, a tiny random Llama, a supervised warm
      start on noisy expert demonstrations, then AT²PO; runs on a 2-core CPU in about 9 minutes.
  ``qwen3_4b`` — the paper's recipe (ALGORITHM.md §5). It needs ``model.path``, ``data.train_files``,
      ``data.eval_files`` and ``tools.retriever_url`` (or ``tools.index`` with
      ``tools.method=dense``, or ``tools.corpus``) and refuses to start without them.

Every setting, its default and its meaning is in the dataclass of the section that owns it
(``RunSettings`` in ``atpo_jax/train/settings.py`` lists them: ``model`` ->
``atpo_jax.models.settings.ModelSettings``, ``rollout`` -> ``atpo_jax.rollout.settings.RolloutSettings``,
...); this file only overrides values.

Every paper ablation is one switch: ``--config.rollout.expansion_mode=random`` (random expansion),
``--config.credit.mode=grpo`` (outcome advantage on the tree's leaves), ``--config.loss.policy_loss=gspo``
(sequence-level ratio), and ``--config.rollout.mode=chain --config.credit.mode=grpo
--config.loss.policy_loss=ppo`` (the GRPO chain baseline).
"""

from __future__ import annotations

import ml_collections

from atpo_jax.config import default_config

VARIANTS = ("tiny", "qwen3_4b")


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


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/search_qa.py: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)} "
            "(e.g. --config=configs/search_qa.py:qwen3_4b)"
        )
    return {"tiny": tiny, "qwen3_4b": qwen3_4b}[variant](default_config())
