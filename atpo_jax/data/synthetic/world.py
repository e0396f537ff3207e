"""A seeded fictional world of countries, cities, people and companies linked by five relations.

Every entity has one short wiki-18-style passage (title in double quotes, a newline, then the text) that
states its facts as ``<subject> <relation phrase> <object>.`` sentences, and mentions no other entity. So
following a question's chain of relations needs one search per relation (see :mod:`.questions`).

Names are invented single words (one token for the word-level tokenizer, one term for BM25), unique
case-insensitively, and never an English stopword or a word used by the templates.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

KINDS = ("country", "city", "person", "company")


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str
    subject_kind: str
    object_kind: str
    phrase: str  # "<subject> <phrase> <object>." is how passages state the fact


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation("born_in", "person", "city", "was born in"),
        Relation("founded_by", "company", "person", "was founded by"),
        Relation("based_in", "company", "city", "is based in"),
        Relation("located_in", "city", "country", "is a city in"),
        Relation("capital", "country", "city", "has the capital"),
    )
}

OCCUPATIONS = ("painter", "singer", "writer", "farmer", "doctor", "teacher", "pilot", "baker")

# Syllable pieces for invented names: short, pronounceable, and unlike English words.
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
)
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s", "m")


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    facts: tuple[tuple[str, str], ...]  # (relation name, object name), in passage order
    occupation: str | None = None

    def fact(self, relation: str) -> str:
        for rel, obj in self.facts:
            if rel == relation:
                return obj
        raise KeyError(f"{self.kind} {self.name} has no {relation!r} fact")


def passage_text(entity: Entity) -> str:
    """The entity's corpus ``contents``: ``"Name"`` newline, then its sentences."""
    sentences = []
    if entity.kind == "country":
        sentences.append(f"{entity.name} is a country.")
    sentences += [f"{entity.name} {RELATIONS[r].phrase} {o}." for r, o in entity.facts]
    if entity.occupation is not None:
        sentences.append(f"{entity.name} is a {entity.occupation}.")
    return f'"{entity.name}"\n' + " ".join(sentences)


@dataclasses.dataclass(frozen=True)
class World:
    """All entities, in corpus order (``corpus_rows()[i]`` is ``entities[i]``)."""

    entities: tuple[Entity, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entities})

    def get(self, name: str) -> Entity:
        return self._by_name[name]  # type: ignore[attr-defined]

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entities]

    def corpus_rows(self) -> list[dict[str, str]]:
        return [{"id": str(i), "contents": passage_text(e)} for i, e in enumerate(self.entities)]

    def mentioned_in(self, name: str) -> list[Entity]:
        """Entities whose passage contains ``name`` (its own and those that link to it)."""
        return [e for e in self.entities if e.name == name or any(o == name for _, o in e.facts)]

    def to_json(self) -> list[dict]:
        return [
            {
                "name": e.name,
                "kind": e.kind,
                "facts": dict(e.facts),
                **({"occupation": e.occupation} if e.occupation else {}),
            }
            for e in self.entities
        ]


def invent_names(rng: random.Random, count: int, reserved: Iterable[str]) -> list[str]:
    """``count`` distinct capitalised 2–3-syllable names, none equal (case-insensitively) to ``reserved``."""
    taken = {w.lower() for w in reserved}
    names: list[str] = []
    attempts = 0
    while len(names) < count:
        attempts += 1
        if attempts > 1000 * count:
            raise RuntimeError(f"could not invent {count} distinct names; lower the entity counts")
        syllables = rng.choice((2, 2, 3))
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        if not 4 <= len(word) <= 9 or word in taken:
            continue
        taken.add(word)
        names.append(word.capitalize())
    return names


def generate_world(
    rng: random.Random,
    *,
    num_countries: int,
    cities_per_country: int,
    num_people: int,
    num_companies: int,
    reserved_words: Iterable[str] = (),
) -> World:
    """Draws a world. Constraints that keep questions strictly multi-hop (see :mod:`.questions`):
    each country has >= 2 cities (one is its capital), and a company is never based in the city where its
    founder was born.
    """
    if num_countries < 2 or cities_per_country < 2 or num_people < 2 or num_companies < 1:
        raise ValueError(
            "the synthetic world needs num_countries >= 2, cities_per_country >= 2, num_people >= 2 "
            f"and num_companies >= 1, got {num_countries}, {cities_per_country}, {num_people}, "
            f"{num_companies}"
        )
    num_cities = num_countries * cities_per_country
    names = invent_names(
        rng, num_countries + num_cities + num_people + num_companies, reserved_words
    )
    countries, rest = names[:num_countries], names[num_countries:]
    cities, rest = rest[:num_cities], rest[num_cities:]
    people, companies = rest[:num_people], rest[num_people:]

    entities: list[Entity] = []
    country_of: dict[str, str] = {}
    for ci, country in enumerate(countries):
        own = cities[ci * cities_per_country : (ci + 1) * cities_per_country]
        for city in own:
            country_of[city] = country
        entities.append(Entity(country, "country", (("capital", rng.choice(own)),)))
    entities += [Entity(c, "city", (("located_in", country_of[c]),)) for c in cities]
    birth_city = {p: rng.choice(cities) for p in people}
    entities += [
        Entity(p, "person", (("born_in", birth_city[p]),), occupation=rng.choice(OCCUPATIONS))
        for p in people
    ]
    for company in companies:
        founder = rng.choice(people)
        city = rng.choice([c for c in cities if c != birth_city[founder]])
        entities.append(Entity(company, "company", (("founded_by", founder), ("based_in", city))))
    rng.shuffle(entities)  # corpus order carries no information about kinds
    return World(tuple(entities))
