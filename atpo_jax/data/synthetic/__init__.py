"""The synthetic multi-hop world: a seeded fictional corpus, 1–3-hop questions (up to 5 in the harder
worlds, :data:`WORLDS`), a word-level tokenizer and
noisy expert demonstrations, so the whole pipeline runs offline on a CPU (DESIGN.md §6).

Quick start::

    from atpo_jax.data import synthetic
    files = synthetic.build_synthetic_world("workdir/synthetic")      # reused when already built
    tokenizer = synthetic.load_tokenizer(files.tokenizer)
    train_rows = atpo_jax.data.read_rows(files.train)
"""

from atpo_jax.data.synthetic.build import (
    SPLITS,
    WORLDS,
    SyntheticWorldConfig,
    SyntheticWorldFiles,
    WorldPreset,
    answerable_questions,
    build_synthetic_world,
    read_demos,
    read_manifest,
    world_noise,
    world_retriever,
)
from atpo_jax.data.synthetic.demos import demo_segments, make_demonstrations
from atpo_jax.data.synthetic.expert import (
    MISTAKE_KINDS,
    Episode,
    ExpertAgent,
    ExpertError,
    entity_queries,
    play_episode,
    read_fact,
    read_link,
)
from atpo_jax.data.synthetic.questions import (
    ALL_TEMPLATES,
    LONG_TEMPLATES,
    TEMPLATES,
    Question,
    Template,
    generate_questions,
    parse_question,
    parse_question_full,
    split_by_subject,
    templates_up_to,
)
from atpo_jax.data.synthetic.tokenizer import (
    CHAT_TEMPLATE,
    build_word_tokenizer,
    load_tokenizer,
    save_word_tokenizer,
)
from atpo_jax.data.synthetic.world import (
    ALL_RELATIONS,
    RELATIONS,
    Entity,
    World,
    display_name,
    generate_world,
    passage_text,
)

__all__ = [
    "ALL_RELATIONS",
    "ALL_TEMPLATES",
    "CHAT_TEMPLATE",
    "LONG_TEMPLATES",
    "MISTAKE_KINDS",
    "RELATIONS",
    "SPLITS",
    "TEMPLATES",
    "WORLDS",
    "Entity",
    "Episode",
    "ExpertAgent",
    "ExpertError",
    "Question",
    "SyntheticWorldConfig",
    "SyntheticWorldFiles",
    "Template",
    "World",
    "WorldPreset",
    "answerable_questions",
    "build_synthetic_world",
    "build_word_tokenizer",
    "demo_segments",
    "display_name",
    "entity_queries",
    "generate_questions",
    "generate_world",
    "load_tokenizer",
    "make_demonstrations",
    "parse_question",
    "parse_question_full",
    "passage_text",
    "play_episode",
    "read_demos",
    "read_fact",
    "read_link",
    "read_manifest",
    "save_word_tokenizer",
    "split_by_subject",
    "templates_up_to",
    "world_noise",
    "world_retriever",
]
