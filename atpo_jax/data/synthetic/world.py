"""A seeded fictional world of countries, cities, people and companies linked by five relations.

Every entity has one short wiki-18-style passage (title in double quotes, a newline, then the text) that
states its facts as ``<subject> <relation phrase> <object>.`` sentences, and mentions no other entity. So
following a question's chain of relations needs one search per relation (see :mod:`.questions`).

Names are invented single words (one token for the word-level tokenizer, one term for BM25), unique
case-insensitively, and never an English stopword or a word used by the templates.

The harder worlds (``SyntheticWorldConfig.world``, see :mod:`.build`) add, on top of the same draws:

* ``works_for`` (a person works for a company), for chains of 4 and 5 hops;
* namesakes: groups of people who share one name and differ in their occupation. An entity is then
  identified by its *key* ``"Name~occupation"``; facts link to keys, and a passage that links to a
  namesake names its occupation (``"Velmora was founded by the painter Dravon."``);
* distractor notes: extra passages (``"Brelkan is a journal. Brelkan says that Dravon visited
  Kelmi."``) that mention an entity's name in a relation no question asks about.
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

# Only in the worlds with chains of 4 and 5 hops (kept out of RELATIONS, which the easy world's
# vocabulary and name draws are built from).
EXTRA_RELATIONS: dict[str, Relation] = {
    "works_for": Relation("works_for", "person", "company", "works for"),
}
ALL_RELATIONS: dict[str, Relation] = {**RELATIONS, **EXTRA_RELATIONS}
# The relations a distractor note states: none of them is asked about by any template.
DISTRACTOR_PHRASES = ("visited", "once met", "wrote about")
NOTE_TEXT = "is a journal."  # a note's first sentence, after its title
NOTE_SAYS = "says that"

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


def display_name(key: str) -> str:
    """The name an entity key shows in text (``"Dravon~painter"`` -> ``"Dravon"``)."""
    return key.split("~", 1)[0]


def key_occupation(key: str) -> str | None:
    """The occupation a namesake's key carries, or None for a unique name."""
    return key.split("~", 1)[1] if "~" in key else None


def mention(key: str) -> str:
    """How a passage names the entity ``key``: a namesake with its occupation ("the painter Dravon")."""
    occupation = key_occupation(key)
    name = display_name(key)
    return name if occupation is None else f"the {occupation} {name}"


