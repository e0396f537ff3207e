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

Command line: ``python -m atpo_jax.data.synthetic --out DIR [--seed 0] [--prompt-style short]``.
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
from atpo_jax.data.synthetic.expert import THINK_SENTENCES
from atpo_jax.data.synthetic.questions import (
    TEMPLATES,
    Question,
    generate_questions,
    split_by_subject,
)
from atpo_jax.data.synthetic.tokenizer import (
    build_word_tokenizer,
    load_tokenizer,
    save_word_tokenizer,
)
from atpo_jax.data.synthetic.world import (
    OCCUPATIONS,
    RELATIONS,
    World,
    generate_world,
    passage_text,
)
from atpo_jax.data.transcripts import encode_transcript
from atpo_jax.tools.bm25 import LocalBM25Retriever, import_bm25s
from atpo_jax.tools.corpus import write_corpus
from atpo_jax.tools.parsing import CALL_LIMIT_WARNING
from atpo_jax.tools.passages import NO_RESULTS_TEXT
from atpo_jax.tools.search import SearchTool
from atpo_jax.tools.toolbox import Toolbox

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")


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

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(
                f"data.synthetic.prompt_style={self.prompt_style!r} is not one of "
                f"{', '.join(sorted(PROMPT_STYLES))}"
            )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["demo_mistake_weights"] = list(self.demo_mistake_weights)
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


def fixed_texts() -> list[str]:
    """Every text the pipeline shows the model that does not depend on the drawn world."""
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
    ]


def vocabulary_texts(world: World) -> list[str]:
    """Every text the synthetic pipeline can put in front of the model, for the tokenizer vocabulary."""
    return [*fixed_texts(), *(passage_text(e) for e in world.entities), " ".join(world.names)]


def question_rows(questions: list[Question], split: str, style: str) -> list[QARow]:
    return [
        QARow(
            data_source=f"synthetic_{q.hops}hop",
            prompt=build_messages(q.text, style),
            golds=[q.answer],
            extra_info={
                "split": split,
                "index": i,
                "question": q.text,
                "hops": q.hops,
                "template": q.template,
                "chain": list(q.chain),
            },
        )
        for i, q in enumerate(questions)
    ]


def _length_stats(values: list[int]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
        "min": min(values),
    }


def _stats(splits, demos, tokenizer_dir: str) -> dict[str, Any]:
    tokenizer = load_tokenizer(tokenizer_dir)
    counts = {
        split: {f"{h}hop": sum(q.hops == h for q in qs) for h in (1, 2, 3)} | {"total": len(qs)}
        for split, qs in splits.items()
    }
    encoded = [encode_transcript(tokenizer, d["prompt"], demo_segments(d)) for d in demos]
    prompt_lengths = [len(e.prompt_ids) for e in encoded]
    by_hops: dict[str, dict[str, float]] = {}
    for h in (1, 2, 3):
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
    # Invented names must not collide with any other word the model sees, nor vanish as BM25 stopwords.
    reserved = {w.lower() for text in fixed_texts() for w in re.findall(r"\w+", text)}
    reserved |= _stopwords()
    world = generate_world(
        rng,
        num_countries=config.num_countries,
        cities_per_country=config.cities_per_country,
        num_people=config.num_people,
        num_companies=config.num_companies,
        reserved_words=reserved,
    )
    write_corpus(world.corpus_rows(), files.corpus)
    with open(files.world, "w", encoding="utf-8") as f:
        json.dump(world.to_json(), f, indent=1)
        f.write("\n")

    splits = split_by_subject(
        generate_questions(world),
        world,
        rng,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
    )
    for split, questions in splits.items():
        write_rows(question_rows(questions, split, config.prompt_style), files.split(split))

    save_word_tokenizer(build_word_tokenizer(vocabulary_texts(world)), files.tokenizer)

    # The index is built in a scratch directory so the output holds only deterministic files.
    with tempfile.TemporaryDirectory() as index_dir:
        retriever = LocalBM25Retriever(files.corpus, index_dir=index_dir)
        toolbox = Toolbox([SearchTool(retriever, topk=topk)])
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
        "stats": _stats(splits, demos, files.tokenizer),
    }
    with open(files.manifest, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return files


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
