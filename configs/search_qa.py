"""AT²PO on search-augmented QA (ml_collections config).

Usage::

    python -m atpo_jax.launch --config=configs/search_qa.py[:variant] [--config.a.b=value ...]

Variants:
  ``tiny`` (default) — the synthetic multi-hop world, a tiny random Llama, a supervised warm
      start on noisy expert demonstrations, then AT²PO; runs on a 2-core CPU in about 9 minutes.
  ``qwen3_4b`` — the paper's recipe (ALGORITHM.md §5). It needs ``model.path``, ``data.train_files``,
      ``data.eval_files`` and ``tools.retriever_url`` (or ``tools.corpus``) and refuses to start
      without them.

Every paper ablation is one switch: ``--config.rollout.expansion_mode=random`` (random expansion),
``--config.credit.mode=grpo`` (outcome advantage on the tree's leaves), ``--config.loss.policy_loss=gspo``
(sequence-level ratio), and ``--config.rollout.mode=chain --config.credit.mode=grpo
--config.loss.policy_loss=ppo`` (the GRPO chain baseline).
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "qwen3_4b")


def base_config() -> ml_collections.ConfigDict:
    """Every setting with its default, in one place (DESIGN.md §10); defaults follow the paper."""
    c = ml_collections.ConfigDict()
    c.variant = "tiny"
    c.seed = 0

    # Policy model: a local Hugging Face checkpoint directory, or a random model of `model.random`.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # master weights and optimizer state: keep float32
    c.model.remat = False
    c.model.attention_impl = "xla"  # xla | cudnn (flash attention for training/scoring, GPU only)
    c.model.random = ml_collections.ConfigDict()  # used when model.path is empty
    c.model.random.model_type = "qwen3"
    c.model.random.hidden_size = 128
    c.model.random.intermediate_size = 384
    c.model.random.num_layers = 4
    c.model.random.num_heads = 4
    c.model.random.num_kv_heads = 2
    c.model.random.head_dim = 32
    c.model.random.tie_word_embeddings = True

    # Data: the synthetic world (default) or ATPO/Search-R1 parquet/JSONL files.
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | files
    c.data.synthetic_dir = ""  # default: <workdir>/synthetic
    c.data.synthetic = ml_collections.ConfigDict()  # the synthetic world's size and noise
    c.data.synthetic.seed = 0
    c.data.synthetic.num_people = 160
    c.data.synthetic.num_companies = 120
    c.data.synthetic.demo_mistake_rate = 0.3
    c.data.synthetic.demo_shortcut_rate = 0.0  # 3-hop demonstrations that stop one hop early
    c.data.train_files = ""  # comma-separated, for source=files
    c.data.eval_files = ""
    c.data.tokenizer_path = ""  # default: the model path (files) or the synthetic tokenizer
    c.data.prompt_style = (
        "short"  # short | paper (the instruction for source=files rows built here)
    )
    c.data.shuffle = True

    # Tools: the local BM25 retriever over a JSONL corpus, or an HTTP retrieval service.
    c.tools = ml_collections.ConfigDict()
    c.tools.corpus = ""  # default for synthetic data: the world's corpus
    c.tools.retriever_url = ""  # e.g. http://127.0.0.1:8000/retrieve
    c.tools.topk = 3
    c.tools.max_passage_chars = 1000
    c.tools.timeout_s = 30.0
    c.tools.retries = 4
    c.tools.cache_path = ""
    c.tools.python = False  # the sandboxed python tool (off by default)

    # Tree rollout (ALGORITHM.md §2).
    c.rollout = ml_collections.ConfigDict()
    c.rollout.mode = "tree"  # tree | chain
    c.rollout.initial_rollouts = 10
    c.rollout.expansion_iterations = 2
    c.rollout.beam_size = 6
    c.rollout.samples_per_tree = 22
    c.rollout.expansion_mode = "entropy"  # entropy | random
    c.rollout.expansion_penalty = 0.05
    c.rollout.entropy_estimator = "sampled_nll"  # sampled_nll | exact
    c.rollout.max_prompt_len = 2000
    c.rollout.max_response_len = 6192
    c.rollout.call_limit = 6
    c.rollout.observation_margin = 100
    c.rollout.empty_call = "eos"
    c.rollout.tool_failure = "leaf"
    c.rollout.tool_workers = 32
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.num_slots = 256  # engine KV-cache slots; trees run in waves that fit
    c.rollout.decode_chunk = 32
    c.rollout.kv_bucket = 256
    c.rollout.trace_every = 0  # write an HTML/JSONL tree trace every k steps (0: never)

    # Turn-wise credit assignment (ALGORITHM.md §3.2).
    c.credit = ml_collections.ConfigDict()
    c.credit.mode = "tree"  # tree | grpo
    c.credit.leaf_value_norm = True
    c.credit.node_value_mode = "child_softmax"
    c.credit.node_adv_mode = "node_value"

    # Reward (ALGORITHM.md §3.1).
    c.reward = ml_collections.ConfigDict()
    c.reward.mode = "em_format"  # em_format | em | f1
    c.reward.python_bonus = 0.1

    # Policy loss and update (ALGORITHM.md §4).
    c.loss = ml_collections.ConfigDict()
    c.loss.policy_loss = "atpo"  # atpo | gspo | ppo
    c.loss.clip_low = 3e-3
    c.loss.clip_high = 4e-3
    c.loss.max_log_ratio = 10.0
    c.loss.dual_clip = 3.0
    c.loss.loss_agg = "seq-mean-token-mean"
    c.loss.kl_coef = 0.0
    c.loss.kl_kind = "low_var_kl"
    c.loss.old_log_probs = "recompute"  # recompute (reference) | sampler

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.total_steps = 0  # 0: train.steps
    c.optim.end_learning_rate_factor = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.prompts_per_step = 64
    c.train.mini_batch_prompts = 8
    c.train.ppo_epochs = 1
    c.train.micro_batch_rows = 22
    c.train.log_every = 1  # a progress line every k steps when stderr is not a terminal

    # Supervised warm start on demonstrations (synthetic data only).
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0
    c.sft.batch_size = 32
    c.sft.learning_rate = 3e-3
    c.sft.warmup_steps = 10
    c.sft.rename_copies = 0  # extra copies of each demonstration with its entities renamed

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 20  # steps; 0: only at the end
    c.eval.split = "test"  # validation | test (synthetic) ; files: data.eval_files
    c.eval.max_questions = 0  # 0: all
    c.eval.batch_prompts = 64
    c.eval.max_response_len = 0  # 0: rollout.max_response_len

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.checkpoint.export_hf = True  # write the final policy as a Hugging Face checkpoint
    c.checkpoint.export_dtype = ""  # "": the dtype of model.path's checkpoint, else param_dtype

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.wandb_project = ""
    c.logging.plot = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


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
    c.train.micro_batch_rows = 64
    c.train.log_every = 10
    c.sft.steps = 1200
    c.sft.rename_copies = 3
    c.eval.every = 20
    c.eval.batch_prompts = 120
    c.checkpoint.every = 20
    # mesh: the base default (data=-1): one device here, plain data parallelism on a GPU node.
    return c


def qwen3_4b(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's recipe (ALGORITHM.md §5): Qwen3-4B, 64 prompts x 22 leaves, lr 1e-6, bf16."""
    c.variant = "qwen3_4b"
    c.data.source = "files"
    c.data.prompt_style = "paper"
    c.model.dtype = "bfloat16"  # bf16 compute on float32 master weights (the reference's FSDP
    c.model.param_dtype = "float32"  # mixed precision): bf16 masters barely move at lr 1e-6
    c.model.remat = True
    c.mesh.data = 1
    c.mesh.fsdp = -1  # ZeRO-3 over every device: a 4B policy + AdamW does not fit replicated
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
    return {"tiny": tiny, "qwen3_4b": qwen3_4b}[variant](base_config())