@dataclasses.dataclass(frozen=True)
class Entity:
    """One passage of the corpus.

    Attributes:
      name: the name it shows (shared by namesakes).
      kind: ``country``, ``city``, ``person``, ``company``, or ``note`` (a distractor passage).
      facts: (relation name, object key), in passage order.
      occupation: people only.
      namesake: shares its name with other people (its key then carries its occupation).
      mentions: a note's (subject name, phrase, object name) sentences.
    """

    name: str
    kind: str
    facts: tuple[tuple[str, str], ...]  # (relation name, object key), in passage order
    occupation: str | None = None
    namesake: bool = False
    mentions: tuple[tuple[str, str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}~{self.occupation}" if self.namesake else self.name

    def names_in_passage(self) -> set[str]:
        """Every name its passage shows (its own, the linked ones, a note's)."""
        names = {self.name, *(display_name(o) for _, o in self.facts)}
        for subject, _, obj in self.mentions:
            names.update((subject, obj))
        return names

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
    if entity.kind == "note":
        sentences.append(f"{entity.name} {NOTE_TEXT}")
        sentences += [f"{entity.name} {NOTE_SAYS} {s} {p} {o}." for s, p, o in entity.mentions]
    sentences += [f"{entity.name} {ALL_RELATIONS[r].phrase} {mention(o)}." for r, o in entity.facts]
    if entity.occupation is not None:
        sentences.append(f"{entity.name} is a {entity.occupation}.")
    return f'"{entity.name}"\n' + " ".join(sentences)


@dataclasses.dataclass(frozen=True)
class World:
    """All entities, in corpus order (``corpus_rows()[i]`` is ``entities[i]``)."""

    entities: tuple[Entity, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {e.key: e for e in self.entities})
        by_name: dict[str, list[Entity]] = {}
        for e in self.entities:
            for name in e.names_in_passage():
                by_name.setdefault(name, []).append(e)
        object.__setattr__(self, "_mentioning", by_name)

    def get(self, key: str) -> Entity:
        """The entity of a key (its name, or ``"Name~occupation"`` for a namesake)."""
        return self._by_key[key]  # type: ignore[attr-defined]

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    @property
    def names(self) -> list[str]:
        """Every distinct name, in corpus order."""
        return list(dict.fromkeys(e.name for e in self.entities))

    def corpus_rows(self) -> list[dict[str, str]]:
        return [{"id": str(i), "contents": passage_text(e)} for i, e in enumerate(self.entities)]

    def mentioned_in(self, name: str) -> list[Entity]:
        """Entities whose passage shows ``name`` (its own, its namesakes', those that link to it)."""
        return list(self._mentioning.get(name, ()))  # type: ignore[attr-defined]

    def to_json(self) -> list[dict]:
        return [
            {
                "name": e.name,
                "kind": e.kind,
                "facts": dict(e.facts),
                **({"occupation": e.occupation} if e.occupation else {}),
                **({"namesake": True} if e.namesake else {}),
                **({"mentions": [list(m) for m in e.mentions]} if e.mentions else {}),
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
    works_for: bool = False,
    namesake_share: float = 0.0,
    namesake_size: int = 4,
    namesakes_founders_only: bool = False,
    distractor_share: float = 0.0,
) -> World:
    """Draws a world. Constraints that keep questions strictly multi-hop (see :mod:`.questions`):
    each country has >= 2 cities (one is its capital), and a company is never based in the city where its
    founder was born.

    The harder worlds' options draw only after everything the easy world draws, so with their
    defaults the world (and every random draw after it) is the easy one:

    * ``works_for``: every person works for a random company;
    * ``namesake_share``: about this share of the people are put into groups of ``namesake_size``
      that share the first member's name, with distinct occupations (``namesakes_founders_only``:
      drawn among the people who founded a company, so namesakes are met in the middle of chains);
    * ``distractor_share``: this share of the entities get a distractor note each.
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
    if works_for:
        entities = [
            dataclasses.replace(e, facts=(*e.facts, ("works_for", rng.choice(companies))))
            if e.kind == "person"
            else e
            for e in entities
        ]
    if namesake_share > 0:
        entities = _make_namesakes(
            rng, entities, namesake_share, namesake_size, founders_only=namesakes_founders_only
        )
    rng.shuffle(entities)  # corpus order carries no information about kinds
    if distractor_share > 0:
        taken = {*reserved_words, *names}
        entities = _add_notes(rng, entities, distractor_share, taken)
    return World(tuple(entities))


def _make_namesakes(
    rng: random.Random,
    entities: list[Entity],
    share: float,
    size: int,
    *,
    founders_only: bool,
) -> list[Entity]:
    """Renames groups of ``size`` people to one shared name with distinct occupations (see
    :func:`generate_world`), and points every fact at the namesakes' keys."""
    if not 2 <= size <= len(OCCUPATIONS):
        raise ValueError(f"namesake_size must be in [2, {len(OCCUPATIONS)}], got {size}")
    people = [e.name for e in entities if e.kind == "person"]
    if founders_only:
        founders = {o for e in entities for r, o in e.facts if r == "founded_by"}
        people = [p for p in people if p in founders]
    groups = min(
        round(share * sum(e.kind == "person" for e in entities) / size), len(people) // size
    )
    members = rng.sample(people, groups * size)
    new_key: dict[str, str] = {}
    renamed: dict[str, tuple[str, str]] = {}
    for g in range(groups):
        group = members[g * size : (g + 1) * size]
        occupations = rng.sample(OCCUPATIONS, size)
        for person, occupation in zip(group, occupations, strict=True):
            renamed[person] = (group[0], occupation)
            new_key[person] = f"{group[0]}~{occupation}"
    out = []
    for e in entities:
        facts = tuple((r, new_key.get(o, o)) for r, o in e.facts)
        if e.name in renamed:
            name, occupation = renamed[e.name]
            e = dataclasses.replace(e, name=name, occupation=occupation, namesake=True)
        out.append(dataclasses.replace(e, facts=facts))
    return out


def _add_notes(
    rng: random.Random, entities: list[Entity], share: float, taken: set[str]
) -> list[Entity]:
    """Distractor notes: for a ``share`` of the entities, a journal passage saying that the entity
    did something (a relation no question asks about) with another entity of the kind its first
    fact links to, inserted at random places in the corpus."""
    by_kind: dict[str, list[str]] = {}
    for e in entities:
        by_kind.setdefault(e.kind, []).append(e.name)
    kind_of = {e.key: e.kind for e in entities}
    chosen = [e for e in entities if rng.random() < share]
    titles = invent_names(rng, len(chosen), taken)
    notes = []
    for title, e in zip(titles, chosen, strict=True):
        _, first_object = e.facts[0]
        pool = [
            n
            for n in dict.fromkeys(by_kind[kind_of[first_object]])
            if n not in (e.name, display_name(first_object))
        ]
        obj = rng.choice(pool)
        notes.append(
            Entity(title, "note", (), mentions=((e.name, rng.choice(DISTRACTOR_PHRASES), obj),))
        )
    out = list(entities)
    for note in notes:
        out.insert(rng.randrange(len(out) + 1), note)
    return out
