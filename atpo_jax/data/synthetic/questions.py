"""Templated 1-, 2- and 3-hop questions over a synthetic :class:`~.world.World`, and their splits.

A question names one subject entity and asks for the end of a chain of relations, e.g. "Which country is the
birthplace of the founder of Velmora?" = Velmora -founded_by-> Dravon -born_in-> Kelmi -located_in-> Norvia. Answering
it takes one search per relation: search the subject, read the linked name, search that, and so on.

Strictness: a question is kept only if its answer appears in no passage that mentions the subject or an
intermediate entity other than the last one, so no search before the last hop can reveal the answer
(BM25 only returns passages containing a query term, and every query is an entity name).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from atpo_jax.data.synthetic.world import (
    ALL_RELATIONS,
    OCCUPATIONS,
    World,
    display_name,
    key_occupation,
)


@dataclasses.dataclass(frozen=True)
class Template:
    key: str
    subject_kind: str
    relations: tuple[str, ...]
    text: str  # with "{}" for the subject name

    @property
    def hops(self) -> int:
        return len(self.relations)

    @property
    def pattern(self) -> re.Pattern[str]:
        """Matches a question of this template: group 2 is the subject's name, group 1 the
        occupation that qualifies a namesake subject ("the painter Dravon"), if any."""
        head, tail = self.text.split("{}")
        return re.compile(re.escape(head) + _QUALIFIER + r"(\w+)" + re.escape(tail) + r"$")


_QUALIFIER = r"(?:the (" + "|".join(OCCUPATIONS) + r") )?"


# Every template ends with the subject name, right before "?": the name then sits at the same
# distance from the start of the answer for every question, so a tiny model with relative (rotary)
# positions learns to copy it into its first search within a short warm start.
TEMPLATES: tuple[Template, ...] = (
    Template("person_city", "person", ("born_in",), "Which city is the birthplace of {}?"),
    Template("city_country", "city", ("located_in",), "Which country is home to {}?"),
    Template("company_founder", "company", ("founded_by",), "Who is the founder of {}?"),
    Template("company_city", "company", ("based_in",), "Which city is the base of {}?"),
    Template("country_capital", "country", ("capital",), "What is the capital of {}?"),
    Template(
        "person_country",
        "person",
        ("born_in", "located_in"),
        "Which country is the birthplace of {}?",
    ),
    Template(
        "founder_city",
        "company",
        ("founded_by", "born_in"),
        "Which city is the birthplace of the founder of {}?",
    ),
    Template(
        "company_country", "company", ("based_in", "located_in"), "Which country is the base of {}?"
    ),
    Template(
        "person_capital",
        "person",
        ("born_in", "located_in", "capital"),
        "What is the capital of the birth country of {}?",
    ),
    Template(
        "founder_country",
        "company",
        ("founded_by", "born_in", "located_in"),
        "Which country is the birthplace of the founder of {}?",
    ),
    Template(
        "company_capital",
        "company",
        ("based_in", "located_in", "capital"),
        "What is the capital of the base country of {}?",
    ),
)
# Only in the worlds with ``max_hops`` 4 or 5 (they need ``works_for``); kept out of TEMPLATES, whose
# texts the easy world's vocabulary and name draws are built from.
LONG_TEMPLATES: tuple[Template, ...] = (
    Template(
        "founder_capital",
        "company",
        ("founded_by", "born_in", "located_in", "capital"),
        "What is the capital of the birth country of the founder of {}?",
    ),
    Template(
        "employer_founder_country",
        "person",
        ("works_for", "founded_by", "born_in", "located_in"),
        "Which country is the birthplace of the founder of the employer of {}?",
    ),
    Template(
        "employer_capital",
        "person",
        ("works_for", "based_in", "located_in", "capital"),
        "What is the capital of the base country of the employer of {}?",
    ),
    Template(
        "employer_founder_capital",
        "person",
        ("works_for", "founded_by", "born_in", "located_in", "capital"),
        "What is the capital of the birth country of the founder of the employer of {}?",
    ),
    Template(
        "founder_employer_capital",
        "company",
        ("founded_by", "works_for", "based_in", "located_in", "capital"),
        "What is the capital of the base country of the employer of the founder of {}?",
    ),
)
ALL_TEMPLATES = TEMPLATES + LONG_TEMPLATES
TEMPLATES_BY_KEY = {t.key: t for t in ALL_TEMPLATES}


def templates_up_to(max_hops: int) -> tuple[Template, ...]:
    """The templates of a world with chains of at most ``max_hops`` (3: the easy world's)."""
    return tuple(t for t in ALL_TEMPLATES if t.hops <= max_hops)


@dataclasses.dataclass(frozen=True)
class Question:
    """A question and its chain of entity keys (names, or ``"Name~occupation"`` for namesakes)."""

    text: str
    template: str
    chain: tuple[str, ...]  # subject, intermediate entities, answer (keys)

    @property
    def subject(self) -> str:
        return self.chain[0]

    @property
    def answer(self) -> str:
        return display_name(self.chain[-1])

    @property
    def hops(self) -> int:
        return len(self.chain) - 1

    @property
    def names(self) -> list[str]:
        """The chain as the names the text shows."""
        return [display_name(k) for k in self.chain]

    @property
    def attributes(self) -> list[str | None]:
        """Per chain entity, the occupation that tells a namesake apart (None: a unique name)."""
        return [key_occupation(k) for k in self.chain]

    @property
    def decisive_hop(self) -> int | None:
        """The first search (0 = the subject's) whose entity has namesakes, so that only the query
        qualified with its occupation finds its page: the turn where a careless query goes astray.
        None when no search of the chain is ambiguous."""
        for hop, attribute in enumerate(self.attributes[:-1]):
            if attribute is not None:
                return hop
        return None


def parse_question_full(text: str) -> tuple[Template, str, str | None]:
    """The template, subject name and the subject's qualifying occupation (None if the question
    gives none) of a synthetic question (``?`` optional, whitespace ignored)."""
    text = " ".join(text.split())
    if not text.endswith("?"):
        text += "?"
    for template in ALL_TEMPLATES:
        match = template.pattern.match(text)
        if match:
            return template, match.group(2), match.group(1)
    raise ValueError(f"not a synthetic-world question: {text!r}")


def parse_question(text: str) -> tuple[Template, str]:
    """The template and subject name of a synthetic question (``?`` optional, whitespace ignored)."""
    template, subject, _ = parse_question_full(text)
    return template, subject


def follow_chain(world: World, subject: str, relations: Sequence[str]) -> tuple[str, ...]:
    chain = [subject]
    for relation in relations:
        chain.append(world.get(chain[-1]).fact(relation))
    return tuple(chain)


def is_strict(world: World, chain: Sequence[str]) -> bool:
    """True when the answer is not in any passage mentioning chain[0..k-2] (see module docstring).

    Names, not keys, are compared: a search for a name retrieves every namesake's page."""
    answer = display_name(chain[-1])
    for key in chain[:-2]:
        for entity in world.mentioned_in(display_name(key)):
            if answer in entity.names_in_passage():
                return False
    return answer not in {display_name(k) for k in chain[:-1]}


def generate_questions(
    world: World,
    templates: Sequence[Template] = TEMPLATES,
    *,
    ambiguous_subjects: bool = True,
) -> list[Question]:
    """Every (template, subject) question whose chain is strict, in world order then template order.

    A namesake subject is named with its occupation ("the painter Dravon"); with
    ``ambiguous_subjects=False`` questions about namesakes are left out (namesakes are then only
    met in the middle of chains). Chains that visit an entity twice are left out.
    """
    questions = []
    for entity in world.entities:
        if entity.namesake and not ambiguous_subjects:
            continue
        for template in templates:
            if template.subject_kind != entity.kind:
                continue
            chain = follow_chain(world, entity.key, template.relations)
            if len(set(chain)) == len(chain) and is_strict(world, chain):
                subject = (
                    f"the {entity.occupation} {entity.name}" if entity.namesake else entity.name
                )
                questions.append(Question(template.text.format(subject), template.key, chain))
    return questions


def split_by_subject(
    questions: Sequence[Question],
    world: World,
    rng: random.Random,
    *,
    validation_fraction: float,
    test_fraction: float,
) -> dict[str, list[Question]]:
    """Train/validation/test splits with disjoint subjects, drawn per entity kind.

    Holding out subjects (not just questions) means evaluation asks about entities the model never saw
    as a question subject during training, so it must search rather than recall.
    """
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(
            f"validation_fraction and test_fraction must be in [0, 1), got "
            f"{validation_fraction}, {test_fraction}"
        )
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            "validation_fraction + test_fraction must leave room for training questions"
        )
    split_of: dict[str, str] = {}
    for kind in sorted({TEMPLATES_BY_KEY[q.template].subject_kind for q in questions}):
        subjects = sorted({q.subject for q in questions if world.get(q.subject).kind == kind})
        rng.shuffle(subjects)
        n_val = round(len(subjects) * validation_fraction)
        n_test = round(len(subjects) * test_fraction)
        for i, subject in enumerate(subjects):
            split_of[subject] = (
                "validation" if i < n_val else "test" if i < n_val + n_test else "train"
            )
    splits: dict[str, list[Question]] = {"train": [], "validation": [], "test": []}
    for q in questions:
        splits[split_of[q.subject]].append(q)
    return splits


def relation_phrase(relation: str) -> str:
    return ALL_RELATIONS[relation].phrase
