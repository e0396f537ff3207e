"""The synthetic multi-hop world: a seeded fictional corpus, 1–3-hop questions, a word-level tokenizer and
noisy expert demonstrations, so the whole pipeline runs offline on a CPU (DESIGN.md §6).

Quick start::

    from atpo_jax.data import synthetic
    files = synthetic.build_synthetic_world("workdir/synthetic")      # reused when already built
    tokenizer = synthetic.load_tokenizer(files.tokenizer)
    train_rows = atpo_jax.data.read_rows(files.train)
"""

from atpo_jax.data.synthetic.build import (
    SPLITS,
    SyntheticWorldConfig,
    SyntheticWorldFiles,
    build_synthetic_world,
    read_demos,
    read_manifest,
)
from atpo_jax.data.synthetic.demos import demo_segments, make_demonstrations
from atpo_jax.data.synthetic.expert import (
    MISTAKE_KINDS,
    Episode,
    ExpertAgent,
    ExpertError,
    play_episode,
    read_fact,
)
from atpo_jax.data.synthetic.questions import (
    TEMPLATES,
    Question,
    Template,
    generate_questions,
    parse_question,
    split_by_subject,
)
from atpo_jax.data.synthetic.tokenizer import (
    CHAT_TEMPLATE,
    build_word_tokenizer,
    load_tokenizer,
    save_word_tokenizer,
)
from atpo_jax.data.synthetic.world import RELATIONS, Entity, World, generate_world, passage_text

__all__ = [
    "CHAT_TEMPLATE",
    "MISTAKE_KINDS",
    "RELATIONS",
    "SPLITS",
    "TEMPLATES",
    "Entity",
    "Episode",
    "ExpertAgent",
    "ExpertError",
    "Question",
    "SyntheticWorldConfig",
    "SyntheticWorldFiles",
    "Template",
    "World",
    "build_synthetic_world",
    "build_word_tokenizer",
    "demo_segments",
    "generate_questions",
    "generate_world",
    "load_tokenizer",
    "make_demonstrations",
    "parse_question",
    "passage_text",
    "play_episode",
    "read_demos",
    "read_fact",
    "read_manifest",
    "save_word_tokenizer",
    "split_by_subject",
]
