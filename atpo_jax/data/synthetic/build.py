"""Build (or reuse) the synthetic world's files: corpus, question splits, tokenizer, demonstrations.

Files under ``out_dir``::

    corpus.jsonl                 one {"id", "contents"} passage per entity (wiki-18 layout)
    train.parquet                ATPO/Search-R1 rows; data_source = "synthetic_<k>hop"
    validation.parquet
    test.parquet
    demos.jsonl                  noisy expert transcripts of the training questions
    tokenizer/                   word-level tokenizer (AutoTokenizer.from_pretrained(out_dir/"tokenizer"))
    world.json                   the entities and facts, for inspection
    manifest.json                config, file list and statistics

The same config gives byte-identical files. If ``manifest.json`` already records the same config, the
existing files are reused (pass ``overwrite=True`` to rebuild).

Worlds (``SyntheticWorldConfig.world``, :data:`WORLDS`): ``easy`` (the default, the files it always
made), ``ambiguous``, ``long``, ``noisy`` and ``mixed``, each meant to exercise one mechanism. The
harder worlds keep only questions that the scripted expert answers through the real tools in exactly
their hop count (and, with retrieval noise, also through the noisy retriever), and their rows record
the world, each chain entity's qualifying occupation and the decisive hop.

Command line: ``python -m atpo_jax.data.synthetic --out DIR [--world easy] [--seed 0] [--prompt-style short]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import statistics
import tempfile
from typing import Any

from atpo_jax.data.prompts import PROMPT_STYLES, build_messages
from atpo_jax.data.rows import QARow, write_rows
from atpo_jax.data.synthetic.demos import demo_segments, make_demonstrations
from atpo_jax.data.synthetic.expert import THINK_SENTENCES, ExpertAgent, ExpertError, play_episode
from atpo_jax.data.synthetic.questions import (
    LONG_TEMPLATES,
    TEMPLATES,
    Question,
    generate_questions,
    split_by_subject,
    templates_up_to,
)
from atpo_jax.data.synthetic.tokenizer import (
    build_word_tokenizer,
    load_tokenizer,
    save_word_tokenizer,
)
from atpo_jax.data.synthetic.world import (
    DISTRACTOR_PHRASES,
    EXTRA_RELATIONS,
    NOTE_SAYS,
    NOTE_TEXT,
    OCCUPATIONS,
    RELATIONS,
    World,
    generate_world,
    passage_text,
)
from atpo_jax.data.transcripts import encode_transcript
from atpo_jax.rewards.qa import compute_reward
from atpo_jax.tools.base import Retriever
from atpo_jax.tools.bm25 import LocalBM25Retriever, import_bm25s
from atpo_jax.tools.corpus import write_corpus
from atpo_jax.tools.noisy import NoisyRetriever
from atpo_jax.tools.parsing import CALL_LIMIT_WARNING
from atpo_jax.tools.passages import NO_RESULTS_TEXT
from atpo_jax.tools.search import SearchTool
from atpo_jax.tools.toolbox import Toolbox

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class WorldPreset:
    """A named world: the mechanism it is meant to exercise and the settings that make it."""

    mechanism: str
    settings: dict[str, Any]


# The knobs a world sets, with the easy world's values (SyntheticWorldConfig's defaults).
EASY_KNOBS: dict[str, Any] = {
    "max_hops": 3,
    "namesake_share": 0.0,
    "namesake_size": 4,
    "namesakes_mid_chain_only": False,
    "distractor_share": 0.0,
    "retrieval_noise": 0.0,
}

WORLDS: dict[str, WorldPreset] = {
    "easy": WorldPreset(
        "plain multi-hop search: copy a name, search it, read the next name off its page (1-3 hops)",
        {},
    ),
    "ambiguous": WorldPreset(
        "exploration at the uncertain first turn: the subject (or a founder) has namesakes, so the "
        "bare name retrieves the wrong person's page 3 times in 4 and only the query qualified with "
        "the occupation the question (or the linking page) gives finds the right one",
        {"namesake_share": 0.3},
    ),
    "long": WorldPreset(
        "credit to a decisive middle turn: chains of up to 5 hops (works_for) whose middle person "
        "has namesakes, told apart only by the occupation the previous page names",
        {"max_hops": 5, "namesake_share": 0.3, "namesakes_mid_chain_only": True},
    ),
    "noisy": WorldPreset(
        "re-query under retrieval misses: the top-k drops the best page for a quarter of the "
        "queries (seeded per query), leaving distractor notes that mention the name in a wrong "
        "relation; a re-query with another word recovers",
        {"retrieval_noise": 0.25, "distractor_share": 0.5},
    ),
    "mixed": WorldPreset(
        "all of the above: up to 5 hops, namesakes at the first and middle turns, distractor "
        "notes and retrieval misses",
        {
            "max_hops": 5,
            "namesake_share": 0.3,
            "distractor_share": 0.5,
            "retrieval_noise": 0.1,
        },
    ),
}


@dataclasses.dataclass(frozen=True)
class SyntheticWorldConfig:
    """Size and shape of the synthetic world.

    Attributes:
      seed: everything is drawn from ``random.Random(seed)``.
      num_countries, cities_per_country, num_people, num_companies: entity counts.
      validation_fraction, test_fraction: share of question subjects held out per entity kind.
      prompt_style: ``"short"`` (compact instruction) or ``"paper"`` (the paper's instruction), for
        the questions' prompts and the demonstrations.
      demo_mistake_rate: share of demonstrations with one scripted mistake.
      demo_mistake_weights: relative frequency of ``wrong_search``, ``early_answer``, ``wrong_answer``.
      demo_shortcut_rate: share of the demonstrations of questions with ``demo_shortcut_hops`` or
        more hops that answer one hop early (the last intermediate name): a *systematic* habit,
        unlike the random mistakes above. Above 0.5 a policy that imitates the demonstrations
        prefers the shortcut, and only reward can teach it to finish the chain.
      demo_shortcut_hops: the shortest questions the shortcut applies to.
      world: a named world of :data:`WORLDS` (``easy``, ``ambiguous``, ``long``, ``noisy``,
        ``mixed``); it sets the knobs below. A knob left at its easy value takes the world's; set
        one to another value to override the world's.
      max_hops: the longest chains, 3 to 5 (4 and 5 add the ``works_for`` relation and the
        :data:`~.questions.LONG_TEMPLATES`).
      namesake_share: about this share of the people share their name with ``namesake_size - 1``
        others of different occupations; questions and linking pages name them with it.
      namesake_size: people per namesake group (2 to 8).
      namesakes_mid_chain_only: namesakes are drawn among founders and never asked about
        directly, so they are met only in the middle of chains.
      distractor_share: this share of the entities get a distractor note (a passage that mentions
        the name in a relation no question asks about).
      retrieval_noise: share of queries whose top-k misses the best page (seeded per query; see
        :class:`atpo_jax.tools.NoisyRetriever`), in [0, 1).
    """

    seed: int = 0
    num_countries: int = 8
    cities_per_country: int = 4
    num_people: int = 160
    num_companies: int = 120
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    prompt_style: str = "short"
    demo_mistake_rate: float = 0.3
    demo_mistake_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    demo_shortcut_rate: float = 0.0
    demo_shortcut_hops: int = 3
    world: str = "easy"
    max_hops: int = 3
    namesake_share: float = 0.0
    namesake_size: int = 4
    namesakes_mid_chain_only: bool = False
    distractor_share: float = 0.0
    retrieval_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(
                f"data.synthetic.prompt_style={self.prompt_style!r} is not one of "
                f"{', '.join(sorted(PROMPT_STYLES))}"
            )
        if self.world not in WORLDS:
            raise ValueError(
                f"data.synthetic.world={self.world!r} is not one of {', '.join(WORLDS)}"
            )
        for name, value in WORLDS[self.world].settings.items():
            if getattr(self, name) == EASY_KNOBS[name]:
                object.__setattr__(self, name, value)
        problems = {
            "max_hops": self.max_hops in (3, 4, 5),
            "namesake_share": 0 <= self.namesake_share <= 1,
            "namesake_size": 2 <= self.namesake_size <= len(OCCUPATIONS),
            "distractor_share": 0 <= self.distractor_share <= 1,
            "retrieval_noise": 0 <= self.retrieval_noise < 1,
        }
        ranges = {
            "max_hops": "3, 4 or 5",
            "namesake_share": "in [0, 1]",
            "namesake_size": f"in [2, {len(OCCUPATIONS)}]",
            "distractor_share": "in [0, 1]",
            "retrieval_noise": "in [0, 1)",
        }
        for name, ok in problems.items():
            if not ok:
                raise ValueError(
                    f"data.synthetic.{name}={getattr(self, name)!r} must be {ranges[name]} "
                    f"(world {self.world!r})"
                )

    @property
    def harder(self) -> bool:
        """True unless every world knob has the easy world's value (then the files are the easy
        world's, byte for byte, whatever ``world`` says)."""
        return any(getattr(self, k) != v for k, v in EASY_KNOBS.items())

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["demo_mistake_weights"] = list(self.demo_mistake_weights)
        # The easy world's manifest is the one it always had: world knobs appear only when set.
        for name, value in {"world": "easy", **EASY_KNOBS}.items():
            if d[name] == value:
                del d[name]
        return d


@dataclasses.dataclass(frozen=True)
class SyntheticWorldFiles:
    root: str

    def _p(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def corpus(self) -> str:
        return self._p("corpus.jsonl")

    @property
    def train(self) -> str:
        return self._p("train.parquet")

    @property
    def validation(self) -> str:
        return self._p("validation.parquet")

    @property
    def test(self) -> str:
        return self._p("test.parquet")

    @property
    def demos(self) -> str:
        return self._p("demos.jsonl")

    @property
    def tokenizer(self) -> str:
        return self._p("tokenizer")

    @property
    def world(self) -> str:
        return self._p("world.json")

    @property
    def manifest(self) -> str:
        return self._p("manifest.json")

    def split(self, name: str) -> str:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return self._p(f"{name}.parquet")

    def all_paths(self) -> list[str]:
        return [self.corpus, *map(self.split, SPLITS), self.demos, self.tokenizer, self.world]


def fixed_texts(harder: bool = False) -> list[str]:
    """Every text the pipeline shows the model that does not depend on the drawn world (with
    ``harder``: also the texts only the harder worlds use)."""
    extra = [
        *(t.text for t in LONG_TEMPLATES),
        " ".join(r.phrase for r in EXTRA_RELATIONS.values()),
        NOTE_TEXT,
        NOTE_SAYS,
        " ".join(DISTRACTOR_PHRASES),
        "the",
    ]
    return [
        *(t.text for t in TEMPLATES),
        *PROMPT_STYLES.values(),
        CALL_LIMIT_WARNING,
        NO_RESULTS_TEXT,
        " ".join(OCCUPATIONS),
        " ".join(r.phrase for r in RELATIONS.values()),
        "is a country.",
        " ".join(f"Page {i}:" for i in range(1, 11)),  # formatted search results
        *(sentence.format("") for sentence in THINK_SENTENCES),
        *(extra if harder else []),
    ]


def vocabulary_texts(world: World, harder: bool = False) -> list[str]:
    """Every text the synthetic pipeline can put in front of the model, for the tokenizer vocabulary."""
    return [
        *fixed_texts(harder),
        *(passage_text(e) for e in world.entities),
        " ".join(world.names),
    ]


def question_rows(
    questions: list[Question], split: str, style: str, world: str | None = None
) -> list[QARow]:
    """The rows of a split; with ``world`` (the harder worlds) ``extra_info`` also records the
    world, each chain entity's qualifying occupation (``attributes``, None for a unique name) and
    the ``decisive_hop`` (:attr:`.questions.Question.decisive_hop`)."""
    rows = []
    for i, q in enumerate(questions):
        extra: dict[str, Any] = {
            "split": split,
            "index": i,
            "question": q.text,
            "hops": q.hops,
            "template": q.template,
            "chain": q.names,
        }
        if world is not None:
            extra |= {
                "world": world,
                "attributes": q.attributes,
                "decisive_hop": q.decisive_hop,
            }
        rows.append(
            QARow(
                data_source=f"synthetic_{q.hops}hop",
                prompt=build_messages(q.text, style),
                golds=[q.answer],
                extra_info=extra,
            )
        )
    return rows


def _length_stats(values: list[int]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
        "min": min(values),
    }


def _stats(splits, demos, tokenizer_dir: str, max_hops: int = 3) -> dict[str, Any]:
    tokenizer = load_tokenizer(tokenizer_dir)
    hop_counts = range(1, max_hops + 1)
    counts = {
        split: {f"{h}hop": sum(q.hops == h for q in qs) for h in hop_counts} | {"total": len(qs)}
        for split, qs in splits.items()
    }
    encoded = [encode_transcript(tokenizer, d["prompt"], demo_segments(d)) for d in demos]
    prompt_lengths = [len(e.prompt_ids) for e in encoded]
    by_hops: dict[str, dict[str, float]] = {}
    for h in hop_counts:
        lengths = [
            len(e.response_ids) for e, d in zip(encoded, demos, strict=True) if d["hops"] == h
        ]
        if lengths:
            by_hops[f"{h}hop"] = _length_stats(lengths)
    return {
        "vocab_size": len(tokenizer),
        "questions": counts,
        "prompt_tokens": _length_stats(prompt_lengths),
        "demo_response_tokens": by_hops,
        "demo_em": round(statistics.fmean(d["em"] for d in demos), 4),
        "demo_mistakes": {
            kind: sum(d["mistake"] == kind for d in demos)
            for kind in ("wrong_search", "early_answer", "wrong_answer")
        },
    }


def build_synthetic_world(
    out_dir: str | os.PathLike[str],
    config: SyntheticWorldConfig = SyntheticWorldConfig(),
    *,
    topk: int = 3,
    overwrite: bool = False,
) -> SyntheticWorldFiles:
    """Writes (or reuses) the synthetic world's files under ``out_dir`` and returns their paths.

    ``topk``: passages per search when the demonstrations are recorded (the rollout's
    ``tools.topk``, so the warm start sees the observations the policy will see).
    """
    if topk < 1:
        raise ValueError(f"tools.topk must be >= 1, got {topk}")
    files = SyntheticWorldFiles(os.fspath(out_dir))
    if not overwrite and _is_current(files, config, topk):
        return files
    os.makedirs(files.root, exist_ok=True)
    rng = random.Random(config.seed)
    # The easy knobs build the easy world's files, whatever the world's name; a harder world's
    # name goes into its rows and manifest.
    harder = config.harder
    world_name = config.world
    # Invented names must not collide with any other word the model sees, nor vanish as BM25 stopwords.
    reserved = {w.lower() for text in fixed_texts(harder) for w in re.findall(r"\w+", text)}
    reserved |= _stopwords()
    world = generate_world(
        rng,
        num_countries=config.num_countries,
        cities_per_country=config.cities_per_country,
        num_people=config.num_people,
        num_companies=config.num_companies,
        reserved_words=reserved,
        works_for=config.max_hops >= 4,
        namesake_share=config.namesake_share,
        namesake_size=config.namesake_size,
        namesakes_founders_only=config.namesakes_mid_chain_only,
        distractor_share=config.distractor_share,
    )
    write_corpus(world.corpus_rows(), files.corpus)
    with open(files.world, "w", encoding="utf-8") as f:
        json.dump(world.to_json(), f, indent=1)
        f.write("\n")

    # The index is built in a scratch directory so the output holds only deterministic files.
    with tempfile.TemporaryDirectory() as index_dir:
        base = LocalBM25Retriever(files.corpus, index_dir=index_dir)
        retriever = _with_noise(base, config.retrieval_noise, config.seed)
        toolbox = Toolbox([SearchTool(retriever, topk=topk)])
        questions = generate_questions(
            world,
            templates_up_to(config.max_hops),
            ambiguous_subjects=not config.namesakes_mid_chain_only,
        )
        if harder:
            questions = answerable_questions(
                questions,
                Toolbox([SearchTool(base, topk=topk)]),
                toolbox if config.retrieval_noise > 0 else None,
            )
        splits = split_by_subject(
            questions,
            world,
            rng,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
        )
        for split, split_questions in splits.items():
            rows = question_rows(
                split_questions, split, config.prompt_style, world_name if harder else None
            )
            write_rows(rows, files.split(split))

        save_word_tokenizer(build_word_tokenizer(vocabulary_texts(world, harder)), files.tokenizer)

        demos = make_demonstrations(
            splits["train"],
            toolbox,
            rng,
            mistake_rate=config.demo_mistake_rate,
            mistake_weights=config.demo_mistake_weights,
            shortcut_rate=config.demo_shortcut_rate,
            shortcut_hops=config.demo_shortcut_hops,
            wrong_names=world.names,
            prompt_style=config.prompt_style,
        )
    with open(files.demos, "w", encoding="utf-8", newline="\n") as f:
        for record in demos:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    manifest = {
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "topk": topk,
        "stats": _stats(splits, demos, files.tokenizer, config.max_hops),
    }
    if harder:
        manifest["world"] = {
            "name": world_name,
            "mechanism": WORLDS[world_name].mechanism,
            "retrieval": {"miss_rate": config.retrieval_noise, "seed": config.seed},
        }
    with open(files.manifest, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return files


def _with_noise(base: Retriever, miss_rate: float, seed: int) -> Retriever:
    return NoisyRetriever(base, miss_rate=miss_rate, seed=seed) if miss_rate > 0 else base


def world_retriever(
    files: SyntheticWorldFiles, *, index_dir: str | os.PathLike[str] | None = None
) -> Retriever:
    """The retriever a built world is meant to be searched with: BM25 over its corpus, wrapped in
    the :class:`~atpo_jax.tools.NoisyRetriever` its manifest records (``world.retrieval``), if any."""
    base = LocalBM25Retriever(files.corpus, index_dir=index_dir)
    return _with_noise(base, *world_noise(files))


def world_noise(files: SyntheticWorldFiles) -> tuple[float, int]:
    """The retrieval noise (miss rate, seed) a built world's manifest records (``world.retrieval``);
    ``(0.0, 0)`` for a world without noise (every easy world: its manifest has no ``world``)."""
    retrieval = read_manifest(files).get("world", {}).get("retrieval", {})
    return float(retrieval.get("miss_rate", 0.0)), int(retrieval.get("seed", 0))


def answerable_questions(
    questions: list[Question], clean: Toolbox, noisy: Toolbox | None = None
) -> list[Question]:
    """The questions the perfect scripted expert answers (EM 1) through ``clean`` (noise-free
    search) in exactly their hop count, with the answer in no result before the last search, and,
    when ``noisy`` is given, also through it (re-querying after misses) within the call limit."""
    kept = []
    for q in questions:
        try:
            episode = play_episode(ExpertAgent(q.text), clean)
            if episode.ended_by != "answer" or episode.num_calls != q.hops:
                continue
            if compute_reward(episode.response, [q.answer]).em != 1.0:
                continue
            results = [s.text for s in episode.segments if not s.trainable]
            answer = re.compile(rf"\b{re.escape(q.answer)}\b")
            if any(answer.search(text) for text in results[:-1]):
                continue
            if noisy is not None:
                episode = play_episode(ExpertAgent(q.text), noisy)
                if episode.ended_by != "answer":
                    continue
                if compute_reward(episode.response, [q.answer]).em != 1.0:
                    continue
        except ExpertError:
            continue
        kept.append(q)
    return kept


def _stopwords() -> set[str]:
    from_bm25s = import_bm25s().stopwords.STOPWORDS_EN
    return {w.lower() for w in from_bm25s}


def _is_current(files: SyntheticWorldFiles, config: SyntheticWorldConfig, topk: int) -> bool:
    if not os.path.isfile(files.manifest):
        return False
    try:
        with open(files.manifest, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (
        manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("config") == config.to_json()
        and manifest.get("topk") == topk
        and all(os.path.exists(p) for p in files.all_paths())
    )


def read_manifest(files: SyntheticWorldFiles) -> dict[str, Any]:
    with open(files.manifest, encoding="utf-8") as f:
        return json.load(f)


def read_demos(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Demonstration records from ``demos.jsonl`` (see :func:`.demos.make_demonstrations`)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
